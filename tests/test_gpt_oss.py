"""InternVL3.5-GPT-OSS beyond the parity matrix: OpenAI's mxfp4 experts, dequantized by transformers as the oracle.

The parity matrix (`test_parity.py`, branches `backbone-gpt_oss`, `hf-layout-current-gpt_oss`) covers the float
checkpoint: sinks, sliding and full layers, fused experts, YaRN without truncation.
"""

from __future__ import annotations

import copy
import shutil

import mlx.core as mx
import numpy as np
import pytest
from test_parity import GPT_OSS, TOKENS, Spec, check, make_inputs

from mlx_internvl.loading import load_model
from mlx_internvl.parity import compare, mlx_stages
from mlx_internvl.reference import ReferenceModel


def _mxfp4(rng, shape):
    """Random mxfp4 experts as OpenAI stores them: `blocks [E, out, in/32, 16]` uint8 (two fp4 codes a byte) and
    `scales [E, out, in/32]` (exponents biased by 127; 2^-5..2^-3 keeps the tiny model's logits apart)."""
    e, out, n_in = shape
    blocks = rng.integers(0, 256, (e, out, n_in // 32, 16), dtype=np.uint8)
    scales = rng.integers(122, 125, (e, out, n_in // 32), dtype=np.uint8)
    return blocks, scales


@pytest.fixture(scope="module")
def mxfp4_checkpoint(build_case, tmp_path_factory):
    """The GPT-OSS fixture with its experts replaced by random mxfp4 blocks, and the transformers model holding
    what transformers' own mxfp4 dequantization makes of them."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    built = build_case(GPT_OSS)
    out = tmp_path_factory.mktemp("gpt_oss_mxfp4") / "original"
    shutil.copytree(built.original_dir, out)
    state = load_file(str(out / "model.safetensors"))
    model = copy.deepcopy(built.model)
    rng = np.random.default_rng(11)
    text = model.config.text_config
    shapes = {"gate_up_proj": (text.num_local_experts, 2 * text.intermediate_size, text.hidden_size),
              "down_proj": (text.num_local_experts, text.hidden_size, text.intermediate_size)}
    for i, layer in enumerate(model.model.language_model.layers):
        for name, shape in shapes.items():
            key = f"language_model.model.layers.{i}.mlp.experts.{name}"
            blocks, scales = (torch.from_numpy(a) for a in _mxfp4(rng, shape))
            del state[key]
            state[key + "_blocks"], state[key + "_scales"] = blocks, scales
            with torch.no_grad():
                dense = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
                getattr(layer.mlp.experts, name).copy_(dense)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return built, model, out


def test_mxfp4_experts_match_transformers_dequantization(mxfp4_checkpoint):
    """Loading OpenAI's mxfp4 expert tensors (dequantized on conversion) gives the logits and greedy tokens of
    transformers running the same bytes dequantized by its own mxfp4 code."""
    built, model, path = mxfp4_checkpoint
    ids, pixels = make_inputs(built, Spec(GPT_OSS))
    ref = ReferenceModel(model).run_stages(ids, pixels, TOKENS)
    ours, _ = load_model(path, dtype="float32")
    gate = ours.language_model.model.layers[0].mlp.experts.gate_proj.weight
    assert gate.dtype == mx.float32 and gate.shape == (4, 32, 64)  # dense [E, I, H]: dequantized, not kept packed
    check(compare(ref, mlx_stages(ours, mx.array(ids), mx.array(pixels), TOKENS)), "mxfp4 experts")
