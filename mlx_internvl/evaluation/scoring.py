"""Score a predictions table: per-question scores (what `--compare` pairs) and the score table (overall, per
split or category) laid out as VLMEvalKit reports it, in percent.

`rows` are dicts read from a predictions file: the benchmark's columns plus `prediction`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Callable, Dict, List

from mlx_internvl.errors import UserError
from mlx_internvl.evaluation import caption, choice, vqa
from mlx_internvl.evaluation.benchmarks import Benchmark

# VLMEvalKit's short names for MMBench's abilities.
MMB_ABBRS = {'coarse_perception': 'CP', 'finegrained_perception (instance-level)': 'FP-S',
             'finegrained_perception (cross-instance)': 'FP-C', 'logic_reasoning': 'LR',
             'relation_reasoning': 'RR', 'attribute_reasoning': 'AR'}


@dataclass
class Scores:
    benchmark: str
    metric: str
    items: Dict[str, float]  # question (or circular group) index -> score in [0, 1] (CIDEr: 0 to 10)
    table: Dict[str, float] = field(default_factory=dict)  # 'Overall' first, then splits / categories

    @property
    def overall(self) -> float:
        return self.table["Overall"]


def parse_answers(value) -> List[str]:
    """A reference cell: a Python list literal of answers (as VLMEvalKit stores several) or one answer."""
    text = str(value)
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return [text]
    return [str(x) for x in parsed] if isinstance(parsed, list) and parsed else [text]


def _open(fn: Callable) -> Callable[[dict], float]:
    return lambda row: float(fn(str(row['prediction']), parse_answers(row['answer'])))


METRICS: Dict[str, Callable[[dict], float]] = {
    "vqa_accuracy": _open(vqa.vqa_accuracy),
    "anls": _open(vqa.anls),
    "relaxed": _open(vqa.relaxed_accuracy),
    "exact": _open(vqa.exact_accuracy),
    "ocrbench": lambda row: float(vqa.ocrbench_hit(str(row['prediction']), parse_answers(row['answer']),
                                                   row['category'])),
    "choice": lambda row: float(choice.choice_hit(row)),
    "mmmu": lambda row: float(choice.choice_hit(choice.mmmu_row(row))),
}


def _mean(xs) -> float:
    xs = list(xs)
    return 100.0 * sum(xs) / len(xs) if xs else float("nan")


def _by(rows: List[dict], items: List[float], column: str, abbrs=None) -> Dict[str, float]:
    groups: Dict[str, list] = {}
    for row, s in zip(rows, items):
        if column in row and not choice.is_missing(row[column]):
            groups.setdefault(str(row[column]), []).append(s)
    return {(abbrs or {}).get(k, k): _mean(v) for k, v in sorted(groups.items())}


def _table(bench: Benchmark, rows: List[dict], items: List[float]) -> Dict[str, float]:
    table = {"Overall": _mean(items)}
    if any("split" in r for r in rows):
        table.update({f"split={k}": v for k, v in _by(rows, items, "split").items()})
        if bench.kind == "VQA":
            return table
    columns = ["l2-category", "category"] if bench.kind == "MCQ" else ["category"]
    for column in columns:
        table.update(_by(rows, items, column, MMB_ABBRS))
    return table


def _ocrbench_table(rows: List[dict], items: List[float]) -> Dict[str, float]:
    hits: Dict[str, float] = {}
    for row, s in zip(rows, items):
        hits[row['category']] = hits.get(row['category'], 0) + s
    table = {"Overall": _mean(items)}
    for group, cats in vqa.OCRBENCH_GROUPS.items():
        table[group] = sum(hits.get(c, 0) for c in cats)
    table["Final Score"] = sum(items)
    return table


def score(bench: Benchmark, rows: List[dict]) -> Scores:
    """Per-question scores and the table. MMBench-style benchmarks score each circular group as one question."""
    if not rows:
        raise UserError(f"{bench.name}: there are no predictions to score")
    missing = [c for c in ("index", "answer", "prediction") if c not in rows[0]]
    if missing:
        raise UserError(f"{bench.name}: the predictions lack the column(s) {missing}; expected VLMEvalKit's layout")
    if bench.metric == "circular":
        groups = choice.circular_groups(rows)
        mains = [g[0] for g in groups.values()]
        items = [float(choice.circular_hit(g)) for g in groups.values()]
        return Scores(bench.name, bench.metric, {str(k): s for k, s in zip(groups, items)},
                      _table(bench, mains, items))
    if bench.metric == "caption":
        items, table = caption.caption_scores([str(r['prediction']) for r in rows],
                                              [parse_answers(r['answer']) for r in rows])
        return Scores(bench.name, bench.metric, {str(r['index']): s for r, s in zip(rows, items)}, table)
    fn = METRICS.get(bench.metric)
    if fn is None:
        raise UserError(f"{bench.name}: no metric {bench.metric!r}; known: {', '.join(METRICS)}, circular, caption")
    items = [fn(r) for r in rows]
    table = _ocrbench_table(rows, items) if bench.metric == "ocrbench" else _table(bench, rows, items)
    return Scores(bench.name, bench.metric, {str(r['index']): s for r, s in zip(rows, items)}, table)
