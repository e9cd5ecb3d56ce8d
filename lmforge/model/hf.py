"""Hugging Face conversion: GPT-2 family <-> GPT2LMHeadModel, Llama family <-> LlamaForCausalLM.

Both directions work on plain tensors and JSON (safetensors + config.json), so exporting and
importing do not need `transformers` installed; the tests check the result against it.

Layout differences handled here:
- GPT-2's Conv1D weights are (in, out): transposed relative to our nn.Linear.
- GPT-2's c_attn is one Conv1D for q, k and v, our three Linears' rows stacked (q | k | v);
  Llama's q_proj/k_proj/v_proj and gate_proj/up_proj/down_proj are ours one to one.
- Our RoPE rotates halves (HF's rotate_half), so no q/k permutation is needed.
- A GPT-2-family model without biases is exported with zero biases (GPT-2 always has them),
  which computes the same function; importing it back gives a model with (zero) biases.

Char and byte tokenizers are written as an equivalent `tokenizer.json` (a BPE model with no
merges: one token per character, or per byte through GPT-2's byte-to-unicode table), so the
exported folder loads with `AutoTokenizer` and encodes to the same ids.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmforge.common import LmforgeError
from lmforge.config import Config, ModelConfig, build_config
from lmforge.fileio import atomic_folder, contained
from lmforge.model.gpt import GPT
from lmforge.tokenizer import (
    EOT,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    post_processor_adds_bos,
)

SAFETENSORS = "model.safetensors"
PYTORCH_BIN = "pytorch_model.bin"
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "encoder.json")
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# Buffers some GPT-2/Llama checkpoints carry that are not weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


@dataclass(frozen=True)
class Rule:
    """One of our modules <-> one HF module; with `parts`, several of ours (`ours.part`, equal
    blocks of rows) stacked into one of theirs: GPT-2's c_attn holds our attn.q, k and v."""

    ours: str
    theirs: str
    transpose: bool = False  # GPT-2 Conv1D weight
    parts: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        """Our module names, in the order their rows stack."""
        return [f"{self.ours}.{part}" for part in self.parts] or [self.ours]


# ---------------------------------------------------------------- families and configs


