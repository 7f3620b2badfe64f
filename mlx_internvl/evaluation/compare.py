"""`eval --compare RUN_A RUN_B`: per benchmark, the score difference B - A over the questions both runs answered,
a paired bootstrap confidence interval for it (questions resampled with replacement, the same draw for both
runs), and the questions whose score changed ("flips").

A run is an `eval --out` folder (every benchmark whose `M_B.json` is there) or one predictions TSV with its
`.json` beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np

from mlx_internvl.errors import UserError
from mlx_internvl.evaluation import benchmarks, data, scoring
from mlx_internvl.evaluation.report import markdown_table


@dataclass
class Comparison:
    benchmark: str
    questions: int
    score_a: float
    score_b: float
    low: float  # confidence interval of B - A, in points
    high: float
    flips: List[dict] = field(default_factory=list)

    @property
    def difference(self) -> float:
        return self.score_b - self.score_a


def _runs(path) -> Dict[str, Path]:
    """benchmark name -> predictions TSV of a run."""
    path = Path(path)
    metas = sorted(path.glob("*.json")) if path.is_dir() else [path.with_suffix(".json")]
    out = {}
    for m in metas:
        if m.name.endswith("_score.json") or not m.is_file():
            continue
        meta = json.loads(m.read_text())
        if "benchmark" in meta and "predictions" in meta:
            out[meta["benchmark"]] = m.with_suffix(".tsv")
    if not out:
        raise UserError(f"{path}: no evaluation run here (expected the folder `eval --out` wrote, or its .tsv)")
    return out


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0):
    """Percentile interval of mean(b - a) * 100 over `resamples` paired resamples of the questions."""
    diff = (b - a) * 100.0
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for k in range(resamples):
        means[k] = diff[rng.integers(0, len(diff), len(diff))].mean()
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def _flips(rows_a: Dict[str, dict], rows_b: Dict[str, dict], sa: Dict[str, float], sb: Dict[str, float]):
    out = []
    for k in sa:
        if k in sb and sa[k] != sb[k]:
            ra, rb = rows_a.get(k, {}), rows_b.get(k, {})
            out.append({"index": k, "question": str(ra.get("question", "")), "answer": str(ra.get("answer", "")),
                        "score_a": sa[k], "score_b": sb[k], "prediction_a": str(ra.get("prediction", "")),
                        "prediction_b": str(rb.get("prediction", ""))})
    return out


def compare_benchmark(name: str, pred_a: Path, pred_b: Path, resamples: int = 2000, seed: int = 0) -> Comparison:
    bench = benchmarks.resolve(name)
    rows_a, rows_b = data.read_predictions(pred_a), data.read_predictions(pred_b)
    sa, sb = scoring.score(bench, rows_a).items, scoring.score(bench, rows_b).items
    keys = [k for k in sa if k in sb]
    if not keys:
        raise UserError(f"{name}: the two runs answered no question in common")
    a = np.array([sa[k] for k in keys])
    b = np.array([sb[k] for k in keys])
    low, high = paired_bootstrap(a, b, resamples, seed=seed)
    flips = _flips({str(r["index"]): r for r in rows_a}, {str(r["index"]): r for r in rows_b},
                   {k: sa[k] for k in keys}, sb)
    return Comparison(name, len(keys), 100 * a.mean(), 100 * b.mean(), low, high, flips)


def compare(run_a, run_b, resamples: int = 2000, seed: int = 0) -> List[Comparison]:
    """One `Comparison` per benchmark both runs have."""
    a, b = _runs(run_a), _runs(run_b)
    common = [n for n in a if n in b]
    if not common:
        raise UserError(f"{run_a} has {sorted(a)}, {run_b} has {sorted(b)}: no benchmark in common")
    return [compare_benchmark(n, a[n], b[n], resamples, seed) for n in common]


def comparison_markdown(results: List[Comparison], show_flips: int = 10) -> str:
    rows = [(c.benchmark, str(c.questions), c.score_a, c.score_b, f"{c.difference:+.2f}",
             f"[{c.low:+.2f}, {c.high:+.2f}]", f"{sum(f['score_b'] > f['score_a'] for f in c.flips)} / "
             f"{sum(f['score_b'] < f['score_a'] for f in c.flips)}") for c in results]
    text = markdown_table(["benchmark", "questions", "A", "B", "B - A", "95% CI", "better / worse in B"], rows)
    for c in results:
        if c.flips and show_flips:
            text += f"\n{c.benchmark}: {len(c.flips)} questions changed"
            text += "".join(f"\n- {f['index']}: {f['score_a']:.2f} -> {f['score_b']:.2f}  A: {f['prediction_a']!r}"
                            f"  B: {f['prediction_b']!r}  (answer {f['answer']!r})" for f in c.flips[:show_flips])
            text += "\n"
    return text
