"""Checkpoints written by mlx-vlm's converter (the mlx-community InternVL repos), read as they are.

mlx-vlm keeps the source's `config.json` (same `model_type`, `internvl_chat` or `internvl`, same key names) and
writes MLX tensors, so such a directory looks like a Hugging Face checkpoint by its config alone. What tells them
apart is the safetensors metadata: mlx-vlm marks every file `format: mlx` (transformers writes `pt`). Read from
mlx-vlm 0.7.10's converter and checked on its own output (tests/fixtures/mlx_vlm):

- `internvl_chat` (from an original OpenGVLab checkpoint): original key names, `mlp1.0/1/3` numbering kept, the
  patch-embedding conv already in MLX's OHWI order (it must not be transposed again), the language model's keys as
  mlx-lm names them (mlx-vlm runs only Qwen2/Qwen3-style language models there).
- `internvl` (from a transformers `-hf` checkpoint): transformers' legacy prefixes (`vision_tower.`,
  `multi_modal_projector.`, `language_model.model.`), separate vision q/k/v, conv in OHWI.
- Quantized (`-q`): a top-level `quantization` block (`group_size`, `bits`, `mode`; also copied to
  `quantization_config`), and `.scales`/`.biases` beside each quantized `.weight`. mlx-vlm quantizes every linear
  and embedding layer whose input width is a multiple of the group size outside the modules it treats as
  multimodal (`vision_model`, `vision_tower`, `multi_modal_projector`, ...), so in `internvl_chat` the `mlp1`
  projector is quantized too; which layers are quantized is read from the `.scales` tensors, never guessed.

Everything else goes through the same key plan as a Hugging Face checkpoint (`keymap.build_plan`); this module only
says which layout a directory is and what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from mlx_internvl.errors import CheckpointError
from mlx_internvl.weights import read_config

from .checkpoint import Checkpoint
from .keymap import Entry, _identity, our_name

PATCH_CONV = "vision_model.embeddings.patch_embedding.weight"
QUANT_KEYS = ("group_size", "bits", "mode")
MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")
LAYOUT_NAMES = {"original": "internvl_chat", "hf": "internvl"}


@dataclass
class MlxVlmLayout:
    """What `detect` found: which of mlx-vlm's two InternVL layouts, and its quantization (our module paths)."""

    fmt: str  # 'original' (mlx-vlm internvl_chat) or 'hf' (mlx-vlm internvl)
    quantization: Optional[dict]

    @property
    def name(self) -> str:
        return f"mlx-vlm {LAYOUT_NAMES[self.fmt]}"

    def describe(self) -> str:
        q = self.quantization
        kind = (f"{q['bits']}-bit {q.get('mode', 'affine')}, group size {q['group_size']}" if q else "float")
        return f"{self.name} layout (MLX tensors written by mlx-vlm's converter; {kind})"


def is_mlx_marked(ckpt) -> bool:
    """True when every weight file of `ckpt` carries mlx-vlm's `format: mlx` marker, False when none does."""
    marked = {f: (ckpt.metadata.get(f) or {}).get("format") == "mlx" for f in ckpt.files}
    if len(set(marked.values())) > 1:
        mlx = next(f for f, m in marked.items() if m)
        other = next(f for f, m in marked.items() if not m)
        raise CheckpointError(
            f"{other}: its safetensors metadata has no 'format: mlx' marker, but {mlx.name} in the same directory "
            "has one: MLX and PyTorch weight files are mixed. Download or convert the checkpoint again.")
    return bool(marked) and all(marked.values())


def is_mlx_vlm_dir(path) -> bool:
    """True for a directory of mlx-vlm's making (an InternVL config without our marker, MLX-marked weights)."""
    _, fmt = read_config(path)
    return fmt != "mlx" and is_mlx_marked(Checkpoint(path))


def read_quantization(raw: dict, config_path: str, fmt: str, source_arch: Optional[str]) -> Optional[dict]:
    """The `quantization` block of an mlx-vlm config, checked, with per-layer entries renamed to our paths."""
    block = raw.get("quantization") or raw.get("quantization_config")
    if block is None:
        return None
    if not isinstance(block, dict) or not all(k in block for k in ("group_size", "bits")):
        raise CheckpointError(
            f"{config_path}: 'quantization' is {block!r}; an MLX quantization block has 'group_size' and 'bits' "
            "(and 'mode'). This is not a layout mlx-internvl reads; convert the original checkpoint instead.")
    mode = block.get("mode", "affine")
    if mode not in MODES:
        raise CheckpointError(f"{config_path}: quantization mode {mode!r} is not one MLX loads ({', '.join(MODES)})")
    out = {"group_size": int(block["group_size"]), "bits": int(block["bits"]), "mode": mode}
    for path, value in block.items():
        if path in QUANT_KEYS:
            continue
        if not isinstance(value, (bool, dict)):
            raise CheckpointError(f"{config_path}: quantization entry {path!r} is {value!r}; expected true/false "
                                  "or a {group_size, bits} object")
        out[our_name(path + ".weight", fmt, source_arch)[: -len(".weight")]] = value
    return out


def detect(ckpt, raw: dict, fmt: str, config_path: str, source_arch: Optional[str]) -> Optional[MlxVlmLayout]:
    """The mlx-vlm layout of a checkpoint whose config says original/`-hf` InternVL, or None for a PyTorch one.

    Decided by the safetensors metadata (`format: mlx` in every file), not by tensor shapes."""
    if not is_mlx_marked(ckpt):
        if raw.get("quantization") is not None:
            raise CheckpointError(
                f"{config_path}: the config has an MLX 'quantization' block but the weight files carry no "
                "'format: mlx' marker, so they were not written by an MLX converter. Use the original checkpoint.")
        return None
    if fmt == "hf":
        for key in ckpt.keys():
            if key.startswith(("vision_tower.", "model.vision_tower.")) and key.endswith(
                    (".q_proj.scales", ".k_proj.scales", ".v_proj.scales")):
                raise CheckpointError(
                    f"{ckpt.file_of(key)}: {key} is quantized. mlx-internvl runs the ViT with one fused qkv "
                    "projection and cannot fuse quantized q/k/v; convert the -hf checkpoint without quantizing the "
                    "vision tower (mlx-vlm's default), or convert the original checkpoint with mlx-internvl.")
    return MlxVlmLayout(fmt, read_quantization(raw, config_path, fmt, source_arch))


def adapt_plan(plan: Dict[str, Entry]) -> Dict[str, Entry]:
    """The key plan of a Hugging Face checkpoint, for tensors that mlx-vlm already wrote in MLX order."""
    if PATCH_CONV in plan:
        plan[PATCH_CONV] = Entry(plan[PATCH_CONV].sources, _identity)
    return plan