def family(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama' for a config that HF can represent exactly; LmforgeError naming the
    features that have no HF equivalent otherwise (zero_init_proj is only an init: it
    exports)."""
    name = "llama" if cfg.mlp == "swiglu" else "gpt2"
    want = (
        {"norm": "rmsnorm", "pos_encoding": "rope"}
        if name == "llama"
        else {"norm": "layernorm", "pos_encoding": "learned"}
    )
    want["norm_position"] = "pre"
    problems = [
        f"{k}={getattr(cfg, k)} (needs {v})" for k, v in want.items() if getattr(cfg, k) != v
    ]
    if not cfg.causal:
        problems.append("causal=false (bidirectional attention; needs true)")
    if cfg.sliding_window is not None:
        problems.append(f"sliding_window={cfg.sliding_window} (needs none)")
    if name == "gpt2" and cfg.kv_heads != cfg.n_head:
        problems.append(f"n_kv_head={cfg.kv_heads} (GPT-2 has no grouped-query attention)")
    if cfg.mlp == "relu2":
        problems.append("mlp=relu2 (needs gelu or gelu_tanh)")
    if cfg.qk_norm:
        problems.append("qk_norm=true (needs false)")
    if cfg.logit_softcap is not None:
        problems.append(f"logit_softcap={cfg.logit_softcap} (needs none)")
    if cfg.low_rank is not None:
        problems.append(f"low_rank={cfg.low_rank} (factored Linears; needs none)")
    if name == "gpt2" and cfg.n_head * cfg.head_dim != cfg.d_model:
        problems.append(
            f"head_dim={cfg.head_dim} with n_head={cfg.n_head} (GPT-2's heads split d_model)"
        )
    if problems:
        arch = "LlamaForCausalLM" if name == "llama" else "GPT2LMHeadModel"
        raise LmforgeError(
            f"this model has no Hugging Face equivalent: as a {arch} it has unsupported "
            f"{', '.join(problems)}"
        )
    return name


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """ModelConfig -> the config.json of a GPT2LMHeadModel or LlamaForCausalLM. BOS/EOS ids
    come from the tokenizer: eos_token_id is a list when several ids stop generation, and a
    tokenizer without a BOS names its end-of-text id as BOS, as GPT-2 does."""
    eos: int | list[int] | None = None
    bos = None
    if tokenizer is not None:
        stop = list(tokenizer.stop_ids)
        eos = stop if len(stop) > 1 else tokenizer.eot_id
        bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
    common = {
        "vocab_size": cfg.vocab_size,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    if family(cfg) == "gpt2":
        return common | {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": cfg.block_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.ffn_hidden,
            "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.attention_dropout_rate,
        }
    return common | {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "max_position_embeddings": cfg.block_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # transformers 4.x reads rope_theta, 5.x rope_parameters: write both.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.attention_dropout_rate,
    }


def _unsupported(where: str, problems: list[str]) -> None:
    if problems:
        raise LmforgeError(f"{where} uses features lmforge does not support: {', '.join(problems)}")


def _gpt2_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    problems = [] if act in _GPT2_ACTIVATIONS else [f"activation_function={act}"]
    for key, ok in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if hf.get(key, ok) != ok:
            problems.append(f"{key}={hf[key]}")
    _unsupported(where, problems)
    attn_pdrop = hf.get("attn_pdrop", 0.1)
    return {
        "preset": "custom",
        "mlp": _GPT2_ACTIVATIONS[act],
        "norm": "layernorm",
        "pos_encoding": "learned",
        "bias": True,
        "block_size": hf.get("n_positions", 1024),
        "d_model": hf.get("n_embd", 768),
        "n_layer": hf.get("n_layer", 12),
        "n_head": hf.get("n_head", 12),
        "head_size": None,
        "n_kv_head": None,
        "ffn_hidden": hf.get("n_inner"),
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "dropout": hf.get("resid_pdrop", 0.1),  # HF's embedding and residual rates share one
        "attention_dropout": None if attn_pdrop == hf.get("resid_pdrop", 0.1) else attn_pdrop,
        "tie_embeddings": hf.get("tie_word_embeddings", True),
    }


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    _unsupported(where, [] if kind == "default" else [f"RoPE scaling '{kind}'"])
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    d, nh = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']}")
    bias = hf.get("attention_bias", False)
    if hf.get("mlp_bias", False) != bias:
        problems.append(f"attention_bias={bias} with mlp_bias={hf.get('mlp_bias', False)}")
    theta = _rope_theta(hf, where)
    _unsupported(where, problems)
    return {
        "preset": "custom",
        "mlp": "swiglu",
        "norm": "rmsnorm",
        "pos_encoding": "rope",
        "rope_theta": theta,
        "bias": bias,
        "block_size": hf.get("max_position_embeddings", 2048),
        "d_model": d,
        "n_layer": hf.get("num_hidden_layers", 32),
        "n_head": nh,
        "head_size": None if hf.get("head_dim") in (None, d // nh) else hf["head_dim"],
        "n_kv_head": hf.get("num_key_value_heads") or nh,
        "ffn_hidden": hf.get("intermediate_size", 11008),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "dropout": hf.get("attention_dropout", 0.0),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
    }


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> Config:
    """A HF config.json (as a dict) -> a full lmforge Config whose model fields all come from
    it (preset 'custom': every field is set explicitly)."""
    kind = hf.get("model_type")
    readers = {"gpt2": _gpt2_fields, "llama": _llama_fields}
    if kind not in readers:
        raise LmforgeError(
            f"{where}: model_type {kind!r} is not supported (supported: gpt2, llama)"
        )
    fields = readers[kind](hf, where)
    fields["vocab_size"] = hf.get("vocab_size", 50257 if kind == "gpt2" else 32000)
    fields["init_std"] = hf.get("initializer_range", 0.02)
    fields["norm_position"] = "pre"
    fields["sliding_window"] = None
    fields |= {"qk_norm": False, "logit_softcap": None, "zero_init_proj": False, "causal": True}
    fields["low_rank"] = None
    return build_config({"model": fields})


# ---------------------------------------------------------------- state dicts


def _rules(cfg: ModelConfig) -> list[Rule]:
    if family(cfg) == "gpt2":
        rules = [Rule("wte", "transformer.wte"), Rule("wpe", "transformer.wpe")]
        for i in range(cfg.n_layer):
            h = f"transformer.h.{i}"
            rules += [
                Rule(f"blocks.{i}.norm1", f"{h}.ln_1"),
                Rule(f"blocks.{i}.attn", f"{h}.attn.c_attn", transpose=True, parts=("q", "k", "v")),
                Rule(f"blocks.{i}.attn.proj", f"{h}.attn.c_proj", transpose=True),
                Rule(f"blocks.{i}.norm2", f"{h}.ln_2"),
                Rule(f"blocks.{i}.mlp.fc", f"{h}.mlp.c_fc", transpose=True),
                Rule(f"blocks.{i}.mlp.proj", f"{h}.mlp.c_proj", transpose=True),
            ]
        rules.append(Rule("norm_f", "transformer.ln_f"))
    else:
        rules = [Rule("wte", "model.embed_tokens")]
        for i in range(cfg.n_layer):
            h = f"model.layers.{i}"
            rules += [
                Rule(f"blocks.{i}.norm1", f"{h}.input_layernorm"),
                *(Rule(f"blocks.{i}.attn.{p}", f"{h}.self_attn.{p}_proj") for p in "qkv"),
                Rule(f"blocks.{i}.attn.proj", f"{h}.self_attn.o_proj"),
                Rule(f"blocks.{i}.norm2", f"{h}.post_attention_layernorm"),
                Rule(f"blocks.{i}.mlp.gate", f"{h}.mlp.gate_proj"),
                Rule(f"blocks.{i}.mlp.up", f"{h}.mlp.up_proj"),
                Rule(f"blocks.{i}.mlp.proj", f"{h}.mlp.down_proj"),
            ]
        rules.append(Rule("norm_f", "model.norm"))
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head", "lm_head"))
    return rules


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights -> HF tensor names and layouts; each tensor owns its memory (safetensors
    refuses tensors that share storage). A tied head is left out, as HF does."""
    cfg, sd = model.config, model.state_dict()
    zero_bias = family(cfg) == "gpt2" and not cfg.bias  # GPT-2 always has biases
    out: dict[str, torch.Tensor] = {}
    for rule in _rules(cfg):
        weight = _stacked([sd[f"{name}.weight"].detach() for name in rule.names])  # (out, in)
        out[f"{rule.theirs}.weight"] = weight.t() if rule.transpose else weight
        bias = None
        if f"{rule.names[0]}.bias" in sd:
            bias = _stacked([sd[f"{name}.bias"].detach() for name in rule.names])
        elif zero_bias and not rule.ours.startswith(("wte", "wpe", "lm_head")):
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
        if bias is not None:
            out[f"{rule.theirs}.bias"] = bias
    return {name: t.contiguous().clone() for name, t in out.items()}


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict for GPT(cfg). Unknown HF tensors are an error naming them,
    so a model with features we do not convert is never silently half-loaded."""
    hf_sd = _normalize_gpt2_names(hf_sd) if family(cfg) == "gpt2" else dict(hf_sd)
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for rule in _rules(cfg):
        for suffix in ("weight", "bias"):
            name = f"{rule.theirs}.{suffix}"
            if name not in hf_sd:
                if suffix == "bias":
                    continue
                raise LmforgeError(f"Hugging Face weights lack {name}")
            tensor = hf_sd[name]
            if rule.transpose and suffix == "weight":
                tensor = tensor.t()  # (out, in)
            parts = tensor.chunk(len(rule.names)) if rule.parts else [tensor]
            # parts are clones: parameters that shared one storage could not be saved
            out |= {
                f"{ours}.{suffix}": part.clone() if rule.parts else part
                for ours, part in zip(rule.names, parts)
            }
            used.add(name)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
        used.add("lm_head.weight")
    extra = sorted(n for n in set(hf_sd) - used if not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise LmforgeError(
            f"Hugging Face weights hold tensors lmforge cannot convert: {', '.join(extra[:3])}"
            + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        )
    return out


def _normalize_gpt2_names(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original GPT-2 checkpoints name tensors without the `transformer.` prefix."""
    if any(name.startswith("transformer.") for name in hf_sd):
        return dict(hf_sd)
    return {n if n.startswith("lm_head.") else f"transformer.{n}": t for n, t in hf_sd.items()}


# ---------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (byte-level BPE alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), 256),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _as_hf_tokenizer(tokenizer: Tokenizer):
    """Any lmforge tokenizer -> an equivalent `tokenizers.Tokenizer` (same ids both ways)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tok
    if isinstance(tokenizer, CharTokenizer):
        tok = HFTok(models.BPE(vocab={c: i for i, c in enumerate(tokenizer.chars)}, merges=[]))
        tok.decoder = decoders.Fuse()
    elif isinstance(tokenizer, ByteTokenizer):
        vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
        tok = HFTok(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
    else:
        raise LmforgeError(
            f"cannot export a {type(tokenizer).__name__} as a Hugging Face tokenizer"
        )
    if tokenizer.eot_id is not None:
        tok.add_special_tokens([EOT])  # gets the next id: eot_id
    return tok


def _with_bos_as_encoded(tokenizer: HFTokenizer):
    """A copy of the `tokenizers.Tokenizer` whose post-processor adds BOS exactly when our
    encode does: transformers 5 follows tokenizer.json's post-processor, not add_bos_token."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import processors

    tok, bos = tokenizer.tok, tokenizer.bos_id
    if bos is None or post_processor_adds_bos(tok, bos) == tokenizer.add_bos:
        return tok
    tok = HFTok.from_str(tok.to_str())
    if tokenizer.add_bos:
        name = tok.id_to_token(bos)
        single, pair, special = f"{name} $A", f"{name} $A {name}:1 $B:1", [(name, bos)]
    else:
        single, pair, special = "$A", "$A $B:1", []
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special
    )
    return tok


