"""Supervised fine-tuning: records to conversations, exactly which tokens train, packed and
bucketed batches giving the same loss, `lmforge sft` end to end, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, rerun_from_step

from lmforge.cli import main
from lmforge.config import model_config
from lmforge.data.example_loader import ExampleLoader, pack_collate, pack_windows
from lmforge.data.packing import pad_collate
from lmforge.data.sft import to_example, to_messages
from lmforge.model.gpt import GPT
from lmforge.tokenizer import END_TURN, train_bpe
from lmforge.train.losses import CausalLMLoss

ROOT = Path(__file__).resolve().parents[1]
RECORDS = json.loads((ROOT / "lmforge" / "assets" / "instructions.json").read_text())[:120]


@pytest.fixture(scope="module")
def tok():
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in RECORDS]
    return train_bpe(texts, vocab_size=400)


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory, save_base) -> Path:
    return save_base(tmp_path_factory.mktemp("base") / "ckpt", tok, block_size=256)


def test_record_shapes_map_to_conversations():
    alpaca = to_messages({"instruction": "Add", "input": "2+2", "output": "4"}, "r")
    assert alpaca == [
        {"role": "user", "content": "Add\n\n2+2"},
        {"role": "assistant", "content": "4"},
    ]
    pc = to_messages({"prompt": "Hi", "completion": "Hello"}, "r")
    assert [m["role"] for m in pc] == ["user", "assistant"]
    chat = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    assert to_messages({"messages": chat}, "r") == chat


def test_labels_are_the_assistant_tokens_and_end_of_turn_only(tok):
    ex = to_example(tok, to_messages({"prompt": "Name a color.", "completion": "Blue."}, "r"))
    trained = [t for t in ex.labels if t != -100]
    assert trained == [*tok.encode("Blue."), tok.tok.token_to_id(END_TURN)]
    assert len(ex.input_ids) == len(ex.labels)
    # labels are the next tokens: where trained, labels[i] == the token after input_ids[i]
    full = [*ex.input_ids, tok.tok.token_to_id(END_TURN)]
    assert all(lab == full[i + 1] for i, lab in enumerate(ex.labels) if lab != -100)


def test_packed_and_bucketed_batches_give_the_same_loss(tok):
    examples = [to_example(tok, to_messages(r, "r")) for r in RECORDS[:12]]
    torch.manual_seed(0)
    model = GPT(model_config(preset="llama-tiny", vocab_size=tok.vocab_size, block_size=256)).eval()
    loss_fn = CausalLMLoss()
    lengths = [len(e.input_ids) for e in examples]
    windows = pack_windows(lengths, range(len(examples)), 256)
    assert any(len(w) > 1 for w in windows)  # several conversations share a window
    packed = pack_collate([[examples[i] for i in w] for w in windows], 256, tok.pad_id)
    padded = pad_collate(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in examples], tok.pad_id
    )
    with torch.no_grad():
        (a, _), (b, _) = loss_fn(model, packed), loss_fn(model, padded)
    assert loss_fn.units(packed) == loss_fn.units(padded)
    assert abs(a.item() - b.item()) / b.item() <= 1e-5


def test_example_loader_covers_an_epoch_and_resumes(tok):
    examples = [to_example(tok, to_messages(r, "r")) for r in RECORDS[:40]]
    for packed in (False, True):
        loader = ExampleLoader(examples, 4, 256, tok.pad_id, seed=3, packed=packed)
        first = [loader.next_step(2) for _ in range(2)]
        state = loader.state_dict()
        after = loader.next_step(2)
        again = ExampleLoader(examples, 4, 256, tok.pad_id, seed=3, packed=packed)
        again.load_state_dict(state)
        assert all(
            torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(after, again.next_step(2))
        )
        assert first  # both layouts produce steps


def _records(tmp_path: Path, records: list) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_sft_trains_and_evaluates_from_step_0(base, tmp_path, capsys):
    data = _records(tmp_path, RECORDS)
    argv = [
        "sft", "--base", str(base), "--data", str(data), f"--run.dir={tmp_path}", "--run.name=s",
        "--train.max_steps=30", "--train.micro_batch_size=8", "--train.lr=3e-3",
        "--train.eval_interval=30", "--train.eval_generations=4", "--train.eval_max_new_tokens=8",
        "--run.tensorboard=false", "--train.precision=fp32",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    rows = read_metrics(tmp_path / "s")
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 30]
    assert all(0 <= r["val_end_rate"] <= 1 for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    out = capsys.readouterr().out
    assert "108 train / 12 held-out conversations" in out


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"text": "no fields"}] * 5, "missing fields"),
        ([{"messages": []}] * 5, "empty conversation"),
        (
            [
                {
                    "messages": [
                        {"role": "assistant", "content": "a"},
                        {"role": "user", "content": "u"},
                    ]
                }
            ]
            * 5,
            "makes no sense",
        ),
    ],
    ids=["missing_fields", "empty", "role_order"],
)
def test_bad_sft_data_is_one_line(base, tmp_path, capsys, records, message):
    argv = [
        "sft",
        "--base",
        str(base),
        "--data",
        str(_records(tmp_path, records)),
        f"--run.dir={tmp_path}",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_sft_needs_a_base_with_chat_tokens(tmp_path, capsys, save_base):
    from lmforge.tokenizer import CharTokenizer

    save_base(tmp_path / "c", CharTokenizer.from_text("abc def"), preset="tiny")
    argv = ["sft", "--base", str(tmp_path / "c"), "--data", str(_records(tmp_path, RECORDS[:20]))]
    assert main([*argv, f"--run.dir={tmp_path}"]) == 1
    assert "cannot render conversations" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "prefix", "ptuning"])
def test_peft_sft_writes_adapter_checkpoints_that_load_and_resume(base, tmp_path, capsys, method):
    import lmforge
    from lmforge.train import checkpoint as ckpt

    data = _records(tmp_path, RECORDS[:60])
    argv = [
        "sft", "--base", str(base), "--data", str(data), f"--run.dir={tmp_path}", "--run.name=p",
        f"--peft.method={method}", "--peft.num_virtual_tokens=4", "--train.max_steps=4",
        "--train.micro_batch_size=4", "--train.eval_interval=4", "--train.ckpt_interval=2",
        "--train.eval_generations=2", "--train.eval_max_new_tokens=4", "--train.lr=1e-2",
        "--run.tensorboard=false", "--train.precision=fp32",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    folder = ckpt.resolve_checkpoint(tmp_path / "p")
    assert not (folder / ckpt.WEIGHTS).exists() and (folder / "adapter.safetensors").is_file()
    size = (folder / "adapter.safetensors").stat().st_size
    assert size < (base / ckpt.WEIGHTS).stat().st_size / 5
    assert f"peft {method}:" in capsys.readouterr().out
    module, tok = lmforge.load(tmp_path / "p")  # base + adapter, the base's hash checked
    ids = torch.tensor([tok.encode("Name a color.")])
    base_model, _ = lmforge.load(base)
    assert not torch.equal(module(ids), base_model(ids))  # the adapter changed the outputs
    # resume from step 2 in a new process: the same losses as the uninterrupted run
    rows = read_metrics(tmp_path / "p")
    resumed = rerun_from_step(tmp_path / "p", "sft", 2)
    losses = lambda rs: [(r["step"], r["loss"]) for r in rs if "loss" in r]  # noqa: E731
    assert losses(resumed) == losses(rows)


def test_an_adapter_on_the_wrong_base_is_refused(base, tok, tmp_path, capsys, save_base):
    import shutil

    import lmforge

    own_base = tmp_path / "base"
    shutil.copytree(base, own_base)
    data = _records(tmp_path, RECORDS[:40])
    argv = [
        "sft", "--base", str(own_base), "--data", str(data), f"--run.dir={tmp_path}", "--run.name=l",
        "--peft.method=lora", "--train.max_steps=1", "--train.micro_batch_size=4",
        "--train.eval_generations=1", "--train.eval_max_new_tokens=2", "--run.tensorboard=false",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    save_base(own_base, tok, seed=1, block_size=256)  # other weights under the same path
    with pytest.raises(Exception, match="wrong base"):
        lmforge.load(tmp_path / "l")
    assert main(["generate", "--checkpoint", str(tmp_path / "l"), "--prompt", "Hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wrong base" in err


def _lora_run(base: Path, tmp_path: Path, method: str = "lora") -> Path:
    data = _records(tmp_path, RECORDS[:40])
    argv = [
        "sft", "--base", str(base), "--data", str(data), f"--run.dir={tmp_path}", f"--run.name={method}",
        f"--peft.method={method}", "--peft.num_virtual_tokens=4", "--train.max_steps=2",
        "--train.micro_batch_size=4", "--train.lr=1e-2", "--train.eval_generations=1",
        "--train.eval_max_new_tokens=2", "--run.tensorboard=false", "--train.precision=fp32",
    ]  # fmt: skip
    assert main(argv) == 0
    return tmp_path / method


def test_export_merge_folds_lora_into_a_plain_checkpoint_and_hf(base, tmp_path, capsys):
    import lmforge

    run = _lora_run(base, tmp_path)
    capsys.readouterr()

    def export(*argv: str) -> int:
        return main(["export", "--checkpoint", str(run), *argv])

    assert export("--format", "lmforge", "--out", str(tmp_path / "x")) == 1
    assert "add --merge" in capsys.readouterr().err
    assert export("--format", "lmforge", "--merge", "--out", str(tmp_path / "m")) == 0
    assert export("--merge", "--out", str(tmp_path / "hf")) == 0
    adapted, tok = lmforge.load(run)
    merged, _ = lmforge.load(tmp_path / "m")
    ids = torch.tensor([tok.encode("Name a color.")])
    with torch.no_grad():
        assert (adapted(ids) - merged(ids)).abs().max() <= 1e-5
        transformers = pytest.importorskip("transformers")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
        assert (hf(ids).logits - merged(ids)).abs().max() <= 1e-4
    prefix_run = _lora_run(base, tmp_path, "prefix")
    capsys.readouterr()
    argv = ["export", "--checkpoint", str(prefix_run), "--merge", "--out", str(tmp_path / "p")]
    assert main(argv) == 1
    assert "only LoRA adapters merge" in capsys.readouterr().err


def test_generate_chat_answers_and_stops_at_a_stop_string(base, tmp_path, capsys):
    argv = [
        "generate",
        "--checkpoint",
        str(base),
        "--prompt",
        "Name a color.",
        "--temperature",
        "0",
    ]
    assert main([*argv, "--chat", "--max-new-tokens", "12"]) == 0
    answer = capsys.readouterr().out
    assert not answer.startswith("Name a color.")  # only the assistant's answer is printed
    assert main([*argv, "--max-new-tokens", "12"]) == 0
    free = capsys.readouterr().out[len("Name a color.") :].rstrip("\n")
    stop = free[3:5]
    assert main([*argv, "--max-new-tokens", "12", "--stop", stop]) == 0
    assert capsys.readouterr().out == "Name a color." + free[: free.index(stop)] + "\n"
    assert main([*argv, "--max-new-tokens", "12", "--stop", stop, "--stream"]) == 0
    assert capsys.readouterr().out == "Name a color." + free[: free.index(stop)] + "\n"
