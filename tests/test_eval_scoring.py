"""Our benchmark scorers against scores VLMEvalKit's own functions computed on the same predictions
(tests/fixtures/eval/scores.json, made by tests/fixtures/eval/make_vlmeval_fixtures.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mlx_internvl.errors import UserError
from mlx_internvl.evaluation import benchmarks, scoring

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "eval" / "scores.json").read_text())


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("case", FIXTURES["vqa"], ids=lambda c: c["dataset"])
def test_open_answer_scores_equal_vlmevalkit(case):
    bench = benchmarks.resolve(case["dataset"])
    got = scoring.score(bench, case["rows"])
    wrong = [(r["answer"], r["prediction"], r["score"], got.items[str(r["index"])]) for r in case["rows"]
             if not _close(r["score"], got.items[str(r["index"])])]
    assert not wrong, wrong[:5]
    assert _close(got.overall, case["overall"])
    assert len({r["score"] for r in case["rows"]}) > 1  # the fixture is not all-right or all-wrong


def _report(case):
    """VLMEvalKit's report_acc rows (fractions) as our table's keys (percent)."""
    out = {}
    for rec in case["report"]:
        split = rec.pop("split")
        for k, v in rec.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                out[k if split == "none" else (f"split={split}" if k == "Overall" else None)] = 100 * v
    out.pop(None, None)
    return out


@pytest.mark.parametrize("case", FIXTURES["mcq"], ids=lambda c: c["dataset"])
def test_multiple_choice_scores_equal_vlmevalkit(case):
    got = scoring.score(benchmarks.resolve(case["dataset"]), case["rows"])
    assert {k: int(v) for k, v in got.items.items()} == case["hits"]
    for key, value in _report(case).items():
        assert _close(got.table[key], value), key


def test_circular_evaluation_equals_vlmevalkit():
    case = FIXTURES["circular"]
    got = scoring.score(benchmarks.resolve(case["dataset"]), case["rows"])
    assert {k: int(v) for k, v in got.items.items()} == case["hits"]
    report = _report(case)
    assert set(report) <= set(got.table)
    for key, value in report.items():
        assert _close(got.table[key], value), key
    # Circular is stricter than scoring each rotation alone, on this fixture.
    plain = scoring.score(benchmarks.Benchmark("x", "MCQ", "choice", 6), case["rows"])
    assert got.overall < plain.overall


def test_ocrbench_equals_vlmevalkit():
    case = FIXTURES["ocrbench"]
    got = scoring.score(benchmarks.resolve("OCRBench"), case["rows"])
    assert [got.items[str(r["index"])] for r in case["rows"]] == [r["score"] for r in case["rows"]]
    for key in ("Text Recognition", "Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
                "Handwritten Mathematical Expression Recognition", "Final Score"):
        assert got.table[key] == case["report"][key], key


@pytest.mark.parametrize("case", FIXTURES["caption"], ids=lambda c: f"{len(c['rows'])}-captions")
def test_caption_scores_equal_vlmevalkit(case):
    """COCO captions: VLMEvalKit's ImageCaptionDataset.evaluate (BLEU-1..4, ROUGE-L, CIDEr, times 100)."""
    got = scoring.score(benchmarks.resolve(case["dataset"]), case["rows"])
    report = case["report"]
    want = {f"Bleu_{n + 1}": b for n, b in enumerate(report["Bleu"])}
    want.update(ROUGE_L=report["ROUGE_L"], CIDEr=report["CIDEr"], Overall=report["CIDEr"])
    assert got.table.keys() == want.keys()
    for key, value in want.items():
        assert _close(got.table[key], value), (key, got.table[key], value)
    # the per-question scores (what --compare pairs) average to the corpus CIDEr
    assert _close(100 * sum(got.items.values()) / len(got.items), report["CIDEr"])


def test_tile_limits_and_kinds_follow_the_wrapper():
    assert benchmarks.resolve("DocVQA_VAL").max_tiles == 18
    assert benchmarks.resolve("InfoVQA_TEST").max_tiles == 24
    assert benchmarks.resolve("MMMU_DEV_VAL").tiles_per_image(3) == 12
    assert benchmarks.resolve("MMBench_DEV_EN").tiles_per_image(20) == 3
    assert benchmarks.resolve("MMBench_DEV_CN_V11").metric == "circular"


def test_unknown_benchmark_and_bad_predictions_are_clear_errors():
    with pytest.raises(UserError, match="unknown benchmark.*MMBench_DEV_EN"):
        benchmarks.resolve("MyBench")
    with pytest.raises(UserError, match=r"lack the column\(s\) \['prediction'\]"):
        scoring.score(benchmarks.resolve("TextVQA_VAL"), [{"index": 1, "answer": "x"}])


@pytest.mark.parametrize("case", FIXTURES["vqa"] + FIXTURES["mcq"] + [FIXTURES["circular"], FIXTURES["ocrbench"]]
                         + FIXTURES["caption"][:1],
                         ids=lambda c: c.get("dataset", "OCRBench"))
def test_scores_survive_the_predictions_file(case, tmp_path):
    """Written by our PredictionWriter and read back as a predictions file, the rows score as VLMEvalKit scored
    them: replies are read verbatim (even "N/A" or "None"). A reference cell pandas reads as missing ("N/A") is
    missing for VLMEvalKit too, which loads benchmark files with pandas; those rows are left out."""
    from mlx_internvl.evaluation import data

    na = {"N/A", "NA", "n/a", "None", "null", "NULL", "nan", "NaN", "", "<NA>", "#N/A"}
    rows = [r for r in case["rows"] if r["answer"] not in na]
    case = dict(case, rows=rows)
    inputs = [{k: v for k, v in r.items() if k not in ("prediction", "score")} for r in rows]
    writer = data.PredictionWriter(tmp_path / "p.tsv", data.output_columns(inputs))
    for row, src in zip(inputs, case["rows"]):
        writer.write(row, src["prediction"])
    bench = benchmarks.resolve(case.get("dataset", "OCRBench"))
    direct = scoring.score(bench, case["rows"])
    again = scoring.score(bench, data.read_predictions(tmp_path / "p.tsv"))
    assert again.items == direct.items and again.table.keys() == direct.table.keys()


def test_replies_are_read_back_verbatim(tmp_path):
    from mlx_internvl.evaluation import data

    rows = [{"index": i, "answer": "x"} for i in range(4)]
    writer = data.PredictionWriter(tmp_path / "p.tsv", data.output_columns(rows))
    for row, reply in zip(rows, ["N/A", "None", "", "null"]):
        writer.write(row, reply)
    assert [r["prediction"] for r in data.read_predictions(tmp_path / "p.tsv")] == ["N/A", "None", "", "null"]
