"""`lmforge prepare`'s report: what each source gave and lost, dedup, mixture, splits and
timings, as report.json's dict and as the table printed at the end."""

from __future__ import annotations

from typing import Any

from lmforge.config import PrepareConfig


def build_report(
    cfg: PrepareConfig,
    out: str,
    doc_stats: dict[str, Any],
    id_stats: dict[str, Any],
    manifest: dict[str, Any],
    reused: bool,
    times: dict[str, float],
) -> dict[str, Any]:
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
        "warnings": {
            s.name: doc_stats[s.name]["warnings"]
            for s in cfg.sources
            if doc_stats[s.name]["warnings"]
        },
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
        "seconds": {k: round(v, 3) for k, v in times.items()},
    }


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
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)
