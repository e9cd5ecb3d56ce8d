"""Scale-out (train.parallel) against one process, under torchrun on gloo: sharded data
parallel (FSDP2), hybrid sharding, tensor parallel (alone and under FSDP) and pipeline stages
(GPipe, 1F1B) give the single-process losses for the same global batch, and sharded checkpoints resume at another world size
(4 -> 2 -> 1 processes) or layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import read_metrics, torchrun

from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.config import ParallelConfig, build_config, stage_layers
from lmforge.model.gpt import GPT
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import init_distributed
from lmforge.train.optim import build_optimizers

GLOBAL_BATCH = 8  # sequences per optimizer step, whatever the world size
CPU = torch.device("cpu")


def _args(text_file: Path, run_dir: Path, name: str, world: int, *extra: str) -> list[str]:
    """`lmforge train` arguments of a 6-step tiny run whose global batch is GLOBAL_BATCH
    sequences (2 accumulation steps) over `world` data-parallel processes."""
    return [
        f"--data.path={text_file}",
        "--model.preset=tiny",
        "--train.max_steps=6",
        "--train.warmup_steps=2",
        f"--train.micro_batch_size={GLOBAL_BATCH // 2 // world}",
        "--train.grad_accum_steps=2",
        "--train.log_interval=1",
        "--train.eval_interval=2",
        "--train.eval_steps=2",
        "--train.ckpt_interval=2",
        "--train.keep_last=5",
        "--train.precision=fp32",
        "--run.tensorboard=false",
        "--run.sample_tokens=8",
        f"--run.dir={run_dir}",
        f"--run.name={name}",
        *extra,
    ]


def _losses(run_dir: Path) -> dict[tuple[str, int], float]:
    """{(key, step): value} of train loss, gradient norm (before clipping, over all shards)
    and val_loss; a resumed step's row replaces the first run's."""
    rows = read_metrics(run_dir)
    keys = ("loss", "grad_norm", "val_loss")
    return {(k, r["step"]): r[k] for r in rows for k in keys if k in r}


def _assert_close(got: dict, want: dict, steps: range) -> None:
    keys = [k for k in got if k[1] in steps]
    assert {k for k in want if k[1] in steps} == set(keys) and keys
    worst = max(abs(got[k] - want[k]) for k in keys)
    assert worst <= 1e-5, {k: (got[k], want[k]) for k in sorted(keys)}


def _point_latest(run_dir: Path, step: int) -> None:
    """Make the run resume from its checkpoint at `step`, as if it had stopped there."""
    (run_dir / "checkpoints" / ckpt.LATEST).write_text(f"step_{step:07d}\n")


@pytest.fixture(scope="module")
def single(text_file, tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("single")
    assert main(["train", *_args(text_file, runs, "one", 1)]) == 0
    return _losses(runs / "one")


UNTIED = "--model.tie_embeddings=false"  # a pipeline's embedding and head sit on two stages


@pytest.fixture(scope="module")
def single_untied(text_file, tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("single_untied")
    assert main(["train", *_args(text_file, runs, "one", 1, UNTIED)]) == 0
    return _losses(runs / "one")


def test_fsdp_matches_one_process_and_reshards_4_2_1(text_file, single, tmp_path):
    shard = "--train.parallel.dp_shard={}".format
    torchrun(4, "train", *_args(text_file, tmp_path, "fsdp", 4, shard(4)), cwd=tmp_path)
    run = tmp_path / "fsdp"
    _assert_close(_losses(run), single, range(0, 7))  # FSDP over 4 processes, Muon + AdamW
    step_2 = run / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in (step_2 / ckpt.SHARDED).glob("*.distcp")) == [
        f"__{r}_0.distcp" for r in range(4)
    ]
    # the gathered model.safetensors holds what the shards hold, and exports as one file
    exported = tmp_path / "exported"
    assert main(["export", f"--checkpoint={step_2}", "--format=lmforge", f"--out={exported}"]) == 0
    assert not (exported / ckpt.SHARDED).exists()
    cfg = build_config(step_2 / "config.yaml")
    from_shards = GPT(cfg.model)
    ckpt.load_sharded_state(step_2, from_shards, build_optimizers(from_shards, cfg.train, CPU))
    gathered = ckpt.load(exported)[0].state_dict()
    assert all(torch.equal(t, gathered[n]) for n, t in from_shards.state_dict().items())

    _point_latest(run, 2)  # resume at 2 processes, 2 shards
    resume = [f"--resume={run}", shard(2), f"--train.micro_batch_size={GLOBAL_BATCH // 4}"]
    torchrun(2, "train", *resume, cwd=tmp_path)
    _assert_close(_losses(run), single, range(3, 7))

    _point_latest(run, 4)  # and in one plain process
    assert main(["train", f"--resume={run}", shard(1), "--train.micro_batch_size=4"]) == 0
    _assert_close(_losses(run), single, range(5, 7))
    assert build_config(run / "config.yaml").train.parallel.dp_shard == 1


def test_whole_split_validation_on_sharded_ranks_matches_one_process(text_file, tmp_path):
    """train.eval_steps=0 scores the whole validation split: two FSDP ranks, each its share of
    the windows in as many forwards, report the one-process val_loss."""
    whole = "--train.eval_steps=0"
    assert main(["train", *_args(text_file, tmp_path, "one", 1, whole)]) == 0
    shard = "--train.parallel.dp_shard=2"
    torchrun(2, "train", *_args(text_file, tmp_path, "two", 2, whole, shard), cwd=tmp_path)
    val = {run: {k: v for k, v in _losses(tmp_path / run).items() if k[0] == "val_loss"}
           for run in ("one", "two")}  # fmt: skip
    assert val["one"].keys() == val["two"].keys() and len(val["one"]) == 4  # steps 0, 2, 4, 6
    assert max(abs(val["one"][k] - val["two"][k]) for k in val["one"]) <= 1e-5


def test_hybrid_sharding_with_adamw_matches_one_process(text_file, tmp_path):
    """HSDP: 2 replicas of 2 shards; AdamW's fused kernel on sharded parameters."""
    adamw = "--train.optimizer=adamw"
    layout = ["--train.parallel.dp_replicate=2", "--train.parallel.dp_shard=2"]
    torchrun(4, "train", *_args(text_file, tmp_path, "hsdp", 4, adamw, *layout), cwd=tmp_path)
    assert main(["train", *_args(text_file, tmp_path, "one", 1, adamw)]) == 0
    _assert_close(_losses(tmp_path / "hsdp"), _losses(tmp_path / "one"), range(0, 7))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_matches_one_process(schedule, text_file, single_untied, tmp_path):
    """2 stages, the step's 2 accumulation micro-batches through the schedule; the stages'
    checkpoint then resumes in one process."""
    layout = ["--train.parallel.pp=2", f"--train.parallel.pp_schedule={schedule}"]
    # both stages read the whole batch: the data-parallel size is 1
    argv = _args(text_file, tmp_path, "pp", 1, UNTIED, *layout)
    torchrun(2, "train", *argv, cwd=tmp_path)
    run = tmp_path / "pp"
    _assert_close(_losses(run), single_untied, range(0, 7))
    names = ckpt.load(run / "checkpoints" / "step_0000002")[0].state_dict().keys()
    assert "blocks.0.attn.q.weight" in names and "blocks.1.attn.q.weight" in names

    _point_latest(run, 2)
    assert main(["train", f"--resume={run}", "--train.parallel.pp=1"]) == 0
    _assert_close(_losses(run), single_untied, range(3, 7))


