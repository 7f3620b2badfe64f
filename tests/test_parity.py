"""The parity matrix: one test id per config branch, MLX against transformers, stage by stage, in fp32.

Every branch loads the same tiny seeded checkpoint in each of its layouts (original OpenGVLab, `-hf` as written by
transformers' `save_pretrained` (legacy prefixes), and, where named, the current `model.`-prefixed layout written
from `model.state_dict()`), runs the MLX model, and compares it with two transformers runs: the
`InternVLForConditionalGeneration` the builder made, and the same class loaded back from the `-hf` directory with
`ReferenceModel.from_pretrained`. ps_version v1 exists only in the original layout; its reference is
`ReferenceModel.from_pretrained` on the original directory (transformers plus the v1 token order).

Bounds: vision features 1e-5 max-abs, logits 1e-4 max-abs, all greedy tokens identical (16 per row).
Builds and results are cached per module, so branches that share a checkpoint and inputs share the work.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
import numpy as np
import pytest

from builders import Case
from mlx_internvl.errors import UserError
from mlx_internvl.loading import load_model
from mlx_internvl.model import merge_image_features
from mlx_internvl.parity import compare, mlx_stages
from mlx_internvl.reference import ReferenceModel

TOKENS = 16
VISION_TOL, LOGITS_TOL = 1e-5, 1e-4
# Projected image rows and merged embeddings go through one more LayerNorm + two Linears than the ViT output.
FEATURE_TOL = 1e-4

# Phi-3 longrope factors for head_dim 16 (8 frequencies); long ones differ enough to change every logit.
SHORT = [1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 1.7]
LONG = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]

QWEN2 = Case("m_qwen2")
QWEN3_MOE = Case("m_qwen3_moe", text="qwen3_moe", seed=2)
INTERNLM2 = Case("m_internlm2", text="internlm2", template="internlm2-chat")
QWEN2_DYN = Case("m_qwen2_dyn", extra_text={"max_position_embeddings": 64},
                 rope_scaling={"rope_type": "dynamic", "factor": 2.0})
INTERNLM2_DYN = Case("m_internlm2_dyn", text="internlm2", template="internlm2-chat",
                     extra_text={"max_position_embeddings": 64}, rope_scaling={"rope_type": "dynamic", "factor": 3.0})
# original_max_position_embeddings 64, max_position_embeddings 256 (builders.text_config).
GPT_OSS = Case("m_gpt_oss", text="gpt_oss", template="internvl3_5_gpt_oss", seed=4)
PHI3 = Case("m_phi3", text="phi3", template="phi3-chat", kv_heads=4,
            rope_scaling={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG})


@dataclass(frozen=True)
class Spec:
    """A checkpoint plus the request run through it: `text` tokens per row, `images` tiles per image."""

    case: Case
    text: int = 20
    images: Tuple[int, ...] = (1,)
    batch: int = 1
    layouts: Tuple[str, ...] = ("original", "hf")
    regime: str = ""  # "below"/"above"/"crossing": where prompt + generated tokens sit w.r.t. the rope limit

    @property
    def key(self):
        return (self.case.name, self.text, self.images, self.batch)


BRANCHES: Dict[str, Spec] = {
    # every backbone
    "backbone-qwen2": Spec(QWEN2),
    "backbone-qwen3": Spec(Case("m_qwen3", text="qwen3")),
    "backbone-qwen3_moe": Spec(QWEN3_MOE),
    "backbone-llama": Spec(Case("m_llama", text="llama", template="Hermes-2")),
    "backbone-internlm2": Spec(INTERNLM2),
    "backbone-phi3": Spec(PHI3),
    # sinks, sliding (window 8) and full layers, fused experts, YaRN without truncation
    "backbone-gpt_oss": Spec(GPT_OSS),
    # both vision styles
    "vision-300m": Spec(QWEN2),
    "vision-6b": Spec(Case("m_vit6b", vision="6b", text="internlm2", template="internlm2-chat")),
    # which ViT layer feeds the projector
    "select_layer--1": Spec(QWEN2),
    "select_layer--2": Spec(Case("m_sel-2", select_layer=-2)),
    "select_layer-1": Spec(Case("m_sel1", select_layer=1, vision="6b")),
    # pixel shuffle token order
    "ps-v1": Spec(Case("m_psv1", ps_version="v1", text="internlm2", template="internlm2-chat"), layouts=("original",)),
    "ps-v2": Spec(QWEN2),
    # rope scaling of released checkpoints; max_position_embeddings is 64 so both sides of it are cheap to reach
    "rope-dynamic-qwen2-below": Spec(QWEN2_DYN, text=20, regime="below"),
    "rope-dynamic-qwen2-crossing": Spec(QWEN2_DYN, text=48, regime="crossing"),
    "rope-dynamic-qwen2-above": Spec(QWEN2_DYN, text=90, regime="above"),
    "rope-dynamic-internlm2-below": Spec(INTERNLM2_DYN, text=20, regime="below"),
    "rope-dynamic-internlm2-above": Spec(INTERNLM2_DYN, text=90, regime="above"),
    "rope-longrope-short": Spec(PHI3, regime="below"),
    "rope-longrope-crossing": Spec(PHI3, text=48, regime="crossing"),
    "rope-longrope-long": Spec(PHI3, text=90, regime="above"),
    # lm_head
    "head-tied": Spec(Case("m_tied", tie=True)),
    "head-untied": Spec(QWEN2),
    # grouped-query attention, through InternLM2's per-group wqkv
    "gqa-kv1": Spec(Case("m_internlm2_kv1", text="internlm2", kv_heads=1, template="internlm2-chat")),
    "gqa-kv2": Spec(INTERNLM2),
    "gqa-kv4": Spec(Case("m_internlm2_kv4", text="internlm2", kv_heads=4, template="internlm2-chat")),
    # both -hf key layouts
    "hf-layout-legacy": Spec(QWEN2, layouts=("hf",)),
    "hf-layout-current": Spec(QWEN2, layouts=("hf_current",)),
    "hf-layout-current-moe": Spec(QWEN3_MOE, layouts=("hf_current",)),
    "hf-layout-current-gpt_oss": Spec(GPT_OSS, layouts=("hf_current",)),
    "hf-layout-current-tied": Spec(Case("m_tied", tie=True), layouts=("hf_current",)),
    # merging image rows into the text
    "multi-image": Spec(QWEN2, text=24, images=(2, 1)),
    "batch2": Spec(QWEN2, text=16, images=(1, 2), batch=2),
}

_RESULTS: dict = {}


def _special_ids(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(built.hf_dir))
    return tok.convert_tokens_to_ids("<img>"), tok.convert_tokens_to_ids("</img>")


def make_inputs(built, spec: Spec):
    """Seeded `input_ids [B, L]` (byte tokens around `<img><IMG_CONTEXT>*n</img>` blocks) and pixels `[P, S, S, 3]`."""
    rng = np.random.default_rng(len(spec.case.name) * 1000 + spec.text * 10 + spec.batch)
    start, end = _special_ids(built)
    per_tile = (spec.case.image_size // 14) ** 2 // 4
    rows = []
    for _ in range(spec.batch):
        cuts = np.linspace(0, spec.text, len(spec.images) + 2).astype(int)
        text = rng.integers(0, 256, spec.text).tolist()
        row = text[: cuts[1]]
        for k, tiles in enumerate(spec.images):
            row += [start] + [built.image_token_id] * (per_tile * tiles) + [end] + text[cuts[k + 1]:cuts[k + 2]]
        rows.append(row)
    n_tiles = spec.batch * sum(spec.images)
    size = spec.case.image_size
    pixels = rng.standard_normal((n_tiles, size, size, 3)).astype(np.float32)
    return np.array(rows, dtype=np.int32), pixels


def write_current_layout(built, root: Path) -> Path:
    """The `-hf` checkpoint with transformers' current key names (`model.vision_tower.`, `model.language_model.`,
    `lm_head.`), straight from `model.state_dict()` (MoE experts stay fused as transformers holds them)."""
    from safetensors.torch import save_file

    out = root / f"{built.case.name}_hf_current"
    if out.exists():
        return out
    tmp = root / f"{built.case.name}_hf_current.tmp"
    shutil.copytree(built.hf_dir, tmp)
    (tmp / "model.safetensors").unlink()
    state = {k: v.detach().clone().contiguous() for k, v in built.model.state_dict().items()}
    if built.case.tie:
        state.pop("lm_head.weight")
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(out)
    return out


def layout_dir(built, layout: str, root: Path) -> Path:
    if layout == "original":
        return built.original_dir
    if layout == "hf":
        return built.hf_dir
    return write_current_layout(built, root)


def run_spec(build_case, checkpoint_root, spec: Spec) -> dict:
    """Stages of the references and of the MLX model in every layout the spec names (cached)."""
    built = build_case(spec.case)
    key = spec.key
    res = _RESULTS.setdefault(key, {"built": built, "mlx": {}})
    if "inputs" not in res:
        res["inputs"] = make_inputs(built, spec)
    ids, pixels = res["inputs"]
    if "refs" not in res:
        if spec.case.ps_version == "v1":
            # transformers' own InternVL has no v1 order; the reference adds it (and only it) to the original load.
            ref = ReferenceModel.from_pretrained(built.original_dir, device="cpu",
                                                 image_token_id=built.image_token_id)
            assert ref.ps_version == "v1"
            res["refs"] = {"original": ref.run_stages(ids, pixels, TOKENS)}
            res["v2_for_contrast"] = ReferenceModel(built.model).run_stages(ids, pixels, 0)
        else:
            res["refs"] = {
                "built": ReferenceModel(built.model).run_stages(ids, pixels, TOKENS),
                "hf_loaded": ReferenceModel.from_pretrained(built.hf_dir, device="cpu").run_stages(ids, pixels, TOKENS),
            }
    for layout in spec.layouts:
        if layout not in res["mlx"]:
            model, _ = load_model(layout_dir(built, layout, checkpoint_root), dtype="float32")
            assert model.image_token_id == built.image_token_id  # settled from the tokenizer on load
            res["mlx"][layout] = mlx_stages(model, mx.array(ids), mx.array(pixels), TOKENS)
    return res


def check(report: dict, where: str) -> None:
    assert report["vision_features"]["max_abs"] < VISION_TOL, (where, report["vision_features"])
    assert report["image_features"]["max_abs"] < FEATURE_TOL, (where, report["image_features"])
    assert report["inputs_embeds"]["max_abs"] < FEATURE_TOL, (where, report["inputs_embeds"])
    assert report["logits"]["max_abs"] < LOGITS_TOL, (where, report["logits"])
    assert report["decode_logits"]["max_abs"] < LOGITS_TOL, (where, report["decode_logits"])
    tokens = report["greedy_tokens"]
    assert tokens["agree"] == tokens["n"], (where, tokens)
    # A continuation that repeats one token would make the agreement check nearly empty.
    assert len(np.unique(tokens["reference"])) >= 4, (where, tokens["reference"])


def rope_limit(case: Case) -> int:
    extra = case.extra_text
    if case.text == "phi3":
        return 64  # original_max_position_embeddings in builders.text_config
    return extra.get("max_position_embeddings", 512)


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_parity(build_case, checkpoint_root, branch):
    spec = BRANCHES[branch]
    res = run_spec(build_case, checkpoint_root, spec)
    ids = res["inputs"][0]
    assert ids.shape[0] == spec.batch
    if spec.regime:
        # The request must really sit where the branch says: prompt length L, L + generated tokens.
        limit, length = rope_limit(spec.case), ids.shape[1]
        where = {"below": length + TOKENS <= limit, "crossing": length <= limit < length + TOKENS,
                 "above": length > limit}[spec.regime]
        assert where, (spec.regime, length, limit)
    for ref_name, ref in res["refs"].items():
        for layout in spec.layouts:
            report = compare(ref, res["mlx"][layout])
            check(report, f"{branch}: MLX ({layout}) vs transformers ({ref_name})")
            assert report["greedy_tokens"]["n"] == spec.batch * TOKENS
    if "hf_loaded" in res["refs"]:
        # The -hf directory loads back into transformers (eager attention there, SDPA in the built model).
        again = compare(res["refs"]["built"], res["refs"]["hf_loaded"])
        check(again, f"{branch}: transformers built vs loaded")
    if spec.case.ps_version == "v1":
        # v1 really orders tokens differently from v2 (otherwise this branch would prove nothing).
        v1, v2 = res["refs"]["original"]["image_features"], res["v2_for_contrast"]["image_features"]
        assert np.abs(v1 - v2).max() > 1e-2


def test_merge_image_features_count_check():
    ids = mx.array([[1, 9, 9, 2], [9, 3, 4, 9]])
    embeds = mx.zeros((2, 4, 3))
    feats = mx.arange(12, dtype=mx.float32).reshape(4, 3) + 1
    merged = merge_image_features(ids, embeds, feats, 9)
    # Rows are taken in order over the whole batch: row 0 takes features 0-1, row 1 takes 2-3.
    expected = np.zeros((2, 4, 3), np.float32)
    expected[0, 1], expected[0, 2], expected[1, 0], expected[1, 3] = np.array(feats)
    np.testing.assert_array_equal(np.array(merged), expected)
    with pytest.raises(UserError, match=r"Image features and image tokens do not match: tokens: 4, features 3"):
        merge_image_features(ids, embeds, feats[:3], 9)
    with pytest.raises(UserError, match=r"tokens: 4, features 8"):
        merge_image_features(ids, embeds, mx.concatenate([feats, feats]).reshape(4, 2, 3), 9)


@pytest.mark.parametrize("size", [(84, 84), (56, 84), (28, 28)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_position_embedding_interpolation(build_case, size):
    """At a non-native input size both sides resize the 4x4 position grid with torch's bicubic."""
    import torch

    built = build_case(QWEN2)
    model, _ = load_model(built.hf_dir, dtype="float32")
    rng = np.random.default_rng(7)
    pixels = rng.standard_normal((2, size[0], size[1], 3)).astype(np.float32)
    ours = np.array(model.vision_features(mx.array(pixels)))
    with torch.no_grad():
        ref = built.model.model.vision_tower(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    ref = ref.last_hidden_state.numpy()
    assert ours.shape == ref.shape == (2, 1 + (size[0] // 14) * (size[1] // 14), 32)
    assert np.abs(ours - ref).max() < VISION_TOL
    if size[0] == size[1] and (size[0] // 14) % 2 == 0:
        # Square grids also go through transformers' projector path.
        with torch.no_grad():
            ref_feats = built.model.model.get_image_features(
                pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), vision_feature_layer=-1,
                vision_feature_select_strategy="default").pooler_output.numpy()
        ours_feats = np.array(model.extract_feature(mx.array(pixels)))
        assert np.abs(ours_feats - ref_feats).max() < FEATURE_TOL


@pytest.mark.parametrize("case,length", [
    (Case("m_internlm2_kv1", text="internlm2", kv_heads=1, template="internlm2-chat"), 40),
    (INTERNLM2, 40),
    (Case("m_internlm2_kv4", text="internlm2", kv_heads=4, template="internlm2-chat"), 40),
    (INTERNLM2_DYN, 90),
], ids=["kv1", "kv2", "kv4", "kv2-dynamic-above"])
def test_internlm2_wqkv_against_mlx_lm(build_case, case, length):
    """An oracle we did not write for the `wqkv` grouping: the original checkpoint's language-model tensors, fused
    `wqkv` as stored, loaded into mlx-lm's own InternLM2 model, give transformers' Llama logits (the Llama weights
    are the builder's, split the official converter's way)."""
    import torch
    from mlx_lm.models import internlm2

    built = build_case(case)
    raw = json.loads((built.original_dir / "config.json").read_text())
    llm = raw["llm_config"]
    assert llm["architectures"] == ["InternLM2ForCausalLM"]
    args = internlm2.ModelArgs.from_dict(dict(llm, model_type="internlm2"))
    lm = internlm2.Model(args)
    weights = mx.load(str(built.original_dir / "model.safetensors"))
    lm_weights = {k[len("language_model."):]: v for k, v in weights.items() if k.startswith("language_model.")}
    assert any(k.endswith("attention.wqkv.weight") for k in lm_weights)
    lm.load_weights(list(lm_weights.items()), strict=True)

    ids = np.random.default_rng(3).integers(0, 256, (1, length))
    ours = np.array(lm(mx.array(ids)))
    # transformers' dynamic NTK remembers the longest sequence this model saw (earlier tests ran it); start fresh.
    ReferenceModel(built.model).reset_rope_state()
    with torch.no_grad():
        ref = built.model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ours - ref).max() < LOGITS_TOL
