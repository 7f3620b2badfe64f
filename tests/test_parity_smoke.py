"""A first end-to-end check of both layouts against transformers (the full matrix lives in test_parity.py)."""

import numpy as np
import pytest
from conftest import ASSETS

import mlx_internvl
from builders import Case
from mlx_internvl.parity import compare, mlx_stages
from mlx_internvl.reference import ReferenceModel


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_qwen2_both_layouts_match_transformers(build_case, layout):
    built = build_case(Case("smoke_qwen2"))
    path = built.hf_dir if layout == "hf" else built.original_dir
    model, proc = mlx_internvl.load(path, dtype="float32")
    inputs = proc("What is in the picture?", images=[ASSETS / "images" / "image1.jpg"], max_tiles=4)
    ours = mlx_stages(model, inputs["input_ids"], inputs["pixel_values"], 16)
    ref = ReferenceModel(built.model).run_stages(np.array(inputs["input_ids"]), np.array(inputs["pixel_values"]), 16)
    report = compare(ref, ours)
    assert report["vision_features"]["max_abs"] < 1e-5
    assert report["logits"]["max_abs"] < 1e-4
    assert report["greedy_tokens"]["agree"] == 16
