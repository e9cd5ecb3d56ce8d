"""`lmforge prepare`'s report: what each source gave and lost, dedup, mixture, splits (with the
validation share realised in tokens) and timings, and warnings, as report.json's dict and as
the table printed at the end."""

from __future__ import annotations

from typing import Any

from lmforge.config import PrepareConfig


def build_report(
    cfg: PrepareConfig,
    out: str,
    doc_stats: dict[str, Any],
    split_stats: dict[str, Any],
    id_stats: dict[str, Any],
    manifest: dict[str, Any],
    reused: bool,
    times: dict[str, float],
) -> dict[str, Any]:
    shares = manifest["val_split"]
    val_split = {
        "asked": shares["asked"],
        "realised": shares["realised"],
        "documents_cut": sum(split_stats[s.name]["documents_cut"] for s in cfg.sources),
        "sources": {
            s.name: {"realised": shares["sources"][s.name], **split_stats[s.name]}
            for s in cfg.sources
        },
    }
    return {
        "out": out,
        "reused_shards": reused,
        "sources": {
            s.name: {
                **{k: v for k, v in doc_stats[s.name].items() if k != "warnings"},
                **id_stats[s.name],
            }
            for s in cfg.sources
        },
        "warnings": _warnings(cfg, doc_stats, val_split, manifest),
        "dedup": doc_stats["_dedup"],
        "tokenizer": {**manifest["tokenizer"], "spec": cfg.prepare.tokenizer},
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
        "val_split": val_split,
        "seconds": {k: round(v, 3) for k, v in times.items()},
    }


def _warnings(
    cfg: PrepareConfig,
    doc_stats: dict[str, Any],
    val_split: dict[str, Any],
    manifest: dict[str, Any],
) -> list[str]:
    """One line each: what collecting skipped, validation cut inside a document, and a split
    too small to train or evaluate on."""
    out = [f"{s.name}: {w}" for s in cfg.sources for w in doc_stats[s.name]["warnings"]]
    for name, v in val_split["sources"].items():
        if v["documents_cut"]:
            out.append(
                f"{name}: whole documents could not reach prepare.val_fraction="
                f"{val_split['asked']}, so the split cut inside {v['documents_cut']} document(s): "
                "the tail is validation, the head training"
            )
    least = cfg.prepare.min_split_tokens
    for split, info in manifest["splits"].items():
        if info["tokens"] < least:
            out.append(
                f"the {split} split has {info['tokens']} tokens, fewer than "
                f"prepare.min_split_tokens={least}: training needs block_size + 1 tokens per split"
            )
    return out


def drop_summary(doc_stats: dict[str, Any], cfg: PrepareConfig) -> str:
    """One line: per source, documents read and why they were dropped, most common first."""
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
    vs = report["val_split"]
    per_source = ", ".join(f"{k} {v['realised']:.1%}" for k, v in vs["sources"].items())
    lines.append(
        f"val: {vs['realised']:.1%} of tokens, asked {vs['asked']:.1%} ({per_source}); "
        f"{vs['documents_cut']} document(s) cut by position"
    )
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
