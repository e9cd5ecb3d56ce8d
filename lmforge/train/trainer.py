"""THE training loop. Every method (pretraining, SFT, reward model, DPO, ...) is this Trainer
with its own loss (lmforge/train/losses.py: `units(batch)` and `loss_fn(model, batch) ->
(loss sum, metrics)`) and its own data.

A step fetches all its micro-batches first, counts their loss units across micro-batches and
ranks, and back-propagates each micro-batch's loss sum divided by that total: accumulation
and DDP then give exactly the gradient of one big batch, whatever each micro-batch holds.

The train loader gives each step's micro-batches (`next_step(accum)`), its position for
resume (`state_dict`/`load_state_dict`) and, optionally, figures of its own to log with
the step (`step_metrics()`: PPO's rollout loader makes its rollouts there and reports their
reward and KL). Evaluation runs the validation batches through the loss, `extra_eval`, or
both.

`on_eval(row)`, if given, sees every evaluation row after a training step; answering True
stops the run there as a signal would (checkpoint, `stop_reason` "on_eval"): a
hyperparameter search prunes unpromising trials through it (lmforge/research/sweep.py).
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lmforge.common import LmforgeError, print0
from lmforge.config import Config, save_config, to_dict
from lmforge.hardware import autocast_context, device_peak_flops, enable_tf32, pick_precision
from lmforge.model.gpt import set_dropout
from lmforge.model.masks import require_flex_backward
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    clip_grad_norm,
    no_sync,
    parallelize,
)
from lmforge.train.ema import WeightAverage
from lmforge.train.losses import Batch, CausalLMLoss, LossFn
from lmforge.train.metrics import MetricsLogger
from lmforge.train.optim import build_optimizers, lr_scale
from lmforge.train.pipeline import Pipeline
from lmforge.train.schedule import accum_steps_at, lr_at
from lmforge.train.tensor_parallel import partial_grad_params, sync_partial_grads

# Columns of the printed log line and their formats (metrics.jsonl keeps full precision).
_PRINTED = {
    "loss": ".4f",
    "val_loss": ".4f",
    "val_bpb": ".4f",
    "val_end_rate": ".1%",
    "val_accuracy": ".1%",
    "val_mlm_accuracy": ".1%",
    "val_nsp_accuracy": ".1%",
    "val_f1": ".3f",
    "reward": ".3f",
    "kl": ".2f",
    "kd_kl": ".4f",
    "kd_ce": ".4f",
    "val_reward": ".3f",
    "val_kl": ".2f",
    "lr": ".2e",
    "grad_norm": ".4f",
    "tokens_per_s": ".0f",
    "mfu": ".1%",
}


def _reduce_over_ranks(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum each value over all ranks, in one all-reduce (keys in a fixed order)."""
    keys = sorted(sums)
    totals = all_reduce_sum(torch.stack([sums[k] for k in keys])).tolist()
    return dict(zip(keys, totals))


