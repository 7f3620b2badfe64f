"""The Flash router under mlx.launch: two ring processes on localhost against one process, on the same tiny Flash
checkpoint (tests/test_flash_cache.py's: the suite's 448 px Qwen2 case plus seeded router and mlp2, thresholds that
compress the tiles above the request's median score; the one-process Flash path is checked against upstream in
tests/test_flash.py).

Split tensor-parallel and pipelined, the two ranks give one process's prompt logits (fp32, within 1e-4), and every
rank its greedy tokens, router decisions and (compressed) prompt length with the router on, and its full-resolution
logits and tokens with it off (`flash=False`), through `stream_generate` and `batch_generate`; rank 1 holds none
of the vision, router or mlp2 weights. Then the CLI (`generate --verbose`, a two-turn `chat`) and a `serve`d
request, asked twice.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ASSETS
from flash_dist_worker import prompt_logits
from test_distributed import cli, launcher, run
from test_flash_cache import CASE, flash_model

import mlx_internvl
from mlx_internvl.generate import batch_generate, stream_generate
from mlx_internvl.lora.fuse import save_mlx_model

HERE = Path(__file__).parent
IMAGES = [str(ASSETS / "images" / "image1.jpg"), str(ASSETS / "images" / "chelsea.png")]
PROMPT = "Image-1: <image>\nImage-2: <image>\nCompare them."
MAX_TILES, MAX_TOKENS = 2, 8
SPEC = dict(prompt=PROMPT, images=IMAGES, batch_prompt="Describe it.", max_tokens=MAX_TOKENS, max_tiles=MAX_TILES)
RANK0_ONLY = ("vision_model.", "mlp1.", "mlp2.", "gating.", "pooling_before_gating.")


@pytest.fixture(scope="module")
def checkpoint(build_case, tmp_path_factory):
    built = build_case(CASE)
    base, _ = mlx_internvl.load(built.original_dir, dtype="float32")
    out = tmp_path_factory.mktemp("flash_tp") / "ckpt"
    return str(save_mlx_model(flash_model(base, 0.5, 0.0), built.original_dir, out))


def one_process(path: str) -> dict:
    """What `flash_dist_worker.py` writes, from the unsharded model."""
    model, processor = mlx_internvl.load(path, dtype="float32")
    runs = {}
    for flash in (True, False):
        runs[f"logits.{flash}"] = prompt_logits(model, processor, SPEC, flash)
        out = list(stream_generate(model, processor, PROMPT, IMAGES, flash=flash, max_tokens=MAX_TOKENS,
                                   max_tiles=MAX_TILES))
        runs[str(flash)] = dict(tokens=[r.token for r in out], router=out[-1].router,
                                prompt_tokens=out[-1].prompt_tokens)
    batch = batch_generate(model, processor, ["Describe it."] * len(IMAGES), IMAGES, max_tokens=MAX_TOKENS,
                           max_tiles=MAX_TILES)
    runs["batch"] = dict(tokens=batch.token_ids)
    return runs


@pytest.mark.slow
def test_two_ranks_route_as_one_process(checkpoint, tmp_path):
    cases = [dict(model=checkpoint, mode=mode, out=str(tmp_path / mode)) for mode in ("tensor", "pipeline")]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(dict(SPEC, cases=cases)))
    r = run([*launcher(), sys.executable, str(HERE / "flash_dist_worker.py"), str(spec)], timeout=400)
    # mlx.launch exits 0 even when a rank fails: the ranks' `Error:` lines and the files they wrote tell.
    assert r.returncode == 0 and "Error" not in r.stderr, (r.stdout[-2000:], r.stderr[-3000:])
    one = one_process(checkpoint)
    routed, full = one["True"], one["False"]
    # The case in point: the router compresses some tiles and keeps others, so the routed prompt is shorter.
    assert "low(" in routed["router"] and "full(" in routed["router"], routed["router"]
    assert routed["prompt_tokens"] < full["prompt_tokens"] and full["router"] is None
    for c in cases:
        ranks = [json.loads(Path(f"{c['out']}.{k}.json").read_text()) for k in (0, 1)]
        for flash in (True, False):
            two, logits = np.load(f"{c['out']}.logits.{flash}.npy"), one[f"logits.{flash}"]
            assert two.shape == logits.shape, (c["mode"], flash)
            diff = float(np.abs(two - logits).max())
            assert diff < 1e-4, (c["mode"], flash, diff)  # tests/test_distributed.py's fp32 tolerance
        for rank, got in enumerate(ranks):
            for key in ("True", "False", "batch"):
                assert got[key] == one[key], (c["mode"], rank, key, got[key], one[key])
        assert all(any(k.startswith(p) for k in ranks[0]["params"]) for p in RANK0_ONLY)
        assert not [k for k in ranks[1]["params"] if k.startswith(RANK0_ONLY)], c["mode"]


@pytest.mark.slow
def test_generate_and_chat_cli(checkpoint):
    """`generate --verbose`: the reply once and the router's line as one process prints them; a two-turn `chat`
    with an image (the router decides again each turn) replies as one process."""
    args = cli("generate", "--model", checkpoint, "--image", *IMAGES, "--prompt", PROMPT, "--max-tokens",
               str(MAX_TOKENS), "--dtype", "float32", "--max-tiles", str(MAX_TILES), "--verbose")
    one, two = run(args), run([*launcher(), *args])
    assert one.returncode == 0 and two.returncode == 0 and "Error" not in two.stderr, two.stderr[-3000:]
    assert one.stdout.strip() and two.stdout == one.stdout, (two.stdout, one.stdout)
    line = [ln for ln in one.stderr.splitlines() if ln.startswith("Flash router:")]
    assert len(line) == 1 and [ln for ln in two.stderr.splitlines() if ln.startswith("Flash router:")] == line

    args = cli("chat", "--model", checkpoint, "--dtype", "float32", "--max-tokens", "6", "--max-tiles",
               str(MAX_TILES))
    script = f"/image {IMAGES[0]}\nWhat is it?\n/image {IMAGES[1]}\nAnd this one?\n/exit\n"
    one, two = run(args, input=script), run([*launcher(), *args], input=script)
    assert one.returncode == 0 and len(one.stdout.splitlines()) == 2, (one.stdout, one.stderr[-2000:])
    assert two.stdout == one.stdout, (two.stdout, one.stdout, two.stderr[-2000:])


def test_one_request_served_by_two_ranks(checkpoint, tmp_path):
    """The same reply and (routed) prompt length as the one-process server, asked twice (the second time rank 0
    finds the image's projections in its vision cache, the follower its stand-in)."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from test_distributed_serve import launched_serve

    from server_util import serving, user

    def ask(url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = []
        for _ in range(2):
            r = client.chat.completions.create(model="tiny", messages=[user("Compare them.", *map(Path, IMAGES))],
                                               temperature=0, max_tokens=MAX_TOKENS)
            out.append((r.choices[0].message.content, r.usage.prompt_tokens))
        return out

    with serving(checkpoint, max_tiles=MAX_TILES, max_tokens=MAX_TOKENS) as (url, _):
        expected = ask(url)
    with serving(checkpoint, max_tiles=MAX_TILES, max_tokens=MAX_TOKENS, flash=False) as (url, _):
        full = ask(url)
    assert expected[0] == expected[1] and expected[0][1] < full[0][1]
    with launched_serve(checkpoint, tmp_path / "serve.log", "--max-tiles", str(MAX_TILES), "--max-tokens",
                        str(MAX_TOKENS)) as (url, _):
        assert ask(url) == expected
