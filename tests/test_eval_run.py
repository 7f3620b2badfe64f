"""`mlx-internvl eval` end to end on a tiny random checkpoint and small benchmark files made here: predictions
complete and equal to the model's greedy reply to VLMEvalKit's prompt, an interrupted run resumes to the same
file, and `--compare` finds the flips and a bootstrap interval that matches the normal approximation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from test_eval_data import png_b64, write_tsv

import mlx_internvl
from builders import Case
from mlx_internvl.cli.main import main
from mlx_internvl.errors import UserError
from mlx_internvl.evaluation import benchmarks, compare, data, prompts, runner
from mlx_internvl.generate import generate

MAX_TOKENS = 4


@pytest.fixture(scope="module")
def tiny(build_case):
    built = build_case(Case("smoke_qwen2"))
    model, processor = mlx_internvl.load(built.original_dir)
    return built, model, processor


def mcq_rows(n: int = 5):
    colors = ["red", "green", "blue", "white", "black", "yellow"]
    return [{"index": i, "question": f"What color is picture {i}?", "hint": "Look." if i % 2 else None,
             "A": colors[i % 6], "B": colors[(i + 1) % 6], "C": colors[(i + 2) % 6], "answer": "ABC"[i % 3],
             "category": ["color", "shape"][i % 2], "image": png_b64(colors[i % 6], (30 + 10 * i, 40))}
            for i in range(n)]


def test_predictions_are_complete_and_are_the_greedy_replies(tiny, tmp_path):
    built, model, processor = tiny
    tsv = write_tsv(tmp_path / "MMStar.tsv", mcq_rows())
    info, scores = runner.evaluate(model, processor, "MMStar", tsv, tmp_path / "out", model_name="tiny",
                                   batch_size=2, max_tokens=MAX_TOKENS, progress=False)
    got = data.read_predictions(info.predictions)
    assert [r["index"] for r in got] == list(range(5))
    assert list(got[0]) == ["index", "question", "hint", "A", "B", "C", "answer", "category", "prediction"]
    bench = benchmarks.resolve("MMStar")
    for row, src in zip(got, data.read_benchmark(tsv)):
        images = prompts.row_images(bench, src)
        assert row["prediction"] == generate(model, processor, prompts.question_text(bench, src, 1), images,
                                             max_tokens=MAX_TOKENS, max_tiles=bench.max_tiles)
    assert set(scores.items) == {str(i) for i in range(5)} and "Overall" in scores.table
    assert json.loads((tmp_path / "out" / "tiny_MMStar_score.json").read_text())["table"] == scores.table
    assert (tmp_path / "out" / "tiny_MMStar_score.svg").read_text().startswith("<svg")


def test_interrupted_run_resumes_to_the_same_file(tiny, tmp_path, monkeypatch):
    _, model, processor = tiny
    tsv = write_tsv(tmp_path / "b.tsv", mcq_rows(5))
    kw = dict(model_name="tiny", batch_size=2, max_tokens=MAX_TOKENS, progress=False)
    whole, _ = runner.evaluate(model, processor, "MMStar", tsv, tmp_path / "whole", **kw)
    real, calls = runner._answer, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "_answer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(model, processor, "MMStar", tsv, tmp_path / "cut", **kw)
    monkeypatch.setattr(runner, "_answer", real)
    cut = tmp_path / "cut" / "tiny_MMStar.tsv"
    assert len(data.read_predictions(cut)) == 2
    with open(cut, "a") as f:
        f.write('"2"\t"half a row')  # killed in the middle of a write
    info, _ = runner.evaluate(model, processor, "MMStar", tsv, tmp_path / "cut", **kw)
    assert info.answered_now == 3
    assert cut.read_bytes() == open(whole.predictions, "rb").read()
    again, _ = runner.evaluate(model, processor, "MMStar", tsv, tmp_path / "cut", **kw)
    assert again.answered_now == 0 and cut.read_bytes() == open(whole.predictions, "rb").read()


def test_parquet_benchmark_end_to_end(tiny, tmp_path):
    import io

    import pandas as pd

    _, model, processor = tiny
    buf = io.BytesIO()
    Image.new("RGB", (50, 30), "gray").save(buf, format="PNG")
    pd.DataFrame([{"questionId": 10 + i, "question": f"What is written {i}?", "answers": ["a", "b"],
                   "image": {"bytes": buf.getvalue(), "path": None}} for i in range(3)]).to_parquet(
        tmp_path / "docvqa.parquet")
    info, scores = runner.evaluate(model, processor, "DocVQA_VAL", tmp_path / "docvqa.parquet", tmp_path / "o",
                                   batch_size=3, max_tokens=MAX_TOKENS, progress=False)
    assert [r["index"] for r in data.read_predictions(info.predictions)] == [10, 11, 12]
    assert scores.metric == "anls"


def _run(folder, name, rows, predictions):
    w = data.PredictionWriter(folder / f"{name}_MMStar.tsv", data.output_columns(rows))
    for r, p in zip(rows, predictions):
        w.write(r, p)
    (folder / f"{name}_MMStar.json").write_text(json.dumps({"benchmark": "MMStar", "predictions": str(w.path)}))


def test_compare_finds_flips_and_a_bootstrap_interval(tmp_path, capsys):
    rng = np.random.default_rng(3)
    n = 400
    rows = [{"index": i, "question": f"q{i}", "A": "x", "B": "y", "answer": "A"} for i in range(n)]
    right_a = rng.random(n) < 0.6
    flip = rng.random(n) < 0.15
    right_b = right_a ^ flip
    for name, right in (("a", right_a), ("b", right_b)):
        (tmp_path / name).mkdir()
        _run(tmp_path / name, name, rows, ["A" if ok else "B" for ok in right])
    (res,) = compare.compare(tmp_path / "a", tmp_path / "b", resamples=4000)
    assert {int(f["index"]) for f in res.flips} == set(np.flatnonzero(flip))
    assert math.isclose(res.difference, 100 * (right_b.mean() - right_a.mean()))
    d = 100 * (right_b.astype(float) - right_a)
    half = 1.96 * d.std() / math.sqrt(n)  # the bootstrap interval of a mean is close to the normal one
    assert abs(res.low - (d.mean() - half)) < 0.6 and abs(res.high - (d.mean() + half)) < 0.6
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) is None
    out = capsys.readouterr().out
    assert "| MMStar | 400 |" in out and f"{int((flip & right_b).sum())} / {int((flip & right_a).sum())}" in out
    assert json.loads((tmp_path / "c" / "compare.json").read_text())[0]["flips"][0]["index"] == str(
        np.flatnonzero(flip)[0])


def test_cli_eval_and_its_errors(tiny, tmp_path, capsys):
    built, _, _ = tiny
    tsv = write_tsv(tmp_path / "b.tsv", mcq_rows(3))
    main(["eval", "--model", str(built.original_dir), "--bench", "AI2D_TEST", "--data", str(tsv), "--out",
          str(tmp_path / "o"), "--max-tokens", str(MAX_TOKENS), "--limit", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert "**AI2D_TEST** (choice, 2 questions)" in out and "| Overall |" in out
    pred = tmp_path / "o" / f"{built.original_dir.name}_AI2D_TEST.tsv"
    main(["eval", "--bench", "AI2D_TEST", "--score-only", str(pred)])
    assert "**AI2D_TEST**" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x"])
    assert capsys.readouterr().err.strip() == "Error: eval needs --bench, --data (or --compare RUN_A RUN_B)"
    with pytest.raises(UserError, match="unknown benchmark"):
        runner.run("no-such-model", "Nope", tsv)
    with pytest.raises(UserError, match="holds predictions for other data"):
        pred.write_text('"index"\t"other"\t"prediction"\n')
        runner.evaluate(None, None, "AI2D_TEST", tsv, tmp_path / "o", model_name=built.original_dir.name)
