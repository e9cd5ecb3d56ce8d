"""Reports: `write_eval_report` on a hand-made report (every detail kind, an unknown task), and
`lmforge report` on a real tiny training run and on broken run folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.loader import bundled_text_path
from lmforge.eval.report import RUN_REPORT_MARK, write_eval_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def linked_images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def assert_images_valid(folder: Path, md: str) -> list[str]:
    """Every image report.md links is a real PNG beside it; returns their names."""
    names = linked_images(md)
    for name in names:
        assert "/" not in name, name  # relative, beside report.md
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC, name
    return names


def reliability_bins(shift: float) -> list[dict]:
    bins = []
    for i in range(15):
        lower, upper = i / 15, (i + 1) / 15
        count = 0 if i < 3 else 10 * i
        mid = (lower + upper) / 2
        bins.append(
            {
                "lower": lower,
                "upper": upper,
                "count": count,
                "confidence": mid if count else 0.0,
                "accuracy": max(0.0, mid - shift) if count else 0.0,
            }
        )
    return bins


def sample_report() -> dict:
    return {
        "checkpoint": {
            "path": "runs/r/checkpoints/step_0000006",
            "sha256": "ab" * 32,
            "config": {"preset": "tiny", "n_layer": 2, "d_model": 32},
        },
        "tasks": {
            "ppl": {"ppl": 57.5617, "bpb": 5.847, "tokens": 12345},
            "calibration": {"mc_ece": 0.0734, "next_token_ece": 0.0121},
            "bias": {"stereo_pct": 61.5, "pairs": 40},
            "gen": {"end_rate": 0.25},
            "brand_new_task": {"score": 0.5},
        },
        "details": {
            "ppl": {"truncated": {"requests": 3, "tokens": 120}},
            "calibration": {
                "reliability": {"mc": reliability_bins(0.1), "next_token": reliability_bins(0.0)},
                "truncated": {"requests": 0, "tokens": 0},
            },
            "bias": {
                "per_type": {
                    "gender": {"stereo_pct": 70.0, "mean_diff": 0.31, "pairs": 20},
                    "race": {"stereo_pct": 45.0, "mean_diff": -0.12, "pairs": 20},
                }
            },
            "gen": {
                "samples": [
                    {"prompt": "a | b", "output": "line one\nline two"},
                    {"prompt": "<b>x</b>", "output": "plain"},
                ]
            },
            "brand_new_task": {"histogram": [1, 2, 3], "note": "anything"},
            "details_only_task": {"extra": {"nested": True}},
        },
        "settings": {
            "batch_size": 8,
            "dtype": "fp32",
            "seed": 0,
            "device": "cpu",
            "lmforge_version": "0.1.0",
            "torch_version": "2.5.0",
            "task_files": {"lmforge/assets/eval/mc.jsonl": "cd" * 32},
        },
        "created": "2025-01-01T00:00:00+00:00",
    }


def test_eval_report_writes_json_markdown_and_plots(tmp_path):
    report = sample_report()
    write_eval_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8")) == report
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert report["checkpoint"]["sha256"] in md and report["checkpoint"]["path"] in md
    for name, metrics in report["tasks"].items():
        assert f"## {name}" in md
        for metric in metrics:
            assert f"| {name} | {metric} |" in md
    assert "## details_only_task" in md
    assert "| 0.0734 |" in md and "| 57.56 |" in md  # 4 significant digits
    names = assert_images_valid(tmp_path, md)
    assert names == [
        "calibration_reliability_mc.png",
        "calibration_reliability_next_token.png",
        "bias_per_type.png",
    ]
    assert "3 requests" in md and "120 tokens" in md  # ppl's truncation
    # sample cells: `|` escaped, newlines as <br>, HTML inert; the table keeps its 2 columns
    assert "| a \\| b | line one<br>line two |" in md
    assert "| &lt;b&gt;x&lt;/b&gt; | plain |" in md
    assert "| gender | 70 | 0.31 | 20 |" in md
    assert "cd" * 32 in md and "| batch_size | 8 |" in md
    # written again (a rerun into the same folder): same files, same names
    write_eval_report(tmp_path, report)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["report.json", "report.md", *names]
    )


def test_eval_report_tolerates_missing_and_malformed_sections(tmp_path):
    write_eval_report(tmp_path, {"tasks": {"x": {"m": 1.0}}, "details": {"x": [1, 2], "y": None}})
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| x | m | 1 |" in md
    write_eval_report(tmp_path / "empty", {})
    assert (tmp_path / "empty" / "report.md").is_file()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real 6-step `lmforge train` run with evals at steps 0, 3 and 6 (about a second)."""
    root = tmp_path_factory.mktemp("report_run")
    text = root / "text.txt"
    text.write_text(bundled_text_path().read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    args = [
        "train",
        f"--data.path={text}",
        "--model.preset=tiny",
        "--train.max_steps=6",
        "--train.micro_batch_size=4",
        "--train.log_interval=1",
        "--train.eval_interval=3",
        "--train.eval_steps=2",
        "--train.ckpt_interval=1000000",
        f"--run.dir={root / 'runs'}",
        "--run.name=r",
        "--run.tensorboard=false",
        "--run.sample_tokens=0",
    ]
    assert main(args) == 0
    return root / "runs" / "r"


def test_report_verb_on_a_real_run(tiny_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")}
    assert main(["report", str(tiny_run)]) == 0
    out = tiny_run / "report"
    assert str(out / "report.md") in capsys.readouterr().out
    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.startswith(RUN_REPORT_MARK)
    names = assert_images_valid(out, md)
    assert {"loss.png", "lr.png", "tokens_per_s.png", "val_bpb.png"} <= set(names)
    assert "model.preset" in md and "| 6 |" in md  # config summary, last step
    evals = md.split("## Evaluations")[1]
    assert [line.split("|")[1].strip() for line in evals.splitlines()[4:7]] == ["0", "3", "6"]
    # the run's own files are untouched; a second report replaces only its own
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert main(["report", str(tiny_run)]) == 0
    assert (tiny_run / "metrics.jsonl").is_file() and (tiny_run / "config.yaml").is_file()


def test_report_out_folder_must_be_its_own(tiny_run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.md").write_text("keep me", encoding="utf-8")
    assert main(["report", str(tiny_run), "--out", str(other)]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert sorted(p.name for p in other.iterdir()) == ["notes.md"]
    assert main(["report", str(tiny_run), "--out", str(tmp_path / "new")]) == 0
    assert (tmp_path / "new" / "loss.png").is_file()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda run: None, "does not exist"),
        (lambda run: run.mkdir(), "metrics.jsonl not found"),
        (lambda run: (run.mkdir(), (run / "metrics.jsonl").write_text("\n")), "is empty"),
        (
            lambda run: (
                run.mkdir(),
                (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n'),
            ),
            "line 2 is not JSON",
        ),
        (
            lambda run: (run.mkdir(), (run / "metrics.jsonl").write_text("[1, 2]\n")),
            "line 1 is not a metrics row",
        ),
    ],
)
def test_report_bad_run_folder_is_one_line(tmp_path, capsys, make, message):
    run = tmp_path / "run"
    make(run)
    assert main(["report", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: ") and message in err, err
    assert not (run / "report").exists()
