"""Preference pairs (reward model, DPO): records holding a prompt and a `chosen` and a
`rejected` answer, rendered in the chat format as two conversations that share the prompt.

The prompt is alpaca's `instruction` (+ `input`), `prompt`, or chat `messages`; the bundled preferences.json
holds instruction/input/output/chosen/rejected. A pair whose answers are equal teaches nothing
and is skipped (counted); a pair too long for the block is dropped (counted), as in SFT; a
prompt that alone fills the block is an error naming its record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.common import LmforgeError
from lmforge.data.example_loader import pad_examples
from lmforge.data.sft import Example, prompt_messages, split_records, to_example


@dataclass
class Pair:
    chosen: Example
    rejected: Example

    @property
    def input_ids(self) -> list[int]:
        """The longer answer's ids: what a bucketing loader sorts the pair by."""
        return max(self.chosen.input_ids, self.rejected.input_ids, key=len)


@dataclass
class PairStats:
    identical: int = 0
    """Pairs skipped because chosen == rejected."""
    too_long: int = 0
    """Pairs dropped because a conversation is longer than the block."""


def conversation(record: dict, answer: str, where: str) -> list[dict]:
    """The record's prompt with `answer` as the assistant's turn, as chat messages."""
    return [*prompt_messages(record, where), {"role": "assistant", "content": answer}]


def to_pair(tokenizer, record: dict, where: str, max_len: int, stats: PairStats) -> Pair | None:
    if not isinstance(record, dict):
        raise LmforgeError(f"{where} is not an object")
    for key in ("chosen", "rejected"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise LmforgeError(f"{where} has no {key!r} answer (needs chosen and rejected)")
    if record["chosen"] == record["rejected"]:
        stats.identical += 1
        return None
    chosen = to_example(tokenizer, conversation(record, record["chosen"], where))
    rejected = to_example(tokenizer, conversation(record, record["rejected"], where))
    prompt = next(i for i, label in enumerate(chosen.labels) if label != -100) + 1
    if prompt >= max_len:
        raise LmforgeError(
            f"{where}: the prompt is {prompt} tokens, as long as the model's block_size "
            f"{max_len} or longer, so no answer token fits after it"
        )
    if max(len(chosen.input_ids), len(rejected.input_ids)) > max_len:
        stats.too_long += 1
        return None
    return Pair(chosen, rejected)


def load_pairs(
    tokenizer, path: str, val_fraction: float, val_path: str, max_len: int
) -> tuple[list[Pair], list[Pair], PairStats]:
    """(train, held-out, stats): the last val_fraction of the records is held out unless
    val_path names a file."""
    train_records, val_records = split_records(path, val_fraction, val_path)
    stats = PairStats()

    def pairs(records: list, name: str) -> list[Pair]:
        out = [
            to_pair(tokenizer, r, f"{name} record {i}", max_len, stats)
            for i, r in enumerate(records)
        ]
        out = [p for p in out if p is not None]
        if not out:
            raise LmforgeError(
                f"{name}: no usable pair (identical answers or longer than the block)"
            )
        return out

    return pairs(train_records, path), pairs(val_records, val_path or path), stats


def pad_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B conversations, the B chosen ones first, so that chosen
    and rejected run in one forward; labels are -100 outside the answers."""
    return pad_examples([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
