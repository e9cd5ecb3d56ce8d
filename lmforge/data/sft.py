"""Instruction data for supervised fine-tuning: records -> conversations -> training examples.

A record is one of three shapes, detected per record:
- chat: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
- alpaca: {"instruction": str, "input": str (optional), "output": str}
- prompt/completion: {"prompt": str, "completion": str}

Every conversation is checked (an optional system message first, then user and assistant
turns alternating from a user turn, ending with an assistant turn) and rendered with the chat
format (lmforge/chat.py); the example's labels are the next tokens where the loss mask is 1
(assistant text and its end-of-turn token) and -100 elsewhere. The last `val_fraction` of
records is held out, as the project's data conventions say.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.chat import render_conversation
from lmforge.common import LmforgeError
from lmforge.fileio import read_utf8_text
from lmforge.tokenizer import Tokenizer


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    """The next token where it is trained on, -100 elsewhere."""
    messages: list[dict]


def read_records(path: str | Path) -> list[dict]:
    """A .json list of records or a .jsonl file of them."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"data file not found: {path}")
    text = read_utf8_text(path)
    try:
        if path.suffix.lower() == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(records, dict):  # {"data": [...]}-style wrappers
        lists = [v for v in records.values() if isinstance(v, list)]
        records = lists[0] if len(lists) == 1 else records
    if not isinstance(records, list) or not records:
        raise LmforgeError(f"{path} holds no records (expected a list of objects)")
    return records


def split_records(path: str, val_fraction: float, val_path: str) -> tuple[list, list]:
    """(train, validation) records: val_path's records, else the last val_fraction of path's
    (the project's convention for the bundled instructions and preferences)."""
    records = read_records(path)
    if val_path:
        return records, read_records(val_path)
    n_val = max(1, round(len(records) * val_fraction))
    if n_val >= len(records):
        raise LmforgeError(f"{path}: {len(records)} record(s) leave nothing to train on")
    return records[:-n_val], records[-n_val:]


def to_messages(record: dict, where: str) -> list[dict]:
    """A record of any supported shape -> checked chat messages."""
    if not isinstance(record, dict):
        raise LmforgeError(f"{where}: a record must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
    elif "instruction" in record and "output" in record:
        messages = [
            {"role": "user", "content": alpaca_prompt(record)},
            {"role": "assistant", "content": record["output"]},
        ]
    elif "prompt" in record and "completion" in record:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    else:
        raise LmforgeError(
            f"{where}: missing fields: expected 'messages', 'instruction' + 'output', or "
            f"'prompt' + 'completion'; found {sorted(record)}"
        )
    check_conversation(messages, where)
    return messages


def alpaca_prompt(record: dict) -> str:
    """An alpaca record's user message: the instruction, then its input after a blank line."""
    prompt = record["instruction"]
    return f"{prompt}\n\n{record['input']}" if record.get("input") else prompt


def prompt_messages(record: dict, where: str) -> list[dict]:
    """A record's conversation up to the assistant's turn (what a policy answers): chat
    messages without a final assistant message, an alpaca instruction (+ input), or a prompt;
    any answer the record holds is left out."""
    if not isinstance(record, dict):
        raise LmforgeError(f"{where}: a record must be a JSON object")
    if "messages" in record:
        messages = list(record["messages"])
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
    elif "instruction" in record:
        messages = [{"role": "user", "content": alpaca_prompt(record)}]
    elif "prompt" in record:
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise LmforgeError(
            f"{where}: no prompt: expected 'messages', 'instruction' or 'prompt'; found "
            f"{sorted(record)}"
        )
    check_conversation([*messages, {"role": "assistant", "content": ""}], where)
    return messages


def check_conversation(messages: list, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise LmforgeError(f"{where}: empty conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise LmforgeError(f"{where}: message {i} needs a string 'content'")
    roles = [m.get("role") for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or turns != expected[: len(turns)] or turns[-1] != "assistant":
        raise LmforgeError(
            f"{where}: role order {roles} makes no sense: expected an optional system message, "
            "then user and assistant turns alternating, ending with an assistant turn"
        )


def to_example(tokenizer: Tokenizer, messages: list[dict]) -> Example:
    ids, mask = render_conversation(tokenizer, messages)
    labels = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
    return Example(ids[:-1], labels, messages)


def load_examples(
    tokenizer: Tokenizer, path: str, val_fraction: float, val_path: str, max_len: int
) -> tuple[list[Example], list[Example], int]:
    """(train, validation, dropped): the last val_fraction of the records is validation unless
    val_path names a file; conversations longer than max_len tokens are dropped (counted)."""
    train_records, val_records = split_records(path, val_fraction, val_path)
    dropped = 0

    def examples(recs: list[dict], name: str) -> list[Example]:
        nonlocal dropped
        out = []
        for i, r in enumerate(recs):
            ex = to_example(tokenizer, to_messages(r, f"{name} record {i}"))
            if len(ex.input_ids) > max_len:
                dropped += 1
                continue
            out.append(ex)
        if not out:
            raise LmforgeError(
                f"{name}: no conversation fits the model's block_size ({max_len} tokens)"
            )
        return out

    return examples(train_records, path), examples(val_records, val_path or path), dropped
