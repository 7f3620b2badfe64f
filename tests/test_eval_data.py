"""Benchmark readers (VLMEvalKit TSV, Hugging Face parquet) and the prompts VLMEvalKit's InternVL wrapper builds
(tests/fixtures/eval/prompts.json: its own `build_prompt` + `generate_inner` on these rows)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mlx_internvl.errors import UserError
from mlx_internvl.evaluation import benchmarks, data, prompts

PROMPTS = json.loads((Path(__file__).parent / "fixtures" / "eval" / "prompts.json").read_text())


@pytest.mark.parametrize("case", PROMPTS, ids=lambda c: f"{c['dataset']}-{c['row']['index']}")
def test_prompt_and_tiles_equal_vlmevalkit_internvl_wrapper(case):
    bench = benchmarks.resolve(case["dataset"])
    n = len(case["row"]["image_path"])
    assert prompts.question_text(bench, case["row"], n) == case["question"]
    assert [bench.tiles_per_image(n)] * n == case["max_num"]
    assert [bench.upscale_first_image and i == 0 for i in range(n)] == case["upscale"]
    assert case["generation"] == {"do_sample": False, "max_new_tokens": 4096}


def test_prompt_fixture_covers_each_kind():
    questions = [c["question"] for c in PROMPTS]
    assert any("请直接回答选项字母" in q for q in questions)
    assert any("Answer the question directly." in q for q in questions)
    assert any(q.startswith("Image-1: <image>\nImage-2: <image>\nImage-3") for q in questions)
    assert any(q.endswith(prompts.SHORT_ANSWER) for q in questions)


def test_caption_file_without_questions_gets_vlmevalkits_question(tmp_path):
    """COCO_VAL's TSV has no question column; VLMEvalKit's caption dataset supplies one (the fixture's rows that
    went through its `load_data`), and the wrapper passes it through as is."""
    cases = [c for c in PROMPTS if c["dataset"] == "COCO_VAL"]
    asked = [c for c in cases if c["row"]["question"] == prompts.CAPTION_QUESTION]
    assert asked and len(asked) < len(cases)  # some rows went through load_data, some had their own question
    bench = benchmarks.resolve("COCO_VAL")
    tsv = write_tsv(tmp_path / "coco.tsv", [{"index": 1, "answer": "['a cat']", "image": png_b64("red")}])
    (row,) = data.read_benchmark(tsv, prompts.default_question(bench))
    assert prompts.question_text(bench, row, 1) == asked[0]["question"]
    with pytest.raises(UserError, match="no 'question' column"):
        data.read_benchmark(tsv)


def png_b64(color, size=(40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path: Path, rows) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def test_vlmevalkit_tsv_reader(tmp_path):
    red, blue = png_b64("red"), png_b64("blue", (20, 50))
    rows = [{"index": 1, "question": "Q1", "hint": "h", "A": "x", "B": "y", "answer": "A", "image": red},
            {"index": 1000001, "question": "Q1", "hint": None, "A": "y", "B": "x", "answer": "B", "image": "1"},
            {"index": 2, "question": "Q2", "hint": None, "A": "None", "B": 3, "answer": "B",
             "image": str([red, blue])}]
    got = data.read_benchmark(write_tsv(tmp_path / "b.tsv", rows))
    assert [r["index"] for r in got] == [1, 1000001, 2]
    assert got[1]["image"] == [red]  # a short cell points at another row's image
    assert len(got[2]["image"]) == 2 and data.decode_image(got[2]["image"][1]).size == (20, 50)
    assert data.is_missing(got[1]["hint"]) and data.is_missing(got[2]["A"])  # as pandas (and VLMEvalKit) read it
    bench = benchmarks.resolve("MMBench_DEV_EN")
    assert prompts.question_text(bench, got[0], 1) == (
        "<image>\nh\nQ1\nA. x\nB. y\nAnswer with the option's letter from the given choices directly.")


def test_tsv_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        data.read_benchmark(tmp_path / "missing.tsv")
    bad = write_tsv(tmp_path / "bad.tsv", [{"index": 1, "question": "q", "image": "7"}])
    with pytest.raises(UserError, match="row 1: image cell '7' names no row with an image"):
        data.read_benchmark(bad)
    dup = write_tsv(tmp_path / "dup.tsv", [{"index": 1, "question": "q"}, {"index": 1, "question": "r"}])
    with pytest.raises(UserError, match="index 1 appears twice"):
        data.read_benchmark(dup)


def test_parquet_export_reader(tmp_path):
    import pandas as pd

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "green").save(buf, format="PNG")
    folder = tmp_path / "hf" / "data"
    folder.mkdir(parents=True)
    pd.DataFrame([{"questionId": 7, "question": "What?", "answers": ["a", "b"],
                   "image": {"bytes": buf.getvalue(), "path": None}}]).to_parquet(folder / "val-0.parquet")
    pd.DataFrame([{"question": "Which?", "options": "['p', 'q']", "answer": "B",
                   "image_1": {"bytes": buf.getvalue(), "path": None}, "image_2": None}]).to_parquet(
        tmp_path / "mmmu.parquet")
    doc = data.read_benchmark(tmp_path / "hf")
    assert doc[0]["index"] == 7 and doc[0]["answer"] == "['a', 'b']"
    assert data.decode_image(doc[0]["image"][0]).size == (16, 16)
    mmmu = data.read_benchmark(tmp_path / "mmmu.parquet")
    assert (mmmu[0]["A"], mmmu[0]["B"], len(mmmu[0]["image"])) == ("p", "q", 1)


def test_large_base64_image_and_a_file_path_decode(tmp_path):
    import numpy as np

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    assert data.decode_image(base64.b64encode(buf.getvalue()).decode()).size == (200, 300)
    noise.save(tmp_path / "p.png")
    assert data.decode_image(str(tmp_path / "p.png")).size == (200, 300)
    with pytest.raises(UserError, match="neither a picture"):
        data.decode_image("bm90IGFuIGltYWdl")


def test_mmmu_first_image_is_upscaled():
    bench = benchmarks.resolve("MMMU_DEV_VAL")
    ims = prompts.row_images(bench, {"image": [png_b64("red", (10, 8)), png_b64("red", (10, 8))]})
    assert [im.size for im in ims] == [(20, 16), (10, 8)]
    assert prompts.row_images(benchmarks.resolve("MMStar"), {"image": [png_b64("red", (10, 8))]})[0].size == (10, 8)
