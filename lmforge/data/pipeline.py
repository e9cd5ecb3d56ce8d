"""`lmforge prepare`: raw sources -> cleaned, deduplicated, mixed token shards, with a report.

Stages, each cached under `OUT/.work/<stage>-<key>/` (key = hash of the stage's inputs and
settings; a folder appears under its final name only when complete, so an interrupted run
resumes from the last finished stage):

1. docs      collect -> clean -> dedup (exact + MinHash LSH, across all sources); cleaning and
             signatures run on all cores, dedup decisions stream in the main process
2. tokenizer train a byte-level BPE on the train documents (`train:VOCAB`) or load one
3. ids       tokenise each source's documents (uint32 ids + offsets)
4. shards    train/val split by document, weighted mixture sampled with a seed, shards +
             manifest.json (written last) + report.json in OUT
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmforge.common import LmforgeError
from lmforge.config import dataclass_keys, read_yaml
from lmforge.data.clean import CleanConfig, Cleaner
from lmforge.data.collect import (
    CollectStats,
    FetchConfig,
    SourceConfig,
    iter_documents,
    resolve_paths,
)
from lmforge.data.dedup import DedupConfig, Deduplicator, MinHasher, exact_key
from lmforge.data.shards import (
    FORMAT,
    MANIFEST,
    REPORT,
    TOKENIZER_DIR,
    ShardWriter,
    token_dtype,
    write_json,
)
from lmforge.tokenizer import (
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_hash,
    train_bpe,
)

WORK = ".work"
_BATCH = 256  # documents per worker task


@dataclass
class PrepareConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    tokenizer: str = "train:8192"
    """train:VOCAB (byte-level BPE trained on the cleaned train documents), char, byte, or a
    tokenizer folder."""
    tokenizer_sample_bytes: int = 500_000_000
    """At most this much text (drawn round-robin from the sources) trains the tokenizer."""
    val_fraction: float = 0.05
    """Share of each source's documents held out for validation (at least one per source)."""
    seed: int = 1337
    """Fixes the validation split and the mixture's sampling."""
    total_tokens: int = 0
    """Training tokens to write when sources have weights; 0 = as many as the sources hold."""
    tokens_per_shard: int = 100_000_000
    workers: int = 0
    """Processes for cleaning and MinHash; 0 = all cores."""

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise LmforgeError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        weights = [s.weight for s in self.sources]
        if any(w is None for w in weights) and any(w is not None for w in weights):
            raise LmforgeError("give every source a weight, or none (natural proportions)")
        if weights and all(w is not None for w in weights) and sum(weights) <= 0:
            raise LmforgeError("source weights must not all be zero")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise LmforgeError(f"source names must be unique, got {names}")


# ---------------------------------------------------------------- config


def load_prepare_config(path: str | Path | None = None, **overrides: Any) -> PrepareConfig:
    """Defaults <- YAML file <- keyword overrides, type-checked; unknown keys name the nearest one."""
    layers: list[dict[str, Any]] = []
    base = Path(".")
    if path:
        path = Path(path)
        data = read_yaml(path)
        layers.append(data)
        base = path.parent
    layers.append({k: v for k, v in overrides.items() if v is not None})
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PrepareConfig), *layers)
        cfg: PrepareConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        if isinstance(e.__cause__, LmforgeError):
            raise e.__cause__ from None
        key = getattr(e, "full_key", "") or ""
        plain = ".".join(
            p for p in key.replace("[", ".").replace("]", "").split(".") if not p.isdigit()
        )
        near = difflib.get_close_matches(
            plain,
            dataclass_keys(PrepareConfig) + dataclass_keys(SourceConfig, "sources."),
            n=1,
        )
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise LmforgeError(f"prepare config key '{key}': {str(e).splitlines()[0]}{hint}") from None
    # relative paths: from the working directory, else from the YAML's folder
    for src in cfg.sources:
        src.paths = [
            p
            if Path(p).exists()
            or any(c in p for c in "*?[")
            or "://" in p
            or not (base / p).exists()
            else str(base / p)
            for p in src.paths
        ]
    return cfg