def save_hf_tokenizer(tokenizer: Tokenizer, folder: Path, max_length: int) -> None:
    """tokenizer.json + a tokenizer_config.json so that AutoTokenizer can load the folder and
    encodes as lmforge does, BOS and EOS included."""
    if isinstance(tokenizer, HFTokenizer):
        _with_bos_as_encoded(tokenizer).save(str(folder / "tokenizer.json"))
        config = tokenizer.hf_tokenizer_config(max_length)
    else:
        _as_hf_tokenizer(tokenizer).save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length}
        if tokenizer.eot_id is not None:
            config |= {"bos_token": EOT, "eos_token": EOT}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def load_hf_tokenizer(folder: Path) -> Tokenizer | None:
    """The folder's tokenizer.json or GPT-2 vocab.json/merges.txt (encoder.json/vocab.bpe), or None."""
    if not any((folder / name).is_file() for name in HF_TOKENIZER_FILES):
        return None
    return load_tokenizer(folder)


# ---------------------------------------------------------------- folders


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One weights file -> tensors. Any parse failure of this untrusted file is a user error."""
    try:
        if path.suffix == ".safetensors":
            weights = load_file(str(path))
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LmforgeError(
            f"cannot read weights {path}: not a plain tensor file (corrupt, or it holds objects "
            "lmforge refuses to unpickle; convert it to safetensors)"
        ) from None
    except Exception as e:  # corrupt files raise anything from KeyError to SafetensorError
        first = str(e).strip().splitlines()
        raise LmforgeError(
            f"cannot read weights {path}: {first[0] if first else repr(e)}"
        ) from None
    if not isinstance(weights, dict) or not all(
        isinstance(t, torch.Tensor) for t in weights.values()
    ):
        raise LmforgeError(f"{path} does not hold a state dict of tensors")
    return weights


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, pytorch_model.bin (never unpickling code), or a sharded index of either."""
    for name in (SAFETENSORS, PYTORCH_BIN):
        if (folder / name).is_file():
            return _read_weight_file(folder / name)
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()), key=str)
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise LmforgeError(f"{index} is not a weights index (no weight_map)") from None
            # Shard names come from a downloaded file: never let one reach outside the folder.
            shards = [contained(folder, n, f"shard name in {index.name}") for n in names]
            merged: dict[str, torch.Tensor] = {}
            for shard in shards:
                merged |= _read_weight_file(shard)
            return merged
    raise LmforgeError(f"no weights in {folder} (expected {SAFETENSORS} or {PYTORCH_BIN})")


