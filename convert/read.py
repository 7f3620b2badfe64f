"""Any supported Hugging Face checkpoint -> `ModelConfig` + lazy MLX weights, in memory (no file is written).

This is the one conversion path: `mlx-internvl convert` writes its result, `mlx_internvl.load` runs it directly.
Everything a model needs is settled here, in its config: `image_token_id` (the `-hf` config's, or the tokenizer's
`<IMG_CONTEXT>`), whether the head is tied (an `lm_head` tensor means untied, whatever the config says), and the
source directory. Nothing from the checkpoint's remote code (`*.py`) is imported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx

from mlx_internvl.config import ModelConfig, config_from_hf
from mlx_internvl.tokenizer import IMG_CONTEXT, token_id
from mlx_internvl.validate import naming
from mlx_internvl.weights import DTYPES

from . import mlx_vlm
from .checkpoint import Checkpoint
from .keymap import build_plan

logger = logging.getLogger("mlx_internvl")
SOURCE_LAYOUTS = {"original": "OpenGVLab's original InternVLChatModel layout",
                  "hf": "transformers' -hf InternVLForConditionalGeneration layout"}


def read_hf(path: Path, raw: dict, dtype: Optional[mx.Dtype] = None
            ) -> Tuple[ModelConfig, Dict[str, mx.array], Callable[[str], Optional[str]]]:
    """`(config, lazy weights under our names, source(key) -> 'file:key' it came from)` for the checkpoint at
    `path` whose config.json is `raw`. `dtype` (default: the checkpoint's own) applies to float tensors.
    A checkpoint written by mlx-vlm (same config, MLX tensors) is read too; if it is quantized, `config.quantization`
    says so and the model must be quantized (`weights.apply_quantization`) before the weights are loaded."""
    with naming(path / "config.json"):
        config = config_from_hf(raw, str(path / "config.json"))
    config.source_path = str(path)
    if config.image_token_id is None:
        config.image_token_id = token_id(path, IMG_CONTEXT)
    ckpt = Checkpoint(path)
    plan = build_plan(ckpt.keys(), config.source_format, config.llm_config, config.source_llm_architecture)
    # InternVL stores an lm_head tensor even for tied bases, so the tensor decides.
    config.llm_config["tie_word_embeddings"] = "language_model.lm_head.weight" not in plan
    layout = mlx_vlm.detect(ckpt, raw, config.source_format, str(path / "config.json"),
                            config.source_llm_architecture)
    if layout is not None:
        # Already MLX tensors (perhaps quantized: the model needs `apply_quantization` before loading them),
        # stored in the dtype mlx-vlm chose, whatever the copied config says.
        plan = mlx_vlm.adapt_plan(plan)
        config.quantization = layout.quantization
        logger.info("%s: read as %s", path, layout.describe())
    else:
        logger.info("%s: read as %s, converted in memory", path, SOURCE_LAYOUTS[config.source_format])
        if dtype is None:
            dtype = _checkpoint_dtype(raw)
    weights = {}
    for key, entry in plan.items():
        arr = entry.fn(*[ckpt.get(s) for s in entry.sources])
        if dtype is not None and mx.issubdtype(arr.dtype, mx.floating):
            arr = arr.astype(dtype)
        weights[key] = arr
    ckpt.release()

    def source(key):
        entry = plan.get(key)
        if entry is None:
            return None
        return ", ".join(f"{ckpt.file_of(s).name}:{s}" for s in entry.sources)

    return config, weights, source


def _checkpoint_dtype(raw: dict) -> Optional[mx.Dtype]:
    text = raw.get("llm_config") or raw.get("text_config") or {}
    name = raw.get("torch_dtype") or raw.get("dtype") or text.get("torch_dtype")
    return DTYPES.get(name) if isinstance(name, str) else None
