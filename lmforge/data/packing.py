"""Document packing over prepared shards, and a bucketing + padding collate.

`PackedLoader` cuts the concatenated token stream (documents separated by end-of-text) into
non-overlapping windows of block_size + 1 tokens, visits them in a seeded random order per
epoch, and hands each rank its rows of every global batch. It has the same step API as
`loader.RandomWindowLoader` (`next_step(accum_steps)`, `state_dict`, `load_state_dict`), so
the trainer can use either. Its position is a count of windows consumed in the current epoch,
which makes resume exact and independent of the world size and accumulation split.

With `within_document=True` each batch also carries `position_ids` (restarting at every
end-of-text token) and `document_ids` (B, T): the model attends only within a document
(lmforge/model/masks.py builds the dense mask or FlexAttention's BlockMask from them). The
end-of-text token starts the segment it precedes, like a BOS token, so no label needs
masking: a document's last token still learns to predict its end.

`BucketBatchSampler` + `pad_collate` batch variable-length examples (SFT) by similar length,
padding right to the longest in the batch, with labels -100 on padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lmforge.common import LmforgeError
from lmforge.model.masks import run_positions


class PackedLoader:
    def __init__(
        self,
        arrays: list[np.ndarray],
        block_size: int,
        micro_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        within_document: bool = False,
        eot_id: int | None = None,
    ):
        if within_document and eot_id is None:
            raise LmforgeError("within_document packing needs the tokenizer's end-of-text id")
        if not 0 <= rank < world_size:
            raise LmforgeError(f"rank {rank} is not in [0, world_size={world_size})")
        self.arrays = [a for a in arrays if len(a)]
        self.block_size, self.micro_batch_size = block_size, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.within_document, self.eot_id = shuffle, within_document, eot_id
        self._ends = np.cumsum([len(a) for a in self.arrays])  # (n_arrays,)
        total = int(self._ends[-1]) if len(self._ends) else 0
        self.n_windows = max(0, (total - 1) // block_size)
        if self.n_windows < micro_batch_size * world_size:
            raise LmforgeError(
                f"data too short: {total} tokens make {self.n_windows} windows of block_size={block_size}, "
                f"fewer than one batch ({micro_batch_size} x {world_size} ranks); add data or lower the sizes"
            )
        self.epoch = 0
        self.consumed = 0  # windows of the current epoch already handed out (all ranks together)
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_windows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def _tokens(self, start: int, length: int) -> np.ndarray:
        """`length` tokens from global position `start`, across shard boundaries if needed."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        a = int(np.searchsorted(self._ends, start, side="right"))
        pos = start - (int(self._ends[a - 1]) if a else 0)
        while filled < length:
            chunk = self.arrays[a][pos : pos + length - filled]
            out[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
            a, pos = a + 1, 0
        return out

    def _batch(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        T = self.block_size
        rows = np.stack([self._tokens(int(w) * T, T + 1) for w in windows])  # (B, T+1)
        x = torch.from_numpy(rows[:, :-1].copy())  # (B, T)
        batch = {"input_ids": x, "labels": torch.from_numpy(rows[:, 1:].copy())}
        if self.within_document:
            batch.update(document_fields(x, self.eot_id))
        return batch

    def next_step(self, accum_steps: int = 1) -> list[dict[str, torch.Tensor]]:
        """This rank's `accum_steps` micro-batches of the next optimizer step. Rows are laid out
        as (micro, rank, row) over one global batch, so the data of a step doesn't depend on
        how it is split over ranks and accumulation."""
        n = self.micro_batch_size * accum_steps * self.world_size
        if n > self.n_windows:
            raise LmforgeError(
                f"a global batch of {n} windows exceeds the {self.n_windows} the data holds"
            )
        if self.consumed + n > self.n_windows:  # the epoch's tail is dropped: batches stay full
            self.epoch += 1
            self.consumed = 0
            self._order = self._permutation(self.epoch)
        windows = self._order[self.consumed : self.consumed + n]
        self.consumed += n
        out = []
        for micro in range(accum_steps):
            first = (micro * self.world_size + self.rank) * self.micro_batch_size
            out.append(self._batch(windows[first : first + self.micro_batch_size]))
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_step(1)[0]

    def steps_per_epoch(self, accum_steps: int = 1) -> int:
        return self.n_windows // (self.micro_batch_size * accum_steps * self.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "n_windows": self.n_windows,
            "block_size": self.block_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "n_windows", "block_size"):
            if state[key] != getattr(self, key):
                raise LmforgeError(
                    f"cannot resume the data loader: {key} was {state[key]}, now {getattr(self, key)} "
                    "(different data, seed or block size)"
                )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._order = self._permutation(self.epoch)


def document_fields(input_ids: torch.Tensor, eot_id: int) -> dict[str, torch.Tensor]:
    """position_ids (B, T) restarting at each end-of-text token, and document_ids (B, T)
    counting them: query i may attend key j when j <= i in the same document."""
    return segment_fields(torch.cumsum((input_ids == eot_id).long(), dim=1))


def segment_fields(segments: torch.Tensor) -> dict[str, torch.Tensor]:
    """Segment ids (B, T) -> position_ids (B, T) restarting at each segment's first token, and
    the ids as `document_ids` for GPT.forward: each token attends only within its segment.
    Segment -1 is padding: it attends only to itself (no all-masked row)."""
    return {"position_ids": run_positions(segments), "document_ids": segments}


# ---------------------------------------------------------------- variable-length examples


def pad_collate(
    examples: Sequence[dict[str, Sequence[int]]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` (and `labels`, default = input_ids) to the longest example,
    rounded up to a multiple; padding gets pad_id, label -100 and attention_mask 0."""
    longest = max(len(e["input_ids"]) for e in examples)
    T = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(e.get("labels", e["input_ids"]), dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class BucketBatchSampler:
    """Batches of example indices with similar lengths (less padding): each epoch, a seeded
    shuffle, then groups of `batch_size * bucket_factor` sorted by length and cut into batches,
    whose order is shuffled again. Every rank gets the same number of batches; resumable."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        bucket_factor: int = 50,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.bucket_factor = batch_size, seed, bucket_factor
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.position = 0  # batches of this epoch already yielded to this rank

    def batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        group = self.batch_size * self.bucket_factor
        out: list[np.ndarray] = []
        for g in range(0, len(order), group):
            chunk = order[g : g + group]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            out += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            out = [b for b in out if len(b) == self.batch_size]
        out = [out[i] for i in rng.permutation(len(out))]
        per_rank = len(out) // self.world_size
        return out[self.rank : per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            batches = self.batches(self.epoch)
            while self.position < len(batches):
                self.position += 1
                yield batches[self.position - 1].tolist()
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