def source_clean_config(cfg: PrepareConfig, src: SourceConfig) -> CleanConfig:
    known = {f.name for f in dataclasses.fields(CleanConfig)}
    for key in src.clean:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise LmforgeError(f"source {src.name!r}: unknown clean setting '{key}'{hint}")
    return dataclasses.replace(cfg.clean, **src.clean)


# ---------------------------------------------------------------- stage cache


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(src: SourceConfig) -> list[Any]:
    out = []
    for p in resolve_paths(src.paths):
        if "://" in p:
            out.append(p)
        else:
            st = os.stat(p)
            out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


class Stage:
    """A cached stage folder: work happens in `.tmp-<name>`, renamed to `<name>` when done."""

    def __init__(self, work: Path, stage: str, key: str):
        self.final = work / f"{stage}-{key}"
        self.tmp = work / f".tmp-{stage}-{key}"
        self.stage = stage

    @property
    def done(self) -> bool:
        return self.final.is_dir()

    def begin(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def commit(self) -> Path:
        os.replace(self.tmp, self.final)
        for old in self.final.parent.glob(f"{self.stage}-*"):  # older versions of this stage
            if old != self.final:
                shutil.rmtree(old, ignore_errors=True)
        return self.final


# ---------------------------------------------------------------- stage 1: docs

_worker_state: dict[str, Any] = {}


def _worker_init(cleaners: list[CleanConfig], dedup: DedupConfig) -> None:
    _worker_state["cleaners"] = [Cleaner(c) for c in cleaners]
    _worker_state["hasher"] = (
        MinHasher(dedup.num_perm, dedup.shingle_size, dedup.seed) if dedup.near else None
    )


def _clean_batch(task: tuple[int, list[tuple[str, str]]]) -> tuple[int, list[tuple[Any, ...]]]:
    """In a worker: clean each document and precompute its dedup keys."""
    src_idx, docs = task
    cleaner: Cleaner = _worker_state["cleaners"][src_idx]
    hasher: MinHasher | None = _worker_state["hasher"]
    out = []
    for text, kind in docs:
        res = cleaner.clean(text, kind)
        if res.text is None:
            out.append((None, res.reason, 0, None, None))
        else:
            sig = hasher.signature(res.text) if hasher else None
            out.append((res.text, None, res.pii, exact_key(res.text), sig))
    return src_idx, out


def _bounded_imap(fn: Callable, tasks: Iterable, pool: Any, in_flight: int) -> Iterator:
    """Ordered map over a pool that keeps at most `in_flight` tasks queued (Pool.imap would
    read the whole input ahead, unbounded memory)."""
    if pool is None:
        for t in tasks:
            yield fn(t)
        return
    queue: deque = deque()
    for t in tasks:
        queue.append(pool.apply_async(fn, (t,)))
        if len(queue) >= in_flight:
            yield queue.popleft().get()
    while queue:
        yield queue.popleft().get()


def _doc_batches(
    cfg: PrepareConfig, stats: dict[str, CollectStats], origins: deque
) -> Iterator[tuple[int, list]]:
    for i, src in enumerate(cfg.sources):
        batch: list[tuple[str, str]] = []
        for doc in iter_documents(src, stats[src.name], cfg.fetch):
            batch.append((doc.text, doc.kind))
            origins.append(doc.origin)
            if len(batch) == _BATCH:
                yield i, batch
                batch = []
        if batch:
            yield i, batch


class _JsonlZstWriter:
    def __init__(self, path: Path):
        import zstandard

        self._raw = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._w = zstandard.ZstdCompressor(level=3).stream_writer(self._raw)
        self.count = 0
        self.bytes = 0

    def write(self, text: str) -> None:
        line = json.dumps({"text": text}, ensure_ascii=False).encode("utf-8") + b"\n"
        self._w.write(line)
        self.count += 1
        self.bytes += len(text.encode("utf-8"))

    def close(self) -> None:
        self._w.flush()
        self._w.close()


def read_docs(path: Path) -> Iterator[str]:
    import zstandard

    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as r:
        for line in io.TextIOWrapper(r, encoding="utf-8"):
            yield json.loads(line)["text"]


def _progress(desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, mininterval=1.0, disable=None, dynamic_ncols=True)


def stage_docs(cfg: PrepareConfig, out: Path) -> tuple[Path, dict[str, Any]]:
    """Collect, clean and deduplicate every source -> `<source>.jsonl.zst` + stats.json."""
    cleaners = [source_clean_config(cfg, s) for s in cfg.sources]
    key = _digest(
        [
            [dataclasses.asdict(s) for s in cfg.sources],
            [_fingerprint(s) for s in cfg.sources],
            [dataclasses.asdict(c) for c in cleaners],
            dataclasses.asdict(cfg.dedup),
            dataclasses.asdict(cfg.fetch),
        ]
    )
    stage = Stage(out / WORK, "docs", key)
    if stage.done:
        return stage.final, json.loads((stage.final / "stats.json").read_text())
    tmp = stage.begin()
    collect = {s.name: CollectStats() for s in cfg.sources}
    drops = {s.name: Counter() for s in cfg.sources}
    pii = Counter()
    writers = {s.name: _JsonlZstWriter(tmp / f"{s.name}.jsonl.zst") for s in cfg.sources}
    dedup = Deduplicator(cfg.dedup) if cfg.dedup.exact or cfg.dedup.near else None
    origins: deque = deque()
    workers = cfg.workers or os.cpu_count() or 1
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, _worker_init, (cleaners, cfg.dedup)) if workers > 1 else None
    if pool is None:
        _worker_init(cleaners, cfg.dedup)
    bar = _progress("clean+dedup", "doc")
    try:
        batches = _doc_batches(cfg, collect, origins)
        for src_idx, results in _bounded_imap(_clean_batch, batches, pool, 2 * workers):
            name = cfg.sources[src_idx].name
            for text, reason, n_pii, ekey, sig in results:
                origin = origins.popleft()
                if text is not None and dedup is not None:
                    reason = dedup.check(text, origin, ekey, sig)
                if reason:
                    drops[name][reason] += 1
                    continue
                pii[name] += n_pii
                writers[name].write(text)
            bar.update(len(results))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        for w in writers.values():
            w.close()
    stats = {
        s.name: {
            "documents_in": sum(drops[s.name].values()) + writers[s.name].count,
            "documents_out": writers[s.name].count,
            "bytes_out": writers[s.name].bytes,
            "dropped": dict(sorted(drops[s.name].items())),
            "collect": dict(sorted(collect[s.name].counts.items())),
            "pii_replaced": pii[s.name],
            "urls": collect[s.name].urls,
            "warnings": collect[s.name].warnings[:20],
        }
        for s in cfg.sources
    }
    stats["_dedup"] = dedup.stats.report() if dedup else {}
    write_json(tmp / "stats.json", stats)
    return stage.commit(), stats


