"""Social bias (`--task bias[=CSV]`): CrowS-Pairs (Nangia et al. 2020) scored with the causal LM,
as lm-evaluation-harness's crows_pairs task does. Each pair is a more-stereotyping sentence
(`sent_more`) and a minimally different less-stereotyping one (`sent_less`); each sentence is
scored whole, after the prefix token. Reports, overall and per bias type, the percent of pairs
where the more-stereotyping sentence is the more likely (50 = no preference) and the mean
absolute log-likelihood difference. The default data is the bundled
crows_pairs_anonymized.csv (CC BY-SA 4.0)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

from lmforge.common import LmforgeError
from lmforge.eval.scoring import Scorer
from lmforge.eval.tasks import EVAL_ASSETS, TaskOptions, TaskResult, file_sha256
from lmforge.fileio import read_utf8_text

DEFAULT = EVAL_ASSETS / "crows_pairs_anonymized.csv"
FIELDS = ("sent_more", "sent_less", "bias_type")


def load_pairs(path: Path, limit: int | None = None) -> list[dict[str, str]]:
    if not path.is_file():
        raise LmforgeError(f"task file not found: {path}")
    rows = list(csv.DictReader(io.StringIO(read_utf8_text(path))))[:limit]
    if not rows:
        raise LmforgeError(f"{path} holds no pairs")
    for i, row in enumerate(rows):
        missing = [f for f in FIELDS if not (row.get(f) or "").strip()]
        if missing:
            raise LmforgeError(
                f"{path}: pair {i} has no {missing[0]!r} (needs {', '.join(FIELDS)})"
            )
    return rows


def pair_scores(scorer: Scorer, pairs: list[dict[str, str]]) -> list[tuple[float, float]]:
    """(log p(sent_more), log p(sent_less)) of each pair."""
    requests = [("", p[key]) for p in pairs for key in ("sent_more", "sent_less")]
    scores = scorer.loglikelihood(requests)
    return [(scores[2 * i].logprob, scores[2 * i + 1].logprob) for i in range(len(pairs))]


def summarise(diffs: list[tuple[float, float]]) -> dict[str, float]:
    n = len(diffs)
    return {
        "stereo_pct": 100 * sum(more > less for more, less in diffs) / n,
        "mean_diff": sum(abs(more - less) for more, less in diffs) / n,
        "pairs": n,
    }


def run(scorer: Scorer, path: Path | None, options: TaskOptions) -> TaskResult:
    path = path or DEFAULT
    pairs = load_pairs(path, options.limit)
    scores = pair_scores(scorer, pairs)
    by_type: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for pair, score in zip(pairs, scores):
        by_type[pair["bias_type"]].append(score)
    overall = summarise(scores)
    per_type = {t: summarise(s) for t, s in sorted(by_type.items())}
    metrics = {"stereo_pct": overall["stereo_pct"], "mean_diff": overall["mean_diff"]}
    return TaskResult(metrics, len(pairs), {"per_type": per_type}, {str(path): file_sha256(path)})
