"""GPT-OSS tensor-parallel: two processes (mlx.launch, ring backend over localhost) against one process.

mlx-lm's gpt_oss `shard()` splits the attention heads with their sinks and every expert's hidden width; the tiny
checkpoint's sliding layers (window 8) are shorter than the prompt, so the rotating caches wrap on both sides. A
float model, one with LoRA on the attention and the experts, and a 4-bit one, each against the unsharded model.
"""

import dataclasses
import re

import pytest
from mlx.utils import tree_flatten
from test_distributed import PROMPT, check_two_ranks, cli, launcher, make_adapter, run
from test_parity import GPT_OSS

import mlx_internvl
from builders import Case
from mlx_internvl import sharding
from mlx_internvl.errors import UserError
from mlx_internvl.loading import load_model

# Each expert 64 wide, so that a rank's 32 columns of down_proj hold whole 32-wide quantization groups.
WIDE = Case("dist_gpt_oss", text="gpt_oss", template="internvl3_5_gpt_oss", seed=4,
            extra_text={"intermediate_size": 64})


def test_two_ranks_match_one_process(build_case, tmp_path):
    from mlx_internvl.convert.convert import convert

    float_dir = build_case(GPT_OSS).original_dir
    q4 = convert(build_case(WIDE).original_dir, tmp_path / "q4", dtype="float32", quantize_model=True, q_bits=4,
                 q_group_size=32)
    adapter = make_adapter(float_dir, tmp_path / "lora", seed=5)
    model, _ = mlx_internvl.load(float_dir, dtype="float32", adapter_path=adapter)
    adapted = {name.rsplit(".", 1)[0] for name, _ in tree_flatten(model.trainable_parameters())}
    assert any(n.endswith("mlp.experts.down_proj") for n in adapted), adapted  # expert LoRA is what is split here
    cases = {"gpt_oss": dict(model=str(float_dir)), "gpt_oss_lora": dict(model=str(float_dir), adapter=str(adapter)),
             "gpt_oss_4bit": dict(model=str(q4))}
    for name, c in cases.items():
        c.update(out=str(tmp_path / name), dtype="float32", min_split=6)  # 2 layers of q_proj, sinks, experts.down_proj
    check_two_ranks(cases, tmp_path)


def test_generate_cli_says_how_gpt_oss_is_split(build_case):
    """Under mlx.launch, `generate --verbose` prints the reply once, as one process does, and each rank reports
    its share of the heads (mlx-lm's gpt_oss keeps them as num_attention_heads / num_key_value_heads)."""
    args = cli("generate", "--model", str(build_case(GPT_OSS).original_dir), "--prompt", PROMPT, "--max-tokens", "12",
               "--dtype", "float32")
    one = run(args)
    two = run([*launcher(), *args, "--verbose"])
    assert one.returncode == 0 and one.stdout.strip(), one.stderr[-2000:]
    assert two.returncode == 0 and two.stdout == one.stdout, (two.stdout, one.stdout, two.stderr[-3000:])
    assert "Template: internvl3_5_gpt_oss" in two.stderr  # the harmony prompt, longer than the 8-token window
    assert re.search(r"Model split over 2 ranks, tensor parallel .*4 attention heads, 2 KV heads", two.stderr)
    assert re.findall(r"rank (\d): layers 0-1, 2 heads, 1 KV heads per layer", two.stderr) == ["0", "1"], two.stderr


def test_unsplittable_gpt_oss_is_a_clear_error(build_case):
    config = load_model(build_case(GPT_OSS).original_dir, dtype="float32")[0].config
    sharding.check_shardable(config, 2)
    with pytest.raises(UserError, match=r"llm_config.num_attention_heads is 4, which 3 ranks cannot split evenly "
                                        r"\(the attention heads and their sinks are divided"):
        sharding.check_shardable(config, 3)
    with pytest.raises(UserError, match=r"llm_config.num_key_value_heads is 2, which 4 ranks"):
        sharding.check_shardable(config, 4)
    # Each expert is 32 wide: 16 columns of down_proj per rank hold no whole 32-wide group.
    q4 = dataclasses.replace(config, quantization={"group_size": 32, "bits": 4})
    with pytest.raises(UserError, match=r"group_size 32 does not divide the per-rank down_proj input "
                                        r"\(intermediate_size\) = 16 \(2 ranks\)"):
        sharding.check_shardable(q4, 2)
    with pytest.raises(UserError, match="mlx-lm's gpt_oss model has no pipeline split"):
        sharding.check_shardable(config, 2, mode="pipeline")
