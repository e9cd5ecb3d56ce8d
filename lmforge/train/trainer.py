"""THE training loop. Every method (pretraining, SFT, reward model, DPO, ...) is this Trainer
with its own `loss_fn(model, batch) -> (loss, metrics)` and its own data.

A loss_fn returns the mean loss over the batch's units (target tokens, pairs, ...) and
metrics["n"], the number of those units. The Trainer back-propagates loss * n for each
micro-batch and divides the summed gradients by the step's total n across micro-batches and
ranks, so that accumulation and DDP give the gradient of one big batch even when micro-batches
hold different numbers of target tokens.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lmforge.common import LmforgeError, autocast_context, device_peak_flops, pick_precision
from lmforge.config import Config, save_config, to_dict
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    no_sync,
    parallelize,
)
from lmforge.train.metrics import MetricsLogger
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import accum_steps_at, lr_at

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, Any]]]


def causal_lm_loss(label_smoothing: float = 0.0) -> LossFn:
    """Next-token cross-entropy; labels are already shifted, -100 marks positions without loss."""

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
        )  # (B, T, V)
        labels = batch["labels"]  # (B, T)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=-100,
            label_smoothing=label_smoothing,
        )
        return loss, {"n": (labels != -100).sum()}

    return loss_fn


# Columns of the printed log line and their formats (metrics.jsonl keeps full precision).
_PRINTED = {
    "loss": ".4f",
    "val_loss": ".4f",
    "val_bpb": ".4f",
    "lr": ".2e",
    "grad_norm": ".4f",
    "tokens_per_s": ".0f",
    "mfu": ".1%",
}


def _mean_over_ranks(loss_sum: torch.Tensor, n_sum: torch.Tensor) -> tuple[float, float]:
    """Unit-weighted mean loss over all ranks, and the total number of units."""
    stats = all_reduce_sum(torch.stack([loss_sum, n_sum]))
    return (stats[0] / stats[1].clamp(min=1)).item(), stats[1].item()


class Trainer:
    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        train_loader,
        val_batches: Callable[[], Iterable[Batch]] | None,
        run_dir: Path,
        dist_info: DistInfo,
        loss_fn: LossFn,
        eval_loss_fn: LossFn | None = None,
        tokenizer=None,
        bytes_per_token: float | None = None,
    ):
        self.cfg, self.tcfg = cfg, cfg.train
        self.dist = dist_info
        self.device = dist_info.device
        self.model = model.to(self.device)
        self.train_loader = train_loader
        self.val_batches = val_batches
        self.run_dir = Path(run_dir)
        self.loss_fn = loss_fn
        self.eval_loss_fn = eval_loss_fn or loss_fn
        self.tokenizer = tokenizer
        self.bytes_per_token = bytes_per_token
        self.precision = pick_precision(self.tcfg.precision, self.device)
        self.train_model = parallelize(self.model, self.tcfg, dist_info)
        self.optimizer = build_optimizer(self.model, self.tcfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.step = 0  # optimizer steps taken
        self.tokens = 0  # input tokens seen, all ranks
        self.best_val = math.inf
        self.best_step: int | None = None
        self.bad_steps = 0
        self._stop_signal: str | None = None
        self.logger: MetricsLogger | None = None

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self) -> dict[str, Any]:
        """Forward/backward over this step's micro-batches, clip, AdamW step. Returns the step's
        metrics; a step whose loss or gradient is not finite is skipped (no update)."""
        model, opt = self.train_model, self.optimizer
        accum = accum_steps_at(self.step, self.tcfg.grad_accum_steps, self.tcfg.batch_ramp_interval)
        lr = lr_at(self.step, self.tcfg)
        for group in opt.param_groups:
            group["lr"] = lr
        micro_batches = self.train_loader.next_step(accum)
        model.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        n_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        tokens = 0
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            tokens += batch["input_ids"].numel()
            with (
                no_sync(model, skip=i < len(micro_batches) - 1),
                autocast_context(self.precision, self.device),
            ):
                loss, metrics = self.loss_fn(model, batch)
                n = metrics["n"]
                self.scaler.scale(loss * n).backward()
            loss_sum += loss.detach().double() * n
            n_sum += n
        loss_value, n_total = _mean_over_ranks(loss_sum, n_sum)
        grad_scale = self.dist.world_size / max(n_total, 1.0)  # DDP averaged over ranks
        self.scaler.unscale_(opt)
        grads = [p.grad for p in self.params if p.grad is not None]
        torch._foreach_mul_(grads, grad_scale)
        max_norm = self.tcfg.grad_clip if self.tcfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm).item()
        finite = math.isfinite(loss_value) and (
            math.isfinite(grad_norm) or self.precision == "fp16"
        )
        if finite:
            self.scaler.step(opt)
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += tokens * self.dist.world_size
        row = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
        }
        if accum != self.tcfg.grad_accum_steps or self.tcfg.batch_ramp_interval:
            row["accum"] = accum
        if not finite:
            row["skipped"] = True
        return row

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean loss over the validation batches (all ranks), perplexity and bits per byte."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        n_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for batch in self.val_batches():
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with autocast_context(self.precision, self.device):
                loss, metrics = self.eval_loss_fn(self.model, batch)
            loss_sum += loss.double() * metrics["n"]
            n_sum += metrics["n"]
        val_loss, _ = _mean_over_ranks(loss_sum, n_sum)
        row = {
            "step": self.step,
            "tokens": self.tokens,
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
        }
        if self.bytes_per_token:
            row["val_bpb"] = val_loss / math.log(2) / self.bytes_per_token
        return row

    # ---------------------------------------------------------------- checkpoints
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def trainer_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": self.train_loader.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "world_size": self.dist.world_size,
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes step_XXXXXXX atomically, then moves the `latest` pointer and prunes
        old checkpoints (keeping the best)."""
        if not self.dist.is_main:
            return None
        folder = self.ckpt_root / f"step_{self.step:07d}"
        ckpt.save_checkpoint(folder, self.model, self.cfg, self.tokenizer, self.trainer_state())
        ckpt.set_latest(folder)
        self._prune()
        return folder

    def _prune(self) -> None:
        keep = {f"step_{self.step:07d}"}
        if self.best_step is not None:
            keep.add(f"step_{self.best_step:07d}")
        steps = sorted(p for p in self.ckpt_root.glob("step_*") if p.is_dir())
        keep.update(p.name for p in steps[-self.tcfg.keep_last :] if self.tcfg.keep_last)
        for folder in steps:
            if folder.name not in keep:
                shutil.rmtree(folder)

    def load_trainer_state(self, folder: Path) -> None:
        """Restore everything resume needs from a checkpoint folder (weights included)."""
        ckpt.load_weights(self.model, folder)
        state_path = folder / ckpt.TRAINER_STATE
        if not state_path.is_file():
            raise LmforgeError(
                f"{folder} has no {ckpt.TRAINER_STATE}; it can be loaded but not resumed"
            )
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.train_loader.load_state_dict(state["data"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.best_val, self.best_step = state["best_val"], state["best_step"]
        if state["world_size"] == 1 and self.dist.world_size == 1:
            torch.set_rng_state(state["rng_cpu"])
            if "rng_cuda" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        else:  # per-rank dropout streams cannot be carried across world sizes; reseed them
            torch.manual_seed(self.tcfg.seed + 1000 * self.dist.rank + self.step)

    # ---------------------------------------------------------------- the loop
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self._stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    def _should_stop(self, start: float) -> str | None:
        """Why to stop now (agreed by all ranks), or None."""
        reason = 0
        if self._stop_signal:
            reason = 1
        elif self.tcfg.max_minutes and time.perf_counter() - start >= 60 * self.tcfg.max_minutes:
            reason = 2
        flag = all_reduce_max(torch.tensor(reason, device=self.device))
        return {0: None, 1: "signal", 2: "time limit"}[int(flag.item())]

    def fit(self) -> dict[str, Any]:
        """Train until max_steps, the time limit or a signal; evaluate and checkpoint on the
        way and at the end. Returns the last train and eval rows."""
        cfg, t = self.cfg, self.tcfg
        main = self.dist.is_main
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logger = MetricsLogger(self.run_dir, cfg.run, to_dict(cfg), enabled=main)
        if main:
            save_config(cfg, self.run_dir / "config.yaml")
        self._install_signal_handlers()
        peak = device_peak_flops(self.device, self.precision)
        seq_len = getattr(getattr(self.model, "config", None), "block_size", None)
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not main or not sys.stderr.isatty(),
            dynamic_ncols=True,
            desc="train",
        )
        last_train: dict[str, Any] = {}
        last_eval: dict[str, Any] = {}
        start = time.perf_counter()
        stop_reason = None
        try:
            while self.step < t.max_steps:
                t0, tokens_before = time.perf_counter(), self.tokens
                row = self.train_step()
                row["tokens_per_s"] = (self.tokens - tokens_before) / (time.perf_counter() - t0)
                row["elapsed_s"] = time.perf_counter() - start
                if hasattr(self.model, "estimate_mfu"):
                    row["mfu"] = self.model.estimate_mfu(row["tokens_per_s"], peak, seq_len)
                last_train = row
                if row.get("skipped"):
                    self._log(
                        row, force_print=True, note="non-finite loss or gradient: step skipped"
                    )
                    if self.bad_steps >= t.max_bad_steps:
                        kept = ckpt.latest_checkpoint(self.run_dir) or "none"
                        raise LmforgeError(
                            f"{self.bad_steps} non-finite steps in a row at step {self.step}; "
                            f"stopping (last good checkpoint: {kept}). Lower train.lr or check the data."
                        )
                elif self.step % t.log_interval == 0:
                    self._log(row)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    lr=f"{row['lr']:.2e}",
                    tok_s=f"{row['tokens_per_s']:.0f}",
                    mfu=f"{row.get('mfu', 0):.1%}",
                )
                stop_reason = self._should_stop(start)
                final = self.step >= t.max_steps or stop_reason is not None
                if self.val_batches is not None and (self.step % t.eval_interval == 0 or final):
                    last_eval = self._eval_and_track(start)
                if self.step % t.ckpt_interval == 0 or final:
                    self.save_checkpoint()
                if stop_reason:
                    break
        finally:
            bar.close()
            self.logger.close()
        if stop_reason and main:
            print(
                f"stopped early ({stop_reason}) at step {self.step}; resume with --resume={self.run_dir}",
                flush=True,
            )
        return {"train": last_train, "eval": last_eval, "stop_reason": stop_reason}

    def _eval_and_track(self, start: float) -> dict[str, Any]:
        row = self.evaluate()
        row["elapsed_s"] = time.perf_counter() - start
        if row["val_loss"] < self.best_val:
            self.best_val, self.best_step = row["val_loss"], self.step
        self._log(row, force_print=True)
        return row

    def _log(self, row: dict[str, Any], force_print: bool = False, note: str = "") -> None:
        self.logger.log(row)
        if not self.dist.is_main or not (force_print or not sys.stderr.isatty()):
            return
        parts = [f"step {row['step']}"]
        parts += [f"{key} {row[key]:{fmt}}" for key, fmt in _PRINTED.items() if key in row]
        message = " | ".join(parts) + (f" | {note}" if note else "")
        tqdm.write(message, file=sys.stdout)