# ---------------------------------------------------------------- split


def val_mask(n: int, fraction: float, seed: int, name: str) -> np.ndarray:
    """Which of a source's n documents are held out: round(n * fraction) of them (at least one
    when the source has two or more), chosen with a seed; the same for every stage."""
    mask = np.zeros(n, dtype=bool)
    if n < 2 or fraction <= 0:
        return mask
    k = min(n - 1, max(1, round(n * fraction)))
    rng = np.random.default_rng(
        [seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")]
    )
    mask[rng.choice(n, size=k, replace=False)] = True
    return mask


def _train_docs(
    docs: Path, cfg: PrepareConfig, stats: dict[str, Any], src: SourceConfig
) -> Iterator[str]:
    mask = val_mask(stats[src.name]["documents_out"], cfg.val_fraction, cfg.seed, src.name)
    for i, text in enumerate(read_docs(docs / f"{src.name}.jsonl.zst")):
        if not mask[i]:
            yield text


# ---------------------------------------------------------------- stage 2: tokenizer


def _round_robin(iterators: list[Iterator[str]], max_bytes: int) -> Iterator[str]:
    used = 0
    live = list(iterators)
    while live and used < max_bytes:
        for it in list(live):
            text = next(it, None)
            if text is None:
                live.remove(it)
                continue
            used += len(text)
            yield text


def stage_tokenizer(cfg: PrepareConfig, out: Path, docs: Path, stats: dict[str, Any]) -> Tokenizer:
    spec = cfg.tokenizer
    if spec == "byte":
        return load_tokenizer("byte")
    if spec == "char":
        chars: set[str] = set()
        for src in cfg.sources:
            for text in read_docs(docs / f"{src.name}.jsonl.zst"):
                chars.update(text)
        return CharTokenizer(sorted(chars), with_eot=True)
    if spec.startswith("train:"):
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError:
            raise LmforgeError(
                f"--tokenizer {spec!r}: expected train:VOCAB_SIZE, e.g. train:8192"
            ) from None
        stage = Stage(
            out / WORK,
            "tokenizer",
            _digest([docs.name, vocab, cfg.tokenizer_sample_bytes, cfg.val_fraction, cfg.seed]),
        )
        if not stage.done:
            tmp = stage.begin()
            texts = _round_robin(
                [_train_docs(docs, cfg, stats, s) for s in cfg.sources], cfg.tokenizer_sample_bytes
            )
            train_bpe(texts, vocab).save(tmp)
            stage.commit()
        return load_tokenizer(stage.final)
    tok = load_tokenizer(spec)
    if tok.eot_id is None:
        raise LmforgeError(
            f"tokenizer {spec} has no <|endoftext|> token, which shards need between documents"
        )
    return tok


# ---------------------------------------------------------------- stage 3: ids


def stage_ids(
    cfg: PrepareConfig, out: Path, docs: Path, tok: Tokenizer
) -> tuple[Path, dict[str, Any]]:
    """Tokenise every kept document: `<source>.ids` (uint32) + `<source>.idx.npy` (offsets)."""
    stage = Stage(out / WORK, "ids", _digest([docs.name, tokenizer_hash(tok)]))
    if stage.done:
        return stage.final, json.loads((stage.final / "stats.json").read_text())
    tmp = stage.begin()
    stats: dict[str, Any] = {}
    bar = _progress("tokenize", "doc")
    for src in cfg.sources:
        offsets = [0]
        n_bytes = 0
        with open(tmp / f"{src.name}.ids", "wb") as f:
            batch: list[str] = []
            for text in _chain(read_docs(docs / f"{src.name}.jsonl.zst"), [None]):
                if text is not None:
                    batch.append(text)
                if batch and (text is None or len(batch) == 512):
                    for ids in tok.encode_batch(batch):
                        f.write(np.asarray(ids, dtype=np.uint32).tobytes())
                        offsets.append(offsets[-1] + len(ids))
                    n_bytes += sum(len(t.encode("utf-8")) for t in batch)
                    bar.update(len(batch))
                    batch = []
        np.save(tmp / f"{src.name}.idx.npy", np.asarray(offsets, dtype=np.int64))
        tokens = offsets[-1]
        stats[src.name] = {
            "tokens": tokens,
            "bytes": n_bytes,
            "bytes_per_token": round(n_bytes / max(tokens, 1), 4),
        }
    bar.close()
    write_json(tmp / "stats.json", stats)
    return stage.commit(), stats


def _chain(*iterables: Iterable) -> Iterator:
    for it in iterables:
        yield from it


# ---------------------------------------------------------------- stage 4: mix + shards


def _source_ids(ids_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.load(ids_dir / f"{name}.idx.npy")
    path = ids_dir / f"{name}.ids"
    tokens = np.memmap(path, dtype=np.uint32, mode="r") if offsets[-1] else np.zeros(0, np.uint32)
    return tokens, offsets


def plan_mixture(
    lengths: dict[str, np.ndarray], weights: dict[str, float | None], total: int, seed: int
) -> tuple[list[tuple[str, np.ndarray]], dict[str, Any]]:
    """Choose training documents per source. With weights, source i gets about
    weight_i * total tokens (documents in seeded random order, repeated when a source runs out);
    without, every document once. -> ([(source, doc indices)], mixture report)."""
    rng = np.random.default_rng(seed)
    available = {name: int((lens + 1).sum()) for name, lens in lengths.items()}  # +1: separator
    weighted = all(w is not None for w in weights.values())
    if weighted:
        wsum = sum(weights.values())
        total = total or sum(available.values())
        targets = {name: weights[name] / wsum * total for name in lengths}
    else:
        targets = {name: float(available[name]) for name in lengths}
    picks: list[tuple[str, np.ndarray]] = []
    report: dict[str, Any] = {}
    for name, lens in lengths.items():
        target = targets[name]
        if target > 0 and len(lens) == 0:
            raise LmforgeError(
                f"source {name!r} has weight {weights[name]} but no training documents left"
            )
        chosen: list[np.ndarray] = []
        got = 0
        while got < target:
            order = rng.permutation(len(lens)) if weighted else np.arange(len(lens))
            cum = np.cumsum(lens[order] + 1)
            need = target - got
            cut = int(np.searchsorted(cum, need)) + 1  # docs until the target is reached
            chosen.append(order[:cut])
            got += int(cum[min(cut, len(cum)) - 1])
        idx = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        picks.append((name, idx))
        report[name] = {
            "weight": weights[name],
            "target_tokens": int(target),
            "tokens": got,
            "documents": int(len(idx)),
            "epochs": round(got / max(available[name], 1), 3),
        }
    total_got = sum(r["tokens"] for r in report.values())
    for r in report.values():
        r["share"] = round(r["tokens"] / max(total_got, 1), 4)
    return picks, report


def _write_split(
    writer: ShardWriter,
    order: list[tuple[str, int]] | np.ndarray,
    names: list[str],
    data: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    for src_i, doc in order:
        tokens, offsets = data[names[src_i]]
        writer.add(tokens[offsets[doc] : offsets[doc + 1]])


def stage_shards(
    cfg: PrepareConfig,
    out: Path,
    ids_dir: Path,
    tok: Tokenizer,
    doc_stats: dict[str, Any],
    key: str,
) -> dict[str, Any]:
    names = [s.name for s in cfg.sources]
    data = {n: _source_ids(ids_dir, n) for n in names}
    train_lens: dict[str, np.ndarray] = {}
    train_docs: dict[str, np.ndarray] = {}
    val_pairs = []
    for i, n in enumerate(names):
        offsets = data[n][1]
        mask = val_mask(len(offsets) - 1, cfg.val_fraction, cfg.seed, n)
        train_docs[n] = np.flatnonzero(~mask)
        train_lens[n] = np.diff(offsets)[train_docs[n]]
        val_pairs += [(i, int(d)) for d in np.flatnonzero(mask)]
    picks, mixture = plan_mixture(
        train_lens, {s.name: s.weight for s in cfg.sources}, cfg.total_tokens, cfg.seed
    )
    train_order = (
        np.concatenate(
            [
                np.stack([np.full(len(idx), names.index(n)), train_docs[n][idx]], axis=1)
                for n, idx in picks
            ]
        )
        if picks
        else np.zeros((0, 2), dtype=np.int64)
    )
    rng = np.random.default_rng(cfg.seed + 1)
    train_order = train_order[rng.permutation(len(train_order))]
    if len(train_order) == 0:
        raise LmforgeError(
            "no training documents left after cleaning and dedup; see the counts above and loosen `clean` thresholds"
        )

    (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder is not a finished dataset
    for old in [*out.glob("train_*.bin"), *out.glob("val_*.bin"), *out.glob(".*.bin.tmp")]:
        old.unlink()
    dtype = token_dtype(tok.vocab_size)
    splits: dict[str, Any] = {}
    for split, order in (("train", train_order.tolist()), ("val", val_pairs)):
        writer = ShardWriter(out, split, dtype, tok.eot_id, cfg.tokens_per_shard)
        _write_split(writer, order, names, data)
        shards = writer.close()
        splits[split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "shards": shards,
        }
    tok_tmp = out / f".tmp-{TOKENIZER_DIR}"
    shutil.rmtree(tok_tmp, ignore_errors=True)
    tok.save(tok_tmp)
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
    os.replace(tok_tmp, out / TOKENIZER_DIR)
    return {
        "format": FORMAT,
        "stage_key": key,
        "dtype": dtype.name,
        "eot_id": int(tok.eot_id),
        "tokenizer": {
            "sha256": tokenizer_hash(tok),
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
        },
        "splits": splits,
        "mixture": mixture,
        "sources": {s.name: {"paths": s.paths, "weight": s.weight} for s in cfg.sources},
        "seed": cfg.seed,
    }


# ---------------------------------------------------------------- driver


def prepare(cfg: PrepareConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage; returns the report also written to OUT/report.json."""
    out = Path(out)
    if not cfg.sources:
        raise LmforgeError("no inputs: give INPUT paths or a --config with `sources`")
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"--out {out} is a file; give a folder")
    if (
        out.is_dir()
        and any(out.iterdir())
        and not (out / WORK).is_dir()
        and not (out / MANIFEST).is_file()
    ):
        raise LmforgeError(
            f"--out {out} holds other files; give a new or empty folder (nothing is overwritten)"
        )
    for src in cfg.sources:
        resolve_paths(src.paths)  # missing inputs fail now, before any work
    if force:
        shutil.rmtree(out / WORK, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t = time.perf_counter()
    docs, doc_stats = stage_docs(cfg, out)
    times["collect_clean_dedup"] = time.perf_counter() - t
    kept = {s.name: doc_stats[s.name]["documents_out"] for s in cfg.sources}
    if not any(kept.values()):
        raise LmforgeError(f"no documents left after cleaning: {_drop_summary(doc_stats, cfg)}")

    t = time.perf_counter()
    tok = stage_tokenizer(cfg, out, docs, doc_stats)
    times["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    ids_dir, id_stats = stage_ids(cfg, out, docs, tok)
    times["tokenize"] = time.perf_counter() - t

    key = _digest(
        [
            ids_dir.name,
            cfg.val_fraction,
            cfg.seed,
            cfg.total_tokens,
            cfg.tokens_per_shard,
            [s.weight for s in cfg.sources],
        ]
    )
    old = _read_manifest(out)
    t = time.perf_counter()
    if old and old.get("stage_key") == key and not force:
        manifest = old
        reused = True
    else:
        manifest = stage_shards(cfg, out, ids_dir, tok, doc_stats, key)
        reused = False
    times["mix_shards"] = time.perf_counter() - t
    report = {
        "out": str(out),
        "reused_shards": reused,
        "sources": {
            s.name: {
                **{k: v for k, v in doc_stats[s.name].items() if k != "warnings"},
                **id_stats[s.name],
            }
            for s in cfg.sources
        },
        "warnings": {
            s.name: doc_stats[s.name]["warnings"]
            for s in cfg.sources
            if doc_stats[s.name]["warnings"]
        },
        "dedup": doc_stats["_dedup"],
        "tokenizer": {**manifest["tokenizer"], "spec": cfg.tokenizer},
        "bytes_per_token": round(
            sum(v["bytes"] for v in id_stats.values())
            / max(sum(v["tokens"] for v in id_stats.values()), 1),
            4,
        ),
        "mixture": manifest["mixture"],
        "splits": {
            k: {"tokens": v["tokens"], "documents": v["documents"], "shards": len(v["shards"])}
            for k, v in manifest["splits"].items()
        },
        "seconds": {k: round(v, 3) for k, v in times.items()},
    }
    write_json(out / REPORT, report)
    if not reused:
        write_json(out / MANIFEST, manifest)  # last: its presence marks the dataset complete
    return report


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _drop_summary(doc_stats: dict[str, Any], cfg: PrepareConfig) -> str:
    parts = []
    for s in cfg.sources:
        st = doc_stats[s.name]
        reasons = {
            **st["dropped"],
            **{k: v for k, v in st["collect"].items() if k.startswith("skipped")},
        }
        detail = (
            ", ".join(f"{k}={v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
            or "no documents read"
        )
        parts.append(f"{s.name}: {st['documents_in']} in ({detail})")
    return "; ".join(parts)


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"{'source':<16}{'docs in':>9}{'kept':>9}{'tokens':>12}{'bytes/tok':>10}{'train share':>12}  dropped"
    ]
    for name, s in report["sources"].items():
        share = report["mixture"].get(name, {}).get("share", 0.0)
        dropped = ", ".join(
            f"{k}={v}" for k, v in sorted(s["dropped"].items(), key=lambda kv: -kv[1])[:4]
        )
        lines.append(
            f"{name:<16}{s['documents_in']:>9}{s['documents_out']:>9}{s['tokens']:>12}{s['bytes_per_token']:>10.2f}{share:>12.3f}  {dropped}"
        )
    d = report["dedup"]
    if d:
        lines.append(
            f"dedup: {d['exact_duplicates']} exact, {d['near_duplicates']} near duplicates in {d['near_dup_clusters']} clusters"
        )
    sp = report["splits"]
    lines.append(
        f"train: {sp['train']['tokens']} tokens in {sp['train']['shards']} shard(s); val: {sp['val']['tokens']} tokens; "
        f"tokenizer {report['tokenizer']['kind']} vocab {report['tokenizer']['vocab_size']}, {report['bytes_per_token']:.2f} bytes/token"
    )
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def add_arguments(parser, verb: str) -> None:
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="files, folders, globs, URLs or .urls lists (one source each)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output folder for shards, tokenizer, manifest.json and report.json",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="train:VOCAB, char, byte, or a tokenizer folder (default train:8192)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML recipe: sources with weights, clean/dedup/fetch settings",
    )
    parser.add_argument(
        "--text-field",
        default=None,
        help="json/jsonl/parquet/csv field(s) for INPUTs, comma-separated (default text)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes for cleaning and dedup (default: all cores)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="documents held out for validation (default 0.05)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the split and the mixture (default 1337)"
    )
    parser.add_argument(
        "--force", action="store_true", help="redo every stage instead of reusing finished ones"
    )


def _sources_from_inputs(
    inputs: list[str], text_field: str | None, taken: set[str]
) -> list[dict[str, Any]]:
    out = []
    for p in inputs:
        stem = Path(p.rstrip("/")).name.split(".")[0] or "source"
        name, k = stem, 1
        while name in taken:
            k += 1
            name = f"{stem}{k}"
        taken.add(name)
        src: dict[str, Any] = {"name": name, "paths": [p]}
        if text_field:
            src["text_field"] = text_field.split(",")
        out.append(src)
    return out


def run(args) -> int:
    cfg = load_prepare_config(
        args.config,
        tokenizer=args.tokenizer,
        workers=args.workers,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    if args.inputs:
        extra = _sources_from_inputs(args.inputs, args.text_field, {s.name for s in cfg.sources})
        cfg = load_prepare_config(
            None,
            **{
                **dataclasses.asdict(cfg),
                "sources": [dataclasses.asdict(s) for s in cfg.sources] + extra,
            },
        )
    report = prepare(cfg, args.out, force=args.force)
    print(format_report(report))
    print(
        f"wrote {args.out} ({'shards reused, ' if report['reused_shards'] else ''}report: {Path(args.out) / REPORT})"
    )
    return 0
