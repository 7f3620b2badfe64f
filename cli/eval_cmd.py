"""`mlx-internvl eval`: run a benchmark with InternVL's official evaluation recipe, or compare two runs.

A thin shell over `mlx_internvl.evaluation.runner.run` and `mlx_internvl.evaluation.compare.compare`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from mlx_internvl.errors import UserError
from mlx_internvl.evaluation import compare as comparing
from mlx_internvl.evaluation import report, runner, served

from .options import adapter_option


def _compare(run_a, run_b, resamples: int, seed: int, out) -> None:
    results = comparing.compare(run_a, run_b, resamples=resamples, seed=seed)
    click.echo(comparing.comparison_markdown(results))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        payload = [dict(dataclasses.asdict(c), difference=c.difference) for c in results]
        (Path(out) / "compare.json").write_text(json.dumps(payload, indent=1) + "\n")
        (Path(out) / "compare.md").write_text(comparing.comparison_markdown(results, show_flips=0))


@click.command("eval")
@click.option("--model", "model_path", default=None,
              help="The model to evaluate (any form `generate` accepts); with --server, the served model's id "
                   "(default: the server's first).")
@click.option("--bench", default=None, help="VLMEvalKit dataset name, e.g. MMBench_DEV_EN, MMStar, AI2D_TEST, "
                                            "SEEDBench_IMG, MMMU_DEV_VAL, TextVQA_VAL, DocVQA_VAL, InfoVQA_VAL, "
                                            "ChartQA_TEST, OCRBench.")
@click.option("--data", "data_path", type=click.Path(), default=None,
              help="The benchmark file: VLMEvalKit's TSV, or a Hugging Face parquet file / folder of them.")
@click.option("--out", default=None, help="Folder for predictions and scores (default: eval-results).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N questions.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Questions decoded together.")
@click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=runner.DEFAULT_MAX_TOKENS, show_default=True,
              help="Most new tokens per answer (VLMEvalKit's InternVL setting).")
@adapter_option()
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None)
@click.option("--score-only", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Score an existing predictions TSV (ours or VLMEvalKit's) for --bench; loads no model.")
@click.option("--compare", "runs", nargs=2, type=click.Path(exists=True), default=None,
              help="Compare two runs (their --out folders or predictions TSVs): B - A per benchmark.")
@click.option("--bootstrap", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Paired bootstrap resamples for --compare.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed for --compare.")
@click.option("--server", default=None, metavar="URL",
              help="Evaluate through a running `mlx-internvl serve` (e.g. http://127.0.0.1:8080) instead of loading "
                   "the model here; same prompts, tiles and greedy decoding.")
@click.option("--concurrency", type=click.IntRange(min=1), default=served.DEFAULT_CONCURRENCY, show_default=True,
              help="With --server: requests in flight at once.")
@click.option("--api-key", default=None, envvar="MLX_INTERNVL_API_KEY", help="With --server: the server's --api-key.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(model_path, bench, data_path, out, limit, batch_size, max_tokens, adapter_path, dtype, score_only,
            runs, bootstrap, seed, server, concurrency, api_key, no_progress):
    """Evaluate on a benchmark as VLMEvalKit evaluates InternVL (prompts, tiles, greedy decoding, metrics).

    Predictions are appended as they come; run the same command again to resume.
    """
    if runs:
        return _compare(runs[0], runs[1], bootstrap, seed, out)
    if score_only:
        if not bench:
            raise UserError("--score-only needs --bench (which metric to apply)")
        scores = runner.score_file(bench, score_only)
        return click.echo(report.scores_markdown(scores))
    needed = (() if server else (("model", model_path),)) + (("bench", bench), ("data", data_path))
    missing = [f"--{n}" for n, v in needed if not v]
    if missing:
        raise UserError(f"eval needs {', '.join(missing)} (or --compare RUN_A RUN_B)")
    options = dict(limit=limit, max_tokens=max_tokens, progress=not no_progress)
    if server:
        if adapter_path or dtype:
            raise UserError("--adapter-path and --dtype belong to the server with --server (start `mlx-internvl "
                            "serve` with them)")
        info, scores = served.evaluate_served(server, bench, data_path, out or "eval-results", model=model_path,
                                              api_key=api_key, concurrency=concurrency, **options)
    else:
        info, scores = runner.run(model_path, bench, data_path, out or "eval-results", adapter_path=adapter_path,
                                  dtype=dtype, batch_size=batch_size, **options)
    click.echo(report.scores_markdown(scores))
    click.echo(f"predictions: {info.predictions} ({info.answered_now} answered now, "
               f"{info.questions_per_minute:.1f} questions/min)")
