"""Where training figures go: metrics.jsonl always, TensorBoard, W&B and MLflow when asked.
Only the main process logs; on other ranks every method is a no-op."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.common import LmforgeError


class MetricsLogger:
    def __init__(self, run_dir: Path, run_cfg, config_dict: dict, enabled: bool = True):
        self.enabled = enabled
        self._file = self._tb = self._wandb = self._mlflow = None
        if not enabled:
            return
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if run_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if run_cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise LmforgeError(
                    "run.wandb_project is set but wandb is not installed (pip install wandb)"
                ) from None
            self._wandb = wandb.init(
                project=run_cfg.wandb_project, name=run_dir.name, config=config_dict
            )
        if run_cfg.mlflow:
            try:
                import mlflow
            except ImportError:
                raise LmforgeError(
                    "run.mlflow is set but mlflow is not installed (pip install mlflow)"
                ) from None
            mlflow.start_run(run_name=run_dir.name)
            mlflow.log_params({k: v for k, v in _flatten(config_dict).items()})
            self._mlflow = mlflow

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = row["step"]
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
