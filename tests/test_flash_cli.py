"""`mlx-internvl generate` on a Flash checkpoint whose context holds the prompt only as the router shortens it: the
CLI counts the routed prompt as the library does, and `--no-flash` counts every tile's 256 tokens."""

import json
from pathlib import Path
from shutil import copytree

from test_distributed import cli, run
from test_flash_distributed import IMAGES, MAX_TILES, PROMPT, checkpoint  # noqa: F401  (the fixture)

import mlx_internvl
from mlx_internvl.generate import stream_generate


def test_generate_cli_fits_a_prompt_only_the_router_makes_short_enough(checkpoint, tmp_path):  # noqa: F811
    model, processor = mlx_internvl.load(checkpoint, dtype="float32")
    routed = list(stream_generate(model, processor, PROMPT, IMAGES, max_tokens=1, max_tiles=MAX_TILES))[-1]
    full = list(stream_generate(model, processor, PROMPT, IMAGES, max_tokens=1, max_tiles=MAX_TILES,
                                flash=False))[-1]
    assert routed.prompt_tokens < full.prompt_tokens
    small = Path(copytree(checkpoint, tmp_path / "small"))
    cfg = json.loads((small / "config.json").read_text())
    cfg["llm_config"]["max_position_embeddings"] = routed.prompt_tokens + 4
    (small / "config.json").write_text(json.dumps(cfg))

    args = cli("generate", "--model", str(small), "--image", *IMAGES, "--prompt", PROMPT, "--max-tokens", "2",
               "--dtype", "float32", "--max-tiles", str(MAX_TILES))
    on = run(args)
    assert on.returncode == 0 and on.stdout.strip(), on.stderr[-2000:]
    off = run([*args, "--no-flash"])
    assert off.returncode != 0
    assert f"the prompt is {full.prompt_tokens} tokens" in off.stderr, off.stderr[-2000:]
