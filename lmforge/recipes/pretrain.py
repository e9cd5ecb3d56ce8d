"""The pretraining recipe: causal-LM data + next-token loss on the one Trainer, or with
train.objective=mlm masked-LM data (lmforge/data/mlm.py) + MaskedLMLoss (BERT).

`train(cfg)` builds the run from the config (data, tokenizer, model, loaders), trains,
evaluates, checkpoints and prints a sample; `lmforge train` (lmforge/cli/train.py) calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lmforge.common import LmforgeError, print0, seed_everything
from lmforge.config import Config
from lmforge.data.loader import (
    PretrainData,
    RandomWindowLoader,
    load_pretrain_data,
    whole_split_batches,
)
from lmforge.data.mlm import Masker, MaskingLoader, MLMTokens, SentencePairLoader, mlm_vocab_size
from lmforge.data.packing import document_fields
from lmforge.model.gpt import GPT
from lmforge.recipes.run import run_folder
from lmforge.tokenizer import Tokenizer, load_tokenizer
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import DistInfo, destroy_distributed, init_distributed
from lmforge.train.losses import Batch, CausalLMLoss, LossFn, MaskedLMLoss
from lmforge.train.trainer import Trainer


def train(
    cfg: Config,
    resume: str | Path | None = None,
    on_eval: Callable[[dict[str, Any]], bool] | None = None,
    start: tuple[GPT, Tokenizer] | None = None,
) -> dict[str, Any]:
    """Pretrain per `cfg` (or continue the run folder `resume`). Returns the last metrics.
    `on_eval` sees each evaluation row and may stop the run (Trainer's docstring). `start`
    (model, tokenizer) trains that model, in place, instead of a fresh one of cfg.model: a
    pruned model's recovery fine-tune (lmforge/compress/recover.py)."""
    info = init_distributed(cfg.run.device, cfg.train.parallel)
    try:
        seed_everything(cfg.train.seed)
        resume_ckpt = ckpt.resolve_checkpoint(resume) if resume else None
        tokenizer = start[1] if start else None
        if resume_ckpt and (resume_ckpt / ckpt.TOKENIZER).is_dir():
            tokenizer = load_tokenizer(resume_ckpt / ckpt.TOKENIZER)
        data = load_pretrain_data(cfg.data, tokenizer)
        mlm = cfg.train.objective == "mlm"
        if not cfg.model.causal and not mlm:
            raise LmforgeError(
                "model.causal=false needs train.objective=mlm: a bidirectional model would see "
                "the next tokens it is asked to predict"
            )
        vocab = data.tokenizer.vocab_size
        needed = mlm_vocab_size(vocab) if mlm else vocab
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = needed
        elif cfg.model.vocab_size < needed:
            raise LmforgeError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                f"{vocab}" + (f" plus the masked LM's reserved ids ({needed})" if mlm else "")
            )
        model = start[0] if start else GPT(cfg.model)
        if info.enabled:
            torch.manual_seed(cfg.train.seed + info.rank)  # distinct dropout per rank
        run_dir = run_folder(cfg, resume, info)
        train_loader, validation = loaders(cfg, data, info)
        loss_fn, eval_loss_fn = _losses(cfg, vocab)
        trainer = Trainer(
            cfg,
            model,
            train_loader,
            validation,
            run_dir,
            info,
            loss_fn=loss_fn,
            eval_loss_fn=eval_loss_fn,
            tokenizer=data.tokenizer,
            bytes_per_token=None if mlm else data.bytes_per_token,  # MLM loss is not per byte
            on_eval=on_eval,
        )
        trainer.resume(resume_ckpt)
        n_params = model.num_params()
        print0(
            f"run {run_dir}: {n_params / 1e6:.2f}M parameters, device {info.device}, "
            f"precision {trainer.precision}, world size {info.layout}"
        )
        result = trainer.fit()
        if info.sharded:  # the sample runs on rank 0 alone: a plain copy of the weights
            model = ckpt.gather_model(trainer.model, cfg)
        if info.is_main:
            report(cfg, model, data.tokenizer, run_dir, result)
        return result
    finally:
        destroy_distributed()


def loaders(
    cfg: Config, data: PretrainData, info: DistInfo
) -> tuple[Any, Callable[[], Iterator[Batch]]]:
    """(train loader, a function giving the validation batches) of the pretraining data. Data
    shorter than a window is an error."""
    for split, arrays in (("train", data.train), ("validation", data.val)):
        if max(len(a) for a in arrays) <= cfg.model.block_size:
            raise LmforgeError(
                f"data too short: the {split} split has {sum(len(a) for a in arrays)} "
                f"tokens, fewer than model.block_size+1={cfg.model.block_size + 1}; "
                "add data or lower model.block_size"
            )
    train_loader = _loader(cfg, data.train, cfg.train.seed, data.tokenizer, info)
    return train_loader, lambda: val_batches(cfg, data, info)


