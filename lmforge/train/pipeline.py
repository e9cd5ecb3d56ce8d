"""Pipeline parallel (train.parallel.pp): the blocks split into consecutive stages, one per
process, run by torch.distributed.pipelining's GPipe or 1F1B schedule. A step's accumulation
micro-batches are the schedule's micro-batches.

`StageModel` is one stage of a GPT: its blocks and, on the first stage, the embeddings, on the
last the final norm and the head. Its parameter names are the GPT's (blocks keep their index:
`blocks.3.attn.q.weight`), so sharded checkpoints from any layout agree by name. The GPT's
own methods compute positions, RoPE tables and logits, so the model's maths lives in one
place.

The loss is the Trainer's contract kept across the schedule: each micro-batch's loss sum over
its target tokens, divided by the step's total (all micro-batches, all data-parallel ranks),
is what the last stage back-propagates; the schedule's own averaging is off. Only the last
stage sees the loss: its figures are reported from there (zeros on the other stages, so a sum
over ranks gives the step's totals).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from lmforge.config import stage_layers
from lmforge.model.gpt import GPT, compute_dtype
from lmforge.train.losses import Batch, CausalLMLoss

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class StageModel(nn.Module):
    def __init__(self, model: GPT, stage: int, stages: int):
        super().__init__()
        self.first, self.last = stage == 0, stage == stages - 1
        self.layers = stage_layers(model.config.n_layer, stages, stage)
        self._gpt = [model]  # its methods, not its parameters (a list hides it from nn.Module)
        if self.first:
            self.wte, self.wpe, self.drop = model.wte, model.wpe, model.drop
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in self.layers})
        if self.last:
            self.norm_f, self.lm_head = model.norm_f, model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """First stage: input_ids (B, T); later ones: hidden states (B, T, d). Returns hidden
        states (B, T, d), or on the last stage logits (B, T, V)."""
        gpt = self._gpt[0]
        B, T = x.shape[:2]
        pos = torch.arange(T, device=x.device).unsqueeze(0).expand(B, T)  # (B, T)
        if self.first:
            x = self.drop(gpt.add_positions(self.wte(x), pos))  # (B, T, d)
        rope = gpt.rope_tables(pos, compute_dtype(x))
        for block in self.blocks.values():
            x = block(x, rope, True)  # plain causal attention
        return gpt.logits(self.norm_f(x)) if self.last else x


class Pipeline:
    """This rank's stage and the schedule that runs it; `run` takes the Trainer's place for a
    step's (or an evaluation's) micro-batches."""

    def __init__(self, model: GPT, info, schedule: str):
        stage, stages = info.mesh.get_local_rank("pp"), info.sizes["pp"]
        self.model = StageModel(model, stage, stages).to(info.device)
        group = info.mesh["pp"].get_group()
        self.stage = PipelineStage(self.model, stage, stages, info.device, group=group)
        self.schedule_cls = SCHEDULES[schedule]
        self.loss = CausalLMLoss()
        self._scale = 1.0
        self._current: tuple[tuple[int, bool], object] | None = None

    def _schedule(self, n: int, train: bool):
        """A schedule for n micro-batches. A stage is laid out for one count and mode at a
        time (its buffers per micro-batch): a new count or mode (an evaluation between
        training steps, a batch ramp) gets a new schedule, which lays the stage out again."""
        if self._current is None or self._current[0] != (n, train):
            cls = self.schedule_cls if train else ScheduleGPipe  # forward only: the same
            schedule = cls(self.stage, n_microbatches=n, loss_fn=self._loss, scale_grads=False)
            self._current = ((n, train), schedule)
        return self._current[1]

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss.cross_entropy(logits, labels) / self._scale

    def run(self, batches: list[Batch], units_total: float, train: bool) -> dict[str, torch.Tensor]:
        """Forward (and with train, backward) the micro-batches through the pipeline. Returns
        the last stage's summed loss, units and tokens (float64), zeros on other stages."""
        self._scale = units_total if train else 1.0
        schedule = self._schedule(len(batches), train)
        ids = torch.cat([b["input_ids"] for b in batches])  # (n * B, T): the schedule splits it
        labels = torch.cat([b["labels"] for b in batches])
        losses: list[torch.Tensor] = []
        run = schedule.step if train else schedule.eval
        inputs = (ids,) if self.model.first else ()
        if self.model.last:
            run(*inputs, target=labels, losses=losses)
        else:
            run(*inputs)
        zero = torch.zeros((), dtype=torch.float64, device=ids.device)
        if not self.model.last:
            return {"loss": zero, "units": zero, "tokens": zero}
        loss = torch.stack([loss.detach() for loss in losses]).double().sum() * self._scale
        units = (labels != -100).sum().double()
        return {"loss": loss, "units": units, "tokens": zero + ids.numel()}
