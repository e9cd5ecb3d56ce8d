"""Labelled texts for sequence classification: records -> (text, label) examples, a held-out
split by record, and padded batches.

Records hold a text field and a label field, or, with `classify.pairs`
('chosen=polite,rejected=rude'), give one example per named field (preference data as a
polite-vs-rude task), optionally skipping texts equal to another field of their record
(`classify.unless_equal_to`: the neutral original of an edited pair). The last `val_fraction` of *records* is held out before pairs are
expanded, and any text that also occurs in the held-out split is dropped from training, so
no text is on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.common import LmforgeError
from lmforge.data.packing import pad_collate
from lmforge.data.sft import split_records
from lmforge.tokenizer import Tokenizer


@dataclass
class LabelledText:
    input_ids: list[int]
    label: int
    text: str


def labelled(records: list, cfg, where: str) -> list[tuple[str, str]]:
    """(text, label name) of every example the records give."""
    pairs = [item.split("=", 1) for item in filter(None, cfg.pairs.split(","))]
    fields = pairs or [(cfg.text_field, None)]
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise LmforgeError(f"{where} record {i}: a record must be a JSON object")
        for field, label in fields:
            text = record.get(field)
            label = label if label is not None else record.get(cfg.label_field)
            if not isinstance(text, str) or label is None:
                missing = field if not isinstance(text, str) else cfg.label_field
                raise LmforgeError(
                    f"{where} record {i}: missing field {missing!r} (has {sorted(record)})"
                )
            neutral = record.get(cfg.unless_equal_to) if cfg.unless_equal_to else None
            if isinstance(neutral, str) and text.strip() == neutral.strip():
                continue  # the unedited original of a pair: no sign of its label
            out.append((text, str(label)))
    return out


def encode_text(tokenizer: Tokenizer, text: str, block_size: int) -> list[int]:
    """Token ids of a text, its last block_size kept (the head reads the last token)."""
    ids = tokenizer.encode(text)
    if not ids:
        raise LmforgeError("a text to classify encodes to no tokens (empty text)")
    return ids[-block_size:]


def load_labelled(
    tokenizer: Tokenizer, path: str, val_fraction: float, val_path: str, cfg, block_size: int
):
    """(train, validation, label names): examples with label ids in sorted label order."""
    train_records, val_records = split_records(path, val_fraction, val_path)
    val = labelled(val_records, cfg, val_path or path)
    held_out = {text for text, _ in val}
    train = [(t, label) for t, label in labelled(train_records, cfg, path) if t not in held_out]
    labels = sorted({label for _, label in train})
    if len(labels) < 2:
        raise LmforgeError(
            f"{path}: the training labels are {labels}: a classifier needs two or more classes"
        )
    unknown = sorted({label for _, label in val} - set(labels))
    if unknown:
        raise LmforgeError(f"validation labels {unknown} never occur in the training data")
    index = {name: i for i, name in enumerate(labels)}

    def examples(items):
        return [
            LabelledText(encode_text(tokenizer, t, block_size), index[label], t)
            for t, label in items
        ]

    return examples(train), examples(val), labels


def pad_batch(ids: list[list[int]], labels: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids (B, T), attention_mask (B, T) and label (B,)."""
    batch = pad_collate([{"input_ids": x} for x in ids], pad_id)
    del batch["labels"]  # token labels: a classifier has one label per text
    return batch | {"label": torch.as_tensor(labels)}
