"""`mlx-internvl eval --server URL`: the same run through a `mlx-internvl serve` on 127.0.0.1, with the real
`openai` client, writes the very predictions file the local run writes (same prompts, images, tile limits, greedy
decoding), in file order whatever order the concurrent replies come back in, and resumes like the local run."""

from __future__ import annotations

import pytest
from test_eval_data import png_b64, write_tsv

from builders import Case
from mlx_internvl.cli.main import main
from mlx_internvl.errors import UserError
from mlx_internvl.evaluation import runner, served
from server_util import serving

MAX_TOKENS = 4
COLORS = ["red", "green", "blue", "white", "black", "yellow"]


@pytest.fixture(scope="module")
def tiny(build_case):
    return build_case(Case("smoke_qwen2"))


def mmstar_rows(n: int = 5):
    # Wide pictures: MMStar's limit of 6 tiles gives another grid than the server's default (the config's 12).
    return [{"index": i, "question": f"What color is picture {i}?", "hint": "Look." if i % 2 else None,
             "A": COLORS[i % 6], "B": COLORS[(i + 1) % 6], "answer": "AB"[i % 2], "category": "color",
             "image": png_b64(COLORS[i % 6], (56 * (8 + i), 56 + 3 * i))} for i in range(n)]


def mmmu_rows(n: int = 3):
    # Several images per question, the first one upscaled 2x by the recipe: a 60 px square is one 56 px tile,
    # upscaled it is a 3x3 grid plus the thumbnail.
    return [{"index": 10 + i, "question": f"<image 1> What differs in {i}?", "A": "size", "B": "color",
             "answer": "A", "image": str([png_b64(COLORS[i], (60 + i, 60)), png_b64(COLORS[i + 1], (30, 70))][
                 :1 + i % 2])} for i in range(n)]


def coco_rows(n: int = 3):
    # No question column: the captioning recipe asks VLMEvalKit's default question.
    return [{"index": 20 + i, "answer": str([f"a {COLORS[i]} square", f"{COLORS[i]} paint"]),
             "image": png_b64(COLORS[i], (90, 60 + 20 * i))} for i in range(n)]


@pytest.mark.parametrize("bench, rows", [("MMStar", mmstar_rows()), ("MMMU_DEV_VAL", mmmu_rows()),
                                         ("COCO_VAL", coco_rows())])
def test_server_predictions_equal_the_local_run(tiny, tmp_path, bench, rows):
    tsv = write_tsv(tmp_path / f"{bench}.tsv", rows)
    local, _ = runner.run(tiny.original_dir, bench, tsv, tmp_path / "local", batch_size=2, max_tokens=MAX_TOKENS,
                          progress=False)
    with serving(tiny.original_dir) as (url, _):
        first, _ = served.evaluate_served(url, bench, tsv, tmp_path / "served", concurrency=3, limit=2,
                                          max_tokens=MAX_TOKENS, progress=False)
        assert first.answered_now == 2
        info, scores = served.evaluate_served(url, bench, tsv, tmp_path / "served", concurrency=3,
                                              max_tokens=MAX_TOKENS, progress=False)  # resumes: the rest
    assert info.answered_now == len(rows) - 2 and info.predictions.endswith(f"tiny_{bench}.tsv")
    assert open(info.predictions, "rb").read() == open(local.predictions, "rb").read()
    assert set(scores.items) == {str(r["index"]) for r in rows}
    assert "question" in open(info.predictions).readline()  # the asked question is in the predictions file


def test_cli_server_mode_and_its_errors(tiny, tmp_path, capsys):
    tsv = write_tsv(tmp_path / "b.tsv", mmstar_rows(3))
    with serving(tiny.original_dir, model_name="org/tiny") as (url, _):
        main(["eval", "--server", url + "/v1", "--bench", "MMStar", "--data", str(tsv), "--out",
              str(tmp_path / "o"), "--max-tokens", str(MAX_TOKENS), "--concurrency", "2", "--no-progress"])
        assert "**MMStar** (choice, 3 questions)" in capsys.readouterr().out
        assert (tmp_path / "o" / "org_tiny_MMStar.tsv").is_file()
        with pytest.raises(UserError, match=r"question 0: the server answered 404: .*no-such"):
            served.evaluate_served(url, "MMStar", tsv, tmp_path / "x", model="no-such", progress=False)
    with pytest.raises(UserError, match="cannot reach the server"):
        served.evaluate_served(url, "MMStar", tsv, tmp_path / "y", progress=False)
    with pytest.raises(SystemExit):
        main(["eval", "--server", url, "--bench", "MMStar"])
    assert capsys.readouterr().err.strip() == "Error: eval needs --data (or --compare RUN_A RUN_B)"
    with pytest.raises(UserError, match="expected an http"):
        served.evaluate_served("127.0.0.1:1", "MMStar", tsv, tmp_path / "z")