def val_batches(cfg: Config, data: PretrainData, info: DistInfo) -> Iterator[Batch]:
    """The validation batches, the same at every evaluation: train.eval_steps batches drawn
    as training draws its own, or with eval_steps=0 the whole split, every token once."""
    if cfg.train.eval_steps == 0:
        batches = whole_split_batches(
            data.val, cfg.model.block_size, cfg.train.micro_batch_size, info.dp_rank, info.dp_size
        )
        if cfg.data.within_document:  # attention kept inside documents, as in training
            batches = [b | document_fields(b["input_ids"], data.tokenizer.eot_id) for b in batches]
        yield from batches
        return
    loader = _loader(cfg, data.val, cfg.train.seed + 1, data.tokenizer, info)
    for _ in range(cfg.train.eval_steps):
        yield loader.next_step(1)[0]


def _losses(cfg: Config, tokenizer_vocab: int) -> tuple[LossFn, LossFn]:
    """(training loss, evaluation loss) of the objective; label smoothing trains only."""
    smoothing = cfg.train.label_smoothing
    if cfg.train.objective == "causal":
        return CausalLMLoss(smoothing), CausalLMLoss()
    tokens = MLMTokens.after(tokenizer_vocab)
    nsp_ids = (tokens.is_next, tokens.not_next) if cfg.train.nsp else None
    return MaskedLMLoss(nsp_ids, smoothing), MaskedLMLoss(nsp_ids)


def _loader(cfg: Config, arrays, seed: int, tokenizer, info):
    """The pretraining windows (masked for objective=mlm), or with train.nsp sentence pairs."""
    t = cfg.train
    if t.objective == "causal":
        return _windows(cfg, arrays, seed, tokenizer, info)
    if t.nsp:
        tokens = MLMTokens.after(tokenizer.vocab_size)
        args = (t.micro_batch_size, seed, tokens, info.dp_rank, info.dp_size)
        inner = SentencePairLoader(arrays, cfg.model.block_size, *args)
    else:
        inner = _windows(cfg, arrays, seed, tokenizer, info)
    masker = Masker.for_tokenizer(tokenizer, t.mask_prob)
    return MaskingLoader(inner, masker, seed, info.dp_rank, info.dp_size)


def _windows(cfg: Config, arrays, seed: int, tokenizer, info):
    """data.sampling=random: nanoGPT's random windows; packed: every window once per epoch."""
    t, block = cfg.train, cfg.model.block_size
    if cfg.data.sampling == "packed":
        from lmforge.data.packing import PackedLoader

        return PackedLoader(
            arrays,
            block,
            t.micro_batch_size,
            seed,
            info.dp_rank,
            info.dp_size,
            within_document=cfg.data.within_document,
            eot_id=tokenizer.eot_id,
        )
    return RandomWindowLoader(arrays, block, t.micro_batch_size, seed, info.dp_rank, info.dp_size)


def report(cfg: Config, model: GPT, tokenizer, run_dir: Path, result: dict[str, Any]) -> None:
    """Print a sample from the trained model and where everything was written."""
    from lmforge.engine import Engine, SamplingParams

    if cfg.run.sample_tokens > 0 and cfg.model.causal:  # a masked LM does not generate
        prompt = tokenizer.encode("\n") if tokenizer.kind != "hf" else [tokenizer.eot_id or 0]
        params = SamplingParams(
            max_new_tokens=cfg.run.sample_tokens, temperature=0.8, top_k=200, seed=cfg.train.seed
        )
        ids = Engine(model.eval()).generate([prompt], params)[0]
        print0("\n--- sample ---\n" + tokenizer.decode(ids) + "\n--------------")
    ev = result.get("eval") or {}
    if ev and cfg.train.objective == "mlm":
        nsp = f", NSP accuracy {ev['val_nsp_accuracy']:.1%}" if cfg.train.nsp else ""
        print0(
            f"final val_mlm_loss {ev['val_mlm_loss']:.4f}, masked-token accuracy "
            f"{ev['val_mlm_accuracy']:.1%}{nsp}"
        )
    elif ev:
        print0(
            f"final val_loss {ev['val_loss']:.4f} (ppl {ev['val_ppl']:.2f}"
            + (f", bpb {ev['val_bpb']:.4f})" if "val_bpb" in ev else ")")
        )
    where = ckpt.latest_checkpoint(run_dir) or run_dir
    use = (
        f"generate:   lmforge generate --checkpoint {run_dir} --prompt 'ROMEO:'"
        if cfg.model.causal
        else f"fine-tune:  lmforge classify --base {run_dir} --data FILE"
    )
    print0(
        f"run folder: {run_dir}  (config.yaml, metrics.jsonl, tensorboard/)\n"
        f"checkpoint: {where}\n{use}"
    )
