"""Run a benchmark: prompts built as VLMEvalKit's InternVL wrapper builds them, greedy replies from the engine's
batch generation, predictions appended as they come (a rerun skips what is done), then the score table.

Files under `out` for model M and benchmark B: `M_B.tsv` (predictions, VLMEvalKit's layout), `M_B.json` (what
was run), `M_B_score.json` and `M_B_score.md` (the table).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Container, Iterator, List, Optional, Tuple

from tqdm import tqdm

from mlx_internvl.errors import UserError
from mlx_internvl.evaluation import benchmarks, data, prompts, report, scoring
from mlx_internvl.generate import batch_generate
from mlx_internvl.loading import load
from mlx_internvl.validate import integer

# VLMEvalKit's InternVL generation config: greedy, up to 4096 new tokens.
DEFAULT_MAX_TOKENS = 4096


@dataclass
class RunInfo:
    benchmark: str
    model: str
    data: str
    predictions: str
    questions: int
    answered_now: int
    seconds: float
    batch_size: int
    max_tokens: int
    limit: Optional[int]
    server: Optional[str] = None  # the server's URL in server mode (batch_size: requests in flight)

    @property
    def questions_per_minute(self) -> float:
        return 60.0 * self.answered_now / self.seconds if self.seconds > 0 else float("nan")


def batches(bench: benchmarks.Benchmark, rows: List[dict], size: int) -> Iterator[Tuple[int, List[dict]]]:
    """Consecutive rows sharing a tile limit, `size` at a time. Cut from the whole list, so a resumed run
    regroups what is left exactly as the first run would have."""
    group: List[dict] = []
    for row in rows:
        tiles = bench.tiles_per_image(len(row.get("image") or []))
        if group and (len(group) == size or tiles != bench.tiles_per_image(len(group[0].get("image") or []))):
            yield bench.tiles_per_image(len(group[0].get("image") or [])), group
            group = []
        group.append(row)
    if group:
        yield bench.tiles_per_image(len(group[0].get("image") or [])), group


def _answer(model, processor, bench, rows: List[dict], tiles: int, max_tokens: int) -> List[str]:
    images = [prompts.row_images(bench, r) for r in rows]
    questions = [prompts.question_text(bench, r, len(ims)) for r, ims in zip(rows, images)]
    return batch_generate(model, processor, questions, images, max_tokens=max_tokens, max_tiles=tiles).texts


# (benchmark, every row, the indices already answered, max_tokens) -> (row, reply) for each row not yet answered,
# in file order.
Replies = Callable[[benchmarks.Benchmark, List[dict], Container[str], int], Iterator[Tuple[dict, str]]]


def local_replies(model, processor, batch_size: int) -> Replies:
    """Replies of a loaded model, `batch_size` questions decoded together."""
    batch_size = integer("batch_size", batch_size, minimum=1)

    def replies(bench, rows, done, max_tokens):
        for tiles, group in batches(bench, rows, batch_size):
            group = [r for r in group if str(r["index"]) not in done]
            if group:
                yield from zip(group, _answer(model, processor, bench, group, tiles, max_tokens))
    return replies


def evaluate(model, processor, bench_name: str, data_path, out_dir, *, model_name: str = "model",
             limit: Optional[int] = None, batch_size: int = 8, max_tokens: int = DEFAULT_MAX_TOKENS,
             progress: bool = True) -> Tuple[RunInfo, scoring.Scores]:
    """Answer every question of `data_path` (the first `limit`) with a loaded model, append the predictions to
    `out_dir/{model_name}_{bench}.tsv` (skipping those already there) and score them."""
    return evaluate_with(local_replies(model, processor, batch_size), bench_name, data_path, out_dir,
                         model_name=model_name, limit=limit, max_tokens=max_tokens, progress=progress,
                         batch_size=batch_size)


def evaluate_with(replies: Replies, bench_name: str, data_path, out_dir, *, model_name: str,
                  limit: Optional[int] = None, max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = True,
                  batch_size: int = 8, server: Optional[str] = None) -> Tuple[RunInfo, scoring.Scores]:
    """`evaluate` with the replies from `replies` (a loaded model's, or a server's: `served.server_replies`)."""
    bench = benchmarks.resolve(bench_name)
    max_tokens = integer("max_tokens", max_tokens, minimum=1)
    rows = data.read_benchmark(data_path, prompts.default_question(bench))
    if limit is not None:
        rows = rows[:integer("limit", limit, minimum=1)]
    if not rows:
        raise UserError(f"--data {data_path}: the file has no questions")
    stem = Path(out_dir) / f"{model_name}_{bench.name}"
    writer = data.PredictionWriter(stem.with_suffix(".tsv"), data.output_columns(rows))
    answered = len(writer.done.keys() & {str(r["index"]) for r in rows})
    tic = time.perf_counter()
    with tqdm(total=len(rows), initial=answered, unit="q", desc=bench.name, disable=not progress,
              dynamic_ncols=True) as bar:
        for row, text in replies(bench, rows, set(writer.done), max_tokens):
            writer.write(row, text)
            bar.update(1)
    info = RunInfo(bench.name, model_name, str(data_path), str(stem.with_suffix(".tsv")), len(rows),
                   len(rows) - answered, time.perf_counter() - tic, batch_size, max_tokens, limit, server)
    stem.with_suffix(".json").write_text(json.dumps(asdict(info), indent=1) + "\n")
    return info, score_file(bench.name, stem.with_suffix(".tsv"))


def score_file(bench_name: str, predictions) -> scoring.Scores:
    """Score a predictions TSV (ours or VLMEvalKit's, tab-separated) and write `*_score.json` / `*_score.md`."""
    bench = benchmarks.resolve(bench_name)
    predictions = Path(predictions)
    scores = scoring.score(bench, data.read_predictions(predictions))
    base = predictions.with_suffix("")
    report.write_scores(scores, Path(f"{base}_score.json"), Path(f"{base}_score.md"))
    return scores


def run(model_path, bench: str, data_path, out_dir="eval-results", *, adapter_path=None, dtype=None,
        **options) -> Tuple[RunInfo, scoring.Scores]:
    """`evaluate` with the model loaded from `model_path` (any form `mlx_internvl.load` accepts)."""
    benchmarks.resolve(bench)  # a bad name fails before the model loads
    model, processor = load(model_path, dtype=dtype, adapter_path=adapter_path)
    name = Path(str(model_path).rstrip("/")).name or "model"
    return evaluate(model, processor, bench, data_path, out_dir, model_name=name, **options)