def _read_hf_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise LmforgeError(f"Hugging Face model folder not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise LmforgeError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path} does not hold a JSON object")
    return data


def load_hf(folder: str | Path) -> tuple[GPT, Config, Tokenizer | None]:
    """A HF GPT-2 or Llama folder -> (our model in eval mode, its Config, its tokenizer or None)."""
    folder = Path(folder)
    cfg = model_config_from_hf(_read_hf_config(folder), where=str(folder / "config.json"))
    with torch.device("meta"):  # shapes only: no random init of weights about to be replaced
        model = GPT(cfg.model)
    state = from_hf_state_dict(read_hf_weights(folder), cfg.model)
    try:
        missing, unexpected = model.assign_weights(state)
    except RuntimeError as e:
        detail = next(
            (ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln),
            str(e).splitlines()[0],
        )
        raise LmforgeError(f"weights in {folder} do not fit its config.json: {detail}") from None
    if missing or unexpected:
        raise LmforgeError(
            f"weights in {folder} do not fit its config.json: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    return model.eval(), cfg, load_hf_tokenizer(folder)


def save_hf(model: GPT, tokenizer: Tokenizer | None, folder: str | Path) -> None:
    """Write config.json + model.safetensors (+ tokenizer files) into an existing folder."""
    folder = Path(folder)
    config = hf_config(model.config, tokenizer)
    (folder / "config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True), encoding="utf-8"
    )
    save_file(to_hf_state_dict(model), str(folder / SAFETENSORS), metadata={"format": "pt"})
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, folder, model.config.block_size)