def test_tensor_parallel_matches_one_process(text_file, single, tmp_path):
    """GPT-2 style (learned positions, GELU, biases, a tied head kept whole) over 2 ranks."""
    torchrun(
        2, "train", *_args(text_file, tmp_path, "tp", 1, "--train.parallel.tp=2"), cwd=tmp_path
    )
    _assert_close(_losses(tmp_path / "tp"), single, range(0, 7))


LLAMA = ["--model.preset=llama-tiny", "--model.qk_norm=true"]  # SwiGLU, GQA, RoPE, QK-norm


def test_fsdp_with_tensor_parallel_matches_one_process(text_file, tmp_path):
    """Llama style, untied (vocabulary-parallel embedding and head): TP 2, then FSDP 2 x TP 2
    on 4 processes; the 2-D run's checkpoint resumes in one process."""
    assert main(["train", *_args(text_file, tmp_path, "one", 1, *LLAMA)]) == 0
    want = _losses(tmp_path / "one")
    tp = ["--train.parallel.tp=2"]
    torchrun(2, "train", *_args(text_file, tmp_path, "tp", 1, *LLAMA, *tp), cwd=tmp_path)
    _assert_close(_losses(tmp_path / "tp"), want, range(0, 7))
    layout = [*tp, "--train.parallel.dp_shard=2"]
    torchrun(4, "train", *_args(text_file, tmp_path, "2d", 2, *LLAMA, *layout), cwd=tmp_path)
    run = tmp_path / "2d"
    _assert_close(_losses(run), want, range(0, 7))
    _point_latest(run, 4)
    one = ["--train.parallel.tp=1", "--train.parallel.dp_shard=1", "--train.micro_batch_size=4"]
    assert main(["train", f"--resume={run}", *one]) == 0
    _assert_close(_losses(run), want, range(5, 7))


