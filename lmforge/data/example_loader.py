"""Batches of variable-length examples (post-training): bucketed and padded, or packed.

- bucketed: each micro-batch holds examples of similar length (a seeded shuffle, then sorted
  groups), right-padded with labels -100 and an attention mask of 0 on padding.
- packed: examples are laid end to end into windows of block_size tokens; every example keeps
  its own positions (restarting at 0) and attends only within itself, through (B, T)
  document ids, so a packed example has exactly the loss it has alone (TRL's packing lost the
  masks).

Like the pretraining loaders, it has `next_step(accum_steps)`, `state_dict` and
`load_state_dict`; a step's micro-batches are laid out (micro, rank) over one global list, so
the data of a step depends only on the seed and the step count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lmforge.common import LmforgeError
from lmforge.data.packing import BucketBatchSampler, pad_collate, segment_fields


def pack_windows(lengths: Sequence[int], order: Sequence[int], block_size: int) -> list[list[int]]:
    """Greedily fill windows of block_size tokens with whole examples, in the given order."""
    windows: list[list[int]] = []
    used = block_size  # forces a new window for the first example
    for i in order:
        if lengths[i] > block_size:
            raise LmforgeError(
                f"example {i} has {lengths[i]} tokens, more than block_size {block_size}"
            )
        if used + lengths[i] > block_size:
            windows.append([])
            used = 0
        windows[-1].append(int(i))
        used += lengths[i]
    return windows


def pack_collate(
    examples: Sequence[Sequence[Any]], block_size: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Rows of examples (each with input_ids and labels) -> a packed batch of (B, T) ids and
    labels, (B, T) position_ids restarting per example and (B, T) document_ids (-1 padding)."""
    B, T = len(examples), block_size
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)  # -1 = padding
    for row, window in enumerate(examples):
        start = 0
        for seg, ex in enumerate(window):
            n = len(ex.input_ids)
            ids[row, start : start + n] = torch.as_tensor(ex.input_ids)
            labels[row, start : start + n] = torch.as_tensor(ex.labels)
            segments[row, start : start + n] = seg
            start += n
    return {"input_ids": ids, "labels": labels, **segment_fields(segments)}


def pad_examples(examples: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Language-model examples (input_ids, labels) right-padded into one batch."""
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    return pad_collate(rows, pad_id)


class ExampleLoader:
    def __init__(
        self,
        examples: Sequence[Any],
        micro_batch_size: int,
        block_size: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        packed: bool = False,
        pad: Callable[[list, int], dict[str, torch.Tensor]] | None = None,
    ):
        self.examples = list(examples)
        self.pad = pad or pad_examples  # how a bucketed micro-batch is padded
        self.lengths = [len(e.input_ids) for e in self.examples]
        self.micro_batch_size, self.block_size, self.pad_id = micro_batch_size, block_size, pad_id
        self.seed, self.rank, self.world_size, self.packed = seed, rank, world_size, packed
        self.epoch, self.consumed = 0, 0  # micro-batches of this epoch handed out (all ranks)
        self._groups = self.epoch_groups(0)

    def epoch_groups(self, epoch: int) -> list[list]:
        """This epoch's micro-batches, for all ranks: lists of example indices (bucketed) or
        of windows, each a list of example indices (packed)."""
        if self.packed:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            windows = pack_windows(self.lengths, order, self.block_size)
            m = self.micro_batch_size
            return [windows[i : i + m] for i in range(0, len(windows) - m + 1, m)]
        sampler = BucketBatchSampler(self.lengths, self.micro_batch_size, self.seed, drop_last=True)
        return [b.tolist() for b in sampler.batches(epoch)]

    def collate(self, group: list) -> dict[str, torch.Tensor]:
        if self.packed:
            rows = [[self.examples[i] for i in window] for window in group]
            return pack_collate(rows, self.block_size, self.pad_id)
        return self.pad([self.examples[i] for i in group], self.pad_id)

    def next_step(self, accum_steps: int = 1) -> list[dict[str, torch.Tensor]]:
        n = accum_steps * self.world_size
        if n > len(self._groups):
            raise LmforgeError(
                f"a step needs {n} micro-batches of {self.micro_batch_size}, but the data "
                f"makes {len(self._groups)}; add data or lower the batch size"
            )
        if self.consumed + n > len(self._groups):
            self.epoch, self.consumed = self.epoch + 1, 0
            self._groups = self.epoch_groups(self.epoch)
        step = self._groups[self.consumed : self.consumed + n]
        self.consumed += n
        return [
            self.collate(step[micro * self.world_size + self.rank]) for micro in range(accum_steps)
        ]

    def each_batch_once(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every example once, this rank's share, in a fixed order (evaluation)."""
        groups = [list(range(i, min(i + self.micro_batch_size, len(self.examples))))
                  for i in range(0, len(self.examples), self.micro_batch_size)]  # fmt: skip
        for group in groups[self.rank :: self.world_size]:
            yield self.pad([self.examples[i] for i in group], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "n": len(self.examples),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["n"] != len(self.examples):
            raise LmforgeError("cannot resume the data loader: different data or seed")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._groups = self.epoch_groups(self.epoch)