def check_out_free(out: Path) -> None:
    """Refuse to write into anything that already holds files: nothing the user has is replaced."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmforgeError(f"--out {out} already exists and is not empty; choose a new folder")


def export_hf(checkpoint: str | Path, out: str | Path, merge: bool = False) -> tuple[Path, str]:
    """lmforge checkpoint (or run folder) -> HF folder, written under a temporary name and
    renamed when complete. An adapter checkpoint needs merge=True (LoRA only). Returns
    (folder, family)."""
    from lmforge.train.checkpoint import load_plain

    out = Path(out)
    check_out_free(out)
    model, tokenizer, cfg = load_plain(checkpoint, merge)
    if cfg.quantize.method != "none":
        raise LmforgeError(
            f"{checkpoint} is quantized ({cfg.quantize.method}); export the float checkpoint"
        )
    kind = family(model.config)
    with atomic_folder(out) as tmp:  # replaces `out` only if it is an empty folder (checked)
        save_hf(model, tokenizer, tmp)
    return out, kind


def import_hf(folder: str | Path, out: str | Path) -> tuple[Path, Tokenizer | None]:
    """HF GPT-2/Llama folder -> lmforge checkpoint folder. Returns (checkpoint, tokenizer)."""
    from lmforge.train.checkpoint import save_checkpoint

    out = Path(out)
    check_out_free(out)
    model, cfg, tokenizer = load_hf(folder)
    return save_checkpoint(out, model, cfg, tokenizer), tokenizer