def test_layout_errors_are_one_line(text_file, tmp_path, capsys, monkeypatch):
    with pytest.raises(LmforgeError, match="does not multiply to the world size 3"):
        ParallelConfig(dp_shard=2).sizes(3)
    with pytest.raises(LmforgeError, match="dp_replicate and dp_shard are both -1"):
        ParallelConfig(dp_shard=-1)
    assert main(["train", *_args(text_file, tmp_path, "bad", 1, "--train.parallel.dp_shard=2")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not multiply to the world size 1" in err, err
    assert not (tmp_path / "bad").exists()
    # checked before any process group is made: a 2-process world without torchrun's rendezvous
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LmforgeError, match="lmforge sft does not shard"):
        init_distributed("cpu", ParallelConfig(dp_shard=2), unsharded_verb="lmforge sft")
    with pytest.raises(LmforgeError, match="lmforge dpo does not split the model"):
        init_distributed("cpu", ParallelConfig(pp=2), unsharded_verb="lmforge dpo")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(LmforgeError, match="combine tensor parallel with dp_shard"):
        init_distributed("cpu", ParallelConfig(dp_replicate=2, tp=2))
    for overrides, expected in (  # checked as the config is built: before any run folder
        (
            ["--model.preset=llama-tiny", "--train.parallel.tp=4"],
            "tp=4 does not divide model.n_kv_head=2",
        ),
        (
            ["--model.tie_embeddings=false", "--train.parallel.pp=3"],
            "pp=3 is more stages than model.n_layer=2",
        ),
        (
            ["--train.parallel.pp=2", "--train.grad_accum_steps=2"],
            "needs model.tie_embeddings=false",
        ),
        (
            ["--model.tie_embeddings=false", "--train.parallel.pp=2"],
            "1f1b needs train.grad_accum_steps >= pp",
        ),
    ):
        with pytest.raises(LmforgeError, match=expected):
            build_config({"model": {"preset": "tiny"}}, overrides=overrides)


def test_unsharded_checkpoint_resumes_sharded(text_file, single, tmp_path):
    """A single-process run's checkpoint (its optimizer states keyed by position) goes on
    under FSDP over 2 processes, as the uninterrupted run; here with the shards offloaded to
    host memory and kept gathered between forward and backward."""
    assert main(["train", *_args(text_file, tmp_path, "plain", 1)]) == 0
    run = tmp_path / "plain"
    _point_latest(run, 2)
    resume = [f"--resume={run}", "--train.parallel.dp_shard=2", "--train.micro_batch_size=2"]
    resume += ["--train.parallel.cpu_offload=true", "--train.parallel.reshard_after_forward=false"]
    torchrun(2, "train", *resume, cwd=tmp_path)
    _assert_close(_losses(run), single, range(3, 7))
    assert (run / "checkpoints" / "step_0000004" / ckpt.SHARDED).is_dir()


def test_stage_layers_split_evenly():
    assert [stage_layers(7, 3, s) for s in range(3)] == [range(0, 3), range(3, 5), range(5, 7)]
    assert [stage_layers(4, 4, s) for s in range(4)] == [range(i, i + 1) for i in range(4)]