def _zeros(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same keys at 0: what a rank that does not report adds to the totals."""
    return {key: torch.zeros_like(value) for key, value in sums.items()}


def _per_unit(totals: dict[str, float], prefix: str = "") -> dict[str, float]:
    """The loss and every extra metric as a per-unit mean (units and tokens are counts)."""
    units = max(totals["units"], 1.0)
    return {
        f"{prefix}{key}": value / units
        for key, value in totals.items()
        if key not in ("units", "tokens")
    }


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
        extra_eval: Callable[[], dict[str, float]] | None = None,
        on_eval: Callable[[dict[str, Any]], bool] | None = None,
    ):
        self.cfg, self.tcfg = cfg, cfg.train
        self.dist = dist_info
        self.device = dist_info.device
        if cfg.model.attention_backend == "flex":  # fail before the step-0 evaluation
            require_flex_backward(self.device.type)
        enable_tf32(self.device)
        self.model = model.to(self.device)
        self.train_loader = train_loader
        self.val_batches = val_batches
        self.run_dir = Path(run_dir)
        self.loss_fn = loss_fn
        self.eval_loss_fn = eval_loss_fn or loss_fn
        self.tokenizer = tokenizer
        self.bytes_per_token = bytes_per_token
        self.extra_eval = extra_eval  # more val_* metrics, e.g. from generation
        self.on_eval = on_eval  # see the module docstring
        self.precision = pick_precision(self.tcfg.precision, self.device)
        self.train_model = parallelize(self.model, self.tcfg, dist_info, self.precision)
        self.tp_partial = partial_grad_params(self.model) if dist_info.sizes["tp"] > 1 else []
        self.pipeline = None
        if dist_info.sizes["pp"] > 1:  # from here on, self.model is this rank's stage
            if type(loss_fn) is not CausalLMLoss or extra_eval is not None:
                raise LmforgeError("train.parallel.pp > 1 pipelines causal-LM pretraining only")
            self.pipeline = Pipeline(self.model, dist_info, self.tcfg.parallel.pp_schedule)
            self.model = self.train_model = self.pipeline.model
        self.optimizers = build_optimizers(self.model, self.tcfg, self.device, self.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.average = None  # what evaluation and checkpoints see, when train.ema_decay > 0
        if self.tcfg.ema_decay:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.average = WeightAverage(named, self.tcfg.ema_decay)
        self.step = 0  # optimizer steps taken
        self.tokens = 0  # input tokens seen, all ranks
        self.best_metric = self.tcfg.best_metric or "val_loss"
        self.best_val = math.inf  # best_metric, as lower-is-better
        self.best_step: int | None = None  # the checkpoint `checkpoints/best` names
        self.last_eval: dict[str, Any] = {}
        self._dropout_on: bool | None = None  # late dropout's state (train.dropout_start)
        self.bad_steps = 0
        self._stop_signal: str | None = None
        self.logger: MetricsLogger | None = None

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self) -> dict[str, Any]:
        """Forward/backward over this step's micro-batches, clip, optimizer step. Returns the step's
        metrics. A step whose loss or gradient is not finite, or that holds no loss units on
        any rank, is skipped (no update); so is an fp16 step whose gradients overflowed."""
        model = self.train_model
        accum = accum_steps_at(self.step, self.tcfg.grad_accum_steps, self.tcfg.batch_ramp_interval)
        lr = lr_at(self.step, self.tcfg)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * lr_scale(opt, self.tcfg)
        batches = [self._to_device(b) for b in self.train_loader.next_step(accum)]
        units = torch.stack([self.loss_fn.units(b) for b in batches]).sum().double()
        # the TP and pipeline ranks of one data-parallel rank share its batches
        units_total = all_reduce_sum(units).item() * self.dist.dp_size / self.dist.world_size
        model.train()
        self._late_dropout()

        def backward(loss: torch.Tensor) -> None:  # DDP/FSDP average over ranks: undo that
            self.scaler.scale(loss * self.dist.dp_size).backward()

        if self.pipeline is not None:
            with autocast_context(self.precision, self.device):
                sums = self.pipeline.run(batches, max(units_total, 1.0), train=True)
        else:
            sums = self._run_batches(self.loss_fn, model, batches, backward, max(units_total, 1.0))
        totals = _reduce_over_ranks(sums if self.dist.reports else _zeros(sums))
        row: dict[str, Any] = {"step": self.step + 1, "lr": lr}
        row |= _per_unit(totals)
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        if self.tp_partial:
            sync_partial_grads(self.tp_partial, self.dist.mesh["tp"].get_group())
        max_norm = self.tcfg.grad_clip if self.tcfg.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm(self.params, max_norm, across_ranks=self.pipeline is not None)
        row["grad_norm"] = grad_norm
        finite = math.isfinite(row["loss"]) and (
            math.isfinite(grad_norm) or self.precision == "fp16"  # the scaler skips those
        )
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if units_total == 0:
            row["skipped"] = "no loss units in this step's batches"
            del row["loss"]
        elif not finite:
            row["skipped"] = "non-finite loss or gradient"
            self.bad_steps += 1
        else:
            for opt in self.optimizers:  # with fp16, skips the update if gradients overflowed
                self.scaler.step(opt)
            if self.average is not None:
                self.average.update(self.step + 1)
            self.bad_steps = 0
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            row.setdefault("skipped", "fp16 gradients overflowed")
            row["loss_scale"] = self.scaler.get_scale()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += int(totals["tokens"])
        row["tokens"] = self.tokens
        if hasattr(self.train_loader, "step_metrics"):
            row |= self.train_loader.step_metrics()
        if accum != self.tcfg.grad_accum_steps or self.tcfg.batch_ramp_interval:
            row["accum"] = accum
        return row

    def _late_dropout(self) -> None:
        """Dropout off before train.dropout_start, at the model's rates from then on (resumed
        runs included: it depends on the step alone). The rates are set on the first step
        and when they switch, not walked into the model at every step."""
        if self.tcfg.dropout_start:
            on = self.step >= self.tcfg.dropout_start
            if on != self._dropout_on:
                m = self.cfg.model
                set_dropout(self.model, m.dropout * on, m.attention_dropout_rate * on)
                self._dropout_on = on

    def _run_batches(
        self,
        loss_fn: LossFn,
        model: nn.Module,
        batches: Iterable[Batch],
        backward: Callable[[torch.Tensor], None] | None = None,
        units_total: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Forward each batch under autocast; with `backward` (training), back-propagate its
        loss sum / units_total under DDP's no_sync except on the last batch, so gradients are
        all-reduced once. Returns this rank's summed loss, units and metrics (float64)."""
        sums: dict[str, torch.Tensor] = {}
        batches = list(batches) if backward is not None else batches
        for i, batch in enumerate(batches):
            with no_sync(model, skip=backward is not None and i < len(batches) - 1):
                with autocast_context(self.precision, self.device):
                    loss_sum, metrics = loss_fn(model, batch)
                if backward is not None:
                    backward(loss_sum / units_total)
            values = {"loss": loss_sum.detach(), "units": loss_fn.units(batch), **metrics}
            for key, value in values.items():
                value = torch.as_tensor(value, dtype=torch.float64, device=self.device)
                sums[key] = sums[key] + value if key in sums else value
        return sums

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Per-unit mean loss (and metrics) over the validation batches of all ranks; for a
        next-token loss also perplexity and bits per byte; then extra_eval's figures."""
        row: dict[str, Any] = {"step": self.step, "tokens": self.tokens}
        if self.val_batches is not None:
            self.model.eval()
            batches = (self._to_device(b) for b in self.val_batches())
            if self.pipeline is not None:
                with autocast_context(self.precision, self.device):
                    sums = self.pipeline.run(list(batches), 1.0, train=False)
            else:
                sums = self._run_batches(self.eval_loss_fn, self.model, batches)
            sums = sums if self.dist.reports else _zeros(sums)
            row |= _per_unit(_reduce_over_ranks(sums), prefix="val_")
            if isinstance(self.eval_loss_fn, CausalLMLoss):  # other losses are not per token
                row["val_ppl"] = math.exp(min(row["val_loss"], 50.0))
            if self.bytes_per_token:
                row["val_bpb"] = row["val_loss"] / math.log(2) / self.bytes_per_token
        if self.extra_eval is not None:
            row |= self.extra_eval()
        return row

    # ---------------------------------------------------------------- checkpoints
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def trainer_state(self) -> dict[str, Any]:
        """What resume needs besides the weights; a sharded run's optimizer states go into
        the checkpoint's sharded/ folder instead (save_checkpoint)."""
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "scaler": self.scaler.state_dict(),
            "data": self.train_loader.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "world_size": self.dist.world_size,
            "precision": self.precision,
        }
        if not self.dist.sharded:
            state["optimizers"] = [opt.state_dict() for opt in self.optimizers]
        if self.average is not None:  # the weights file holds the average
            state["trained_weights"] = self.average.trained_weights()
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes step_XXXXXXX atomically, then moves the `latest` pointer and prunes
        old checkpoints (keeping the best). A sharded run first has every rank write its
        shards into a staging folder and gather the full weights to rank 0, which moves the
        shards into the checkpoint as it writes it."""
        folder = self.ckpt_root / f"step_{self.step:07d}"
        model, staging = self.model, None
        if self.dist.sharded:
            staging = self.ckpt_root / f".{folder.name}.sharded"
            if self.dist.is_main:
                shutil.rmtree(staging, ignore_errors=True)  # a crashed save's leftovers
            barrier()
            ckpt.save_sharded_state(staging, self.model, self.optimizers)
            model = ckpt.gather_model(self.model, self.cfg)
        improved = self._best_so_far()
        if self.dist.is_main:
            state = self.trainer_state()
            with self._averaged_weights(state.get("trained_weights")):  # copied once, not twice
                ckpt.save_checkpoint(folder, model, self.cfg, self.tokenizer, state, staging)
            ckpt.set_pointer(folder)
            if improved:
                ckpt.set_pointer(folder, ckpt.BEST)
            self._prune()
        barrier()  # no rank reads or writes checkpoints before this one is complete
        return folder if self.dist.is_main else None

    def _best_so_far(self) -> bool:
        """Whether this step's evaluation (if it has one) beats every earlier checkpoint's
        train.best_metric; if so it becomes the best."""
        if self.last_eval.get("step") != self.step:
            return False
        name = self.best_metric
        lower_is_better = name.rsplit("_", 1)[-1] in ("loss", "ppl", "bpb", "kl")
        value = self.last_eval[name] if lower_is_better else -self.last_eval[name]
        if value < self.best_val:
            self.best_val, self.best_step = value, self.step
            return True
        return False

    def _prune(self) -> None:
        keep = {f"step_{self.step:07d}"}
        if self.best_step is not None:
            keep.add(f"step_{self.best_step:07d}")
        steps = sorted(p for p in self.ckpt_root.glob("step_*") if p.is_dir())
        keep.update(p.name for p in steps[-self.tcfg.keep_last :] if self.tcfg.keep_last)
        for folder in steps:
            if folder.name not in keep:
                shutil.rmtree(folder)

    def resume(self, path: str | Path | None) -> None:
        """Go on from `--resume`: a checkpoint folder, or a run folder's latest checkpoint;
        nothing when it is empty."""
        if not path:
            return
        folder = ckpt.resolve_checkpoint(path)
        self.load_trainer_state(folder)
        print0(f"resumed {self.run_dir} from {folder.name} (step {self.step})")

    def load_trainer_state(self, folder: Path) -> None:
        """Restore everything resume needs from a checkpoint folder (weights included). A
        sharded checkpoint resumes at any world size and layout; a plain one (one process or
        DDP) into an unsharded run."""
        state_path = folder / ckpt.TRAINER_STATE
        if not state_path.is_file():
            raise LmforgeError(
                f"{folder} has no {ckpt.TRAINER_STATE}; it can be loaded but not resumed"
            )
        if ckpt.fused_layout(folder):
            raise LmforgeError(
                f"{folder} was written before attention's qkv and SwiGLU's gate_up became "
                "separate Linears: its weights load (lmforge.load, --base) but its optimizer "
                "state does not fit them, so it cannot be resumed"
            )
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if (
            self.tcfg.precision == "auto"
            and state.get("precision", self.precision) != self.precision
        ):
            # keep the precision 'auto' chose when the run started: a resumed run goes on
            # exactly as it began, whatever a new probe of this machine would say
            self.precision = state["precision"]
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
            self.optimizers = build_optimizers(self.model, self.tcfg, self.device, self.precision)
        if (folder / ckpt.SHARDED).is_dir():
            ckpt.load_sharded_state(folder, self.model, self.optimizers)
        elif self.pipeline is not None:
            raise LmforgeError(
                f"{folder} was saved by an unpipelined run: resume it with train.parallel.pp=1"
            )
        elif self.dist.sharded:
            saved = self._saved_optimizers(folder, state)
            ckpt.load_full_into_sharded(folder, self.model, self.optimizers, saved)
        else:
            ckpt.load_weights(self.model, folder)
            for opt, saved in zip(self.optimizers, self._saved_optimizers(folder, state)):
                opt.load_state_dict(saved)
            if self.average is not None:
                self.average.resume(state["trained_weights"])
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

    def _saved_optimizers(self, folder: Path, state: dict[str, Any]) -> list[dict]:
        """An unsharded checkpoint's optimizer states, one per optimizer of this run."""
        saved = state["optimizers"] if "optimizers" in state else [state["optimizer"]]
        if len(saved) != len(self.optimizers):
            raise LmforgeError(
                f"{folder} was trained with {len(saved)} optimizer(s), this run has "
                f"{len(self.optimizers)}: resume with the train.optimizer it was trained with"
            )
        return saved

    # ---------------------------------------------------------------- the loop
    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGINT/SIGTERM ask the loop to stop after this step, with an eval and a checkpoint;
        a second one stops at once. Returns the handlers to restore after fit() (only the
        main thread can set handlers; elsewhere none are installed)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_signal:  # asked twice: stop now
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

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
        previous_handlers = self._install_signal_handlers()
        self._stop_signal = None
        peak = self.cfg.run.peak_tflops * 1e12 if self.cfg.run.peak_tflops else None
        peak = peak or device_peak_flops(self.device, self.precision)
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
            evaluates = self.val_batches is not None or self.extra_eval is not None
            if self.step == 0 and evaluates:  # the baseline
                last_eval = self._eval_and_track(start)
            while self.step < t.max_steps:
                t0, tokens_before = time.perf_counter(), self.tokens
                row = self.train_step()
                row["tokens_per_s"] = (self.tokens - tokens_before) / (time.perf_counter() - t0)
                row["elapsed_s"] = time.perf_counter() - start
                if hasattr(self.model, "estimate_mfu"):  # tokens/s of all ranks over all devices
                    per_device = row["tokens_per_s"] / self.dist.world_size
                    row["mfu"] = self.model.estimate_mfu(per_device, peak, seq_len)
                last_train = row
                if row.get("skipped"):
                    self._log(row, force_print=True, note=f"step skipped: {row['skipped']}")
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
                    loss=f"{row.get('loss', math.nan):.4f}",
                    lr=f"{row['lr']:.2e}",
                    tok_s=f"{row['tokens_per_s']:.0f}",
                    mfu=f"{row.get('mfu', 0):.1%}",
                )
                stop_reason = self._should_stop(start)
                final = self.step >= t.max_steps or stop_reason is not None
                if evaluates and (self.step % t.eval_interval == 0 or final):
                    last_eval = self._eval_and_track(start)
                    if self._asked_to_stop(last_eval) and not final:
                        stop_reason, final = "on_eval", True
                if self.step % t.ckpt_interval == 0 or final:
                    self.save_checkpoint()
                if stop_reason:
                    break
        finally:
            bar.close()
            self.logger.close()
            if self.average is not None:  # the model users get is the one evaluated and saved
                self.average.install()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        if stop_reason and main:
            print(
                f"stopped early ({stop_reason}) at step {self.step}; resume with --resume={self.run_dir}",
                flush=True,
            )
        return {"train": last_train, "eval": last_eval, "stop_reason": stop_reason}

    def _averaged_weights(self, trained: dict[str, torch.Tensor] | None = None):
        """Inside: the model holds the weight average (train.ema_decay), if there is one.
        `trained`: a copy of the trained weights already made (WeightAverage.swapped_in)."""
        return self.average.swapped_in(trained) if self.average is not None else nullcontext()

    def _eval_and_track(self, start: float) -> dict[str, Any]:
        with self._averaged_weights():
            row = self.evaluate()
        row["elapsed_s"] = time.perf_counter() - start
        if self.best_metric not in row:  # said at the first evaluation, before training
            figures = ", ".join(k for k in row if k.startswith("val_"))
            raise LmforgeError(
                f"train.best_metric={self.best_metric!r} is not among this run's evaluation "
                f"figures: {figures}"
            )
        self.last_eval = row
        self._log(row, force_print=True)
        return row

    def _asked_to_stop(self, row: dict[str, Any]) -> bool:
        """on_eval's answer to this evaluation row, agreed by all ranks (any one stops all)."""
        if self.on_eval is None:
            return False
        asked = torch.tensor(int(bool(self.on_eval(row))), device=self.device)
        return bool(all_reduce_max(asked).item())

    def _log(self, row: dict[str, Any], force_print: bool = False, note: str = "") -> None:
        self.logger.log(row)
        if not self.dist.is_main or not (force_print or not sys.stderr.isatty()):
            return
        parts = [f"step {row['step']}"]
        parts += [f"{key} {row[key]:{fmt}}" for key, fmt in _PRINTED.items() if key in row]
        message = " | ".join(parts) + (f" | {note}" if note else "")
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()  # a pipe (tee, a log file) sees each line as it is written
