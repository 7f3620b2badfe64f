"""Configuration: one dataclass per component, read from either Hugging Face layout.

Both checkpoint formats are normalised into `ModelConfig`:
- original OpenGVLab (`InternVLChatModel`): `vision_config` + `llm_config`, plus `ps_version`, `template`, ...
- transformers `-hf` (`InternVLForConditionalGeneration`): `vision_config` + `text_config`, with other key names.

The language-model part is rewritten into the argument names mlx-lm's model classes take (`rope_theta`,
`rope_scaling`, `model_type`), because the backbones are mlx-lm's own. InternLM2 is mapped onto mlx-lm's Llama
(the same move transformers' own converter makes), so its fused `wqkv` is split at conversion time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from . import validate
from .errors import UserError


@dataclass(frozen=True)
class LanguageModel:
    """One language-model family of the released checkpoints, as each layout names it."""

    original_type: str  # `llm_config.model_type` in an original OpenGVLab checkpoint
    hf_type: str  # `text_config.model_type` in a transformers (-hf) checkpoint
    mlx_type: str  # the mlx-lm model that runs it


# `llm_config.architectures[0]` -> its names. InternLM2 runs as mlx-lm's Llama (its fused `wqkv` is split on
# conversion), the move transformers' own converter makes, so its -hf form is a Llama.
LANGUAGE_MODELS = {
    "Qwen2ForCausalLM": LanguageModel("qwen2", "qwen2", "qwen2"),
    "Qwen3ForCausalLM": LanguageModel("qwen3", "qwen3", "qwen3"),
    "Qwen3MoeForCausalLM": LanguageModel("qwen3_moe", "qwen3_moe", "qwen3_moe"),
    "LlamaForCausalLM": LanguageModel("llama", "llama", "llama"),
    "InternLM2ForCausalLM": LanguageModel("internlm2", "llama", "llama"),
    "Phi3ForCausalLM": LanguageModel("phi3", "phi3", "phi3"),
    "GptOssForCausalLM": LanguageModel("gpt_oss", "gpt_oss", "gpt_oss"),
}
# transformers' text model type -> the architecture it is (only families transformers keeps under their own name).
HF_TEXT_ARCHITECTURES = {lm.hf_type: arch for arch, lm in LANGUAGE_MODELS.items() if lm.hf_type == lm.original_type}

ORIGINAL_ARCHITECTURE = "InternVLChatModel"
HF_ARCHITECTURE = "InternVLForConditionalGeneration"


class _FromDict:
    @classmethod
    def from_dict(cls, params: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _square(v, name: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise UserError(f"vision_config.{name} {list(v)} is not square; only square tiles are supported.")
        return int(v[0])
    return v


@dataclass
class VisionConfig(_FromDict):
    """InternViT hyper-parameters, named as in the original `configuration_intern_vit.py`."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    # The upstream config class defaults to RMSNorm; some 6B configs omit the key.
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_normalization: bool = False
    hidden_act: str = "gelu"

    def __post_init__(self):
        # Configs may give the tile and patch sizes as [height, width]; only square ones are supported.
        self.image_size = _square(self.image_size, "image_size")
        self.patch_size = _square(self.patch_size, "patch_size")
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise UserError(
                f"vision_config.norm_type is {self.norm_type!r}; expected 'layer_norm' or 'rms_norm'."
            )
        if self.hidden_act not in ("gelu", "gelu_pytorch_tanh"):
            raise UserError(f"vision_config.hidden_act {self.hidden_act!r} is not supported (expected 'gelu').")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"vision_config.hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}."
            )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class ModelConfig(_FromDict):
    """The whole InternVL model as the MLX code needs it (this is what `config.json` of a converted model holds)."""

    vision_config: VisionConfig
    llm_config: dict
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    template: Optional[str] = None
    system_message: Optional[str] = None
    force_image_size: int = 448
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    image_token_id: Optional[int] = None
    source_format: str = "original"
    # The language model's architecture before normalisation (e.g. InternLM2ForCausalLM), for export.
    source_llm_architecture: Optional[str] = None
    quantization: Optional[dict] = None
    eos_token_id: Any = None
    # InternVL3.5-Flash: None for other checkpoints; True/False whether the router runs by default.
    flash_mode: Optional[bool] = None
    flash_relative_threshold: Optional[float] = None
    flash_absolute_threshold: Optional[float] = None
    # The directory this model was loaded from (tokenizer files, remote code for export); set on load, not saved.
    source_path: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        if self.ps_version not in ("v1", "v2"):
            raise UserError(f"ps_version is {self.ps_version!r}; expected 'v1' or 'v2'.")
        if self.downsample_ratio <= 0 or (1 / self.downsample_ratio) % 1:
            raise UserError(f"downsample_ratio {self.downsample_ratio} must be 1/k for an integer k.")
        depth = self.vision_config.num_hidden_layers
        if not -depth - 1 <= self.select_layer < depth + 1:
            raise UserError(
                f"select_layer {self.select_layer} is outside the {depth}-layer vision encoder."
            )
        if self.flash_mode and None in (self.flash_relative_threshold, self.flash_absolute_threshold):
            raise UserError("config.json sets flash_mode but lacks flash_relative_threshold and/or "
                            "flash_absolute_threshold; a Flash checkpoint's config has both")
        if self.image_size_mismatch:
            raise UserError(
                f"force_image_size {self.force_image_size} differs from vision_config.image_size "
                f"{self.vision_config.image_size}; such checkpoints are not supported."
            )

    @property
    def image_size_mismatch(self) -> bool:
        return self.force_image_size != self.vision_config.image_size

    @property
    def is_flash(self) -> bool:
        """An InternVL3.5-Flash checkpoint (router, gating and mlp2 weights), whether or not its router is on."""
        return self.flash_mode is not None

    @property
    def model_type(self) -> str:
        return self.llm_config["model_type"]

    @property
    def num_image_token(self) -> int:
        """Visual tokens per tile: (S/patch)^2 * r^2, 256 for the standard 448/14/0.5 setting."""
        grid = self.vision_config.grid_size
        return int(grid * grid * self.downsample_ratio**2)

    @property
    def flash_image_token(self) -> int:
        """Visual tokens of a tile the Flash router compresses (mlp2 after a pixel shuffle at r^2): 64 for 256."""
        return int(round(self.num_image_token * self.downsample_ratio**2))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["vision_config"] = self.vision_config.to_dict()
        if not self.is_flash:  # other checkpoints' config.json stays as it was, without the Flash keys
            for key in ("flash_mode", "flash_relative_threshold", "flash_absolute_threshold"):
                del out[key]
        return out


def _rope_fields(cfg: dict) -> dict:
    """Return `rope_theta` and `rope_scaling` in mlx-lm's spelling.

    transformers >= 5 nests both under `rope_parameters`; older configs have them at top level. A rope type of
    'default' means no scaling. mlx-lm's InternLM2 insists on the key `type`, its Llama accepts `rope_type`, so both
    are written.
    """
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or None
    theta = cfg.get("rope_theta", params.get("rope_theta"))
    if scaling is None and params:
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        if kind == "su":
            kind = "longrope"
        if kind == "default":
            scaling = None
        else:
            scaling["type"] = kind
            scaling["rope_type"] = kind
        if kind == "longrope" and "original_max_position_embeddings" in cfg:  # Phi-3 keeps it at top level
            scaling.setdefault("original_max_position_embeddings", cfg["original_max_position_embeddings"])
    out = {"rope_scaling": scaling}
    if theta is not None:
        out["rope_theta"] = float(theta)
    if "partial_rotary_factor" in params and "partial_rotary_factor" not in cfg:
        out["partial_rotary_factor"] = params["partial_rotary_factor"]
    return out


_DROP_KEYS = {
    "auto_map", "_name_or_path", "architectures", "rope_parameters", "id2label", "label2id", "transformers_version",
    "torch_dtype", "dtype", "attn_implementation", "_attn_implementation", "use_flash_attn",
}


def _fill_nulls(llm: dict) -> None:
    """Keys a config may give as null that mlx-lm needs as numbers: no KV-head count means one per attention head."""
    if llm.get("num_key_value_heads") is None:
        llm["num_key_value_heads"] = llm.get("num_attention_heads")


def normalize_llm_config(llm: dict, *, source: str) -> tuple[dict, str]:
    """Translate an HF causal-LM config into the dict an mlx-lm `ModelArgs.from_dict` accepts.

    Returns the new dict and the source architecture name.
    """
    if source == "original":
        archs = llm.get("architectures") or []
        name, field_name, known = (archs[0] if archs else None), "llm_config.architectures[0]", LANGUAGE_MODELS
    else:
        name, field_name, known = llm.get("model_type"), "text_config.model_type", HF_TEXT_ARCHITECTURES
    if name not in known:
        raise UserError(f"{field_name} is {name!r}, which mlx-internvl does not support. "
                        f"Supported: {', '.join(sorted(known))}.")
    arch = name if source == "original" else HF_TEXT_ARCHITECTURES[name]
    model_type = LANGUAGE_MODELS[arch].mlx_type

    out = {k: v for k, v in llm.items() if k not in _DROP_KEYS and not k.startswith("rope_")}
    out.update(_rope_fields(llm))
    out["model_type"] = model_type
    _fill_nulls(out)
    if arch == "InternLM2ForCausalLM":
        # InternLM2's `bias` covers wqkv and wo only; after the split that is Llama's attention_bias.
        out["attention_bias"] = bool(llm.get("bias", False))
        out["mlp_bias"] = False
        out.pop("bias", None)
    if model_type == "qwen3" or model_type == "qwen3_moe":
        out.setdefault("head_dim", 128)  # transformers' Qwen3 default when the key is absent
        out.setdefault("max_position_embeddings", 40960)
    if model_type in ("qwen2", "qwen3", "qwen3_moe", "llama") and out.get("rope_theta") is None:
        out["rope_theta"] = 1000000.0 if model_type.startswith("qwen") else 10000.0
    if model_type == "phi3":
        rs = out.get("rope_scaling")
        if rs and "original_max_position_embeddings" in rs and "original_max_position_embeddings" not in llm:
            out["original_max_position_embeddings"] = rs["original_max_position_embeddings"]
    if model_type == "gpt_oss":
        for key, fixed in (("swiglu_alpha", 1.702), ("swiglu_limit", 7.0)):  # mlx-lm's SwigluOAI has them built in
            if float(out.get(key, fixed)) != fixed:
                raise UserError(f"{field_name} {name!r}: {key} is {out[key]}; mlx-lm's GPT-OSS experts use {fixed}")
    if model_type == "qwen3_moe":
        # transformers 5 renames num_experts -> num_local_experts; mlx-lm reads num_experts.
        if "num_experts" not in out and "num_local_experts" in out:
            out["num_experts"] = out["num_local_experts"]
        out.setdefault("decoder_sparse_step", 1)
        out.setdefault("mlp_only_layers", [])
        out.setdefault("norm_topk_prob", False)
    validate.rope_scaling(out)
    return out, arch


def _vision_from_hf(vc: dict) -> VisionConfig:
    return VisionConfig(
        hidden_size=vc.get("hidden_size", 1024),
        num_hidden_layers=vc.get("num_hidden_layers", 24),
        num_attention_heads=vc.get("num_attention_heads", 16),
        intermediate_size=vc.get("intermediate_size", 4096),
        image_size=vc.get("image_size", 448),
        patch_size=vc.get("patch_size", 14),
        num_channels=vc.get("num_channels", 3),
        norm_type=vc.get("norm_type", "layer_norm"),
        layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
        qkv_bias=bool(vc.get("attention_bias", False)),
        qk_normalization=bool(vc.get("use_qk_norm", False)),
        hidden_act=vc.get("hidden_act", "gelu"),
    )


def detect_format(config: dict, path: str = "config.json") -> str:
    """'original', 'hf' or 'mlx' from `architectures[0]`, with a clear error otherwise."""
    if config.get("mlx_internvl_format"):
        return "mlx"
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch == ORIGINAL_ARCHITECTURE or config.get("model_type") == "internvl_chat":
        return "original"
    if arch == HF_ARCHITECTURE or config.get("model_type") == "internvl":
        return "hf"
    raise UserError(
        f"{path}: architectures[0] is {arch!r} and model_type is {config.get('model_type')!r}; expected an InternVL "
        f"checkpoint ({ORIGINAL_ARCHITECTURE!r} or {HF_ARCHITECTURE!r}) or a model converted by mlx-internvl."
    )


def _normalize_at(llm: dict, source: str, path: str) -> tuple:
    try:
        return normalize_llm_config(llm, source=source)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def config_from_hf(config: dict, path: str = "config.json") -> ModelConfig:
    """Build a `ModelConfig` from an original or `-hf` config.json dict."""
    fmt = detect_format(config, path)
    if fmt == "mlx":
        return config_from_mlx(config, path)
    for key in ("vision_config", "llm_config" if fmt == "original" else "text_config"):
        if not isinstance(config.get(key), dict):
            raise UserError(f"{path}: missing the {key!r} section that a {fmt} InternVL config must have.")
    if fmt == "original":
        vc = dict(config["vision_config"])
        vision = VisionConfig.from_dict(vc)
        image_size = config.get("force_image_size") or vision.image_size
        llm, arch = _normalize_at(config["llm_config"], "original", path)
        return ModelConfig(
            vision_config=vision,
            llm_config=llm,
            downsample_ratio=config.get("downsample_ratio", 0.5),
            ps_version=config.get("ps_version", "v1"),
            select_layer=config.get("select_layer", -1),
            template=config.get("template"),
            system_message=config.get("system_message"),
            force_image_size=image_size,
            min_dynamic_patch=config.get("min_dynamic_patch", 1),
            max_dynamic_patch=config.get("max_dynamic_patch", 12),
            use_thumbnail=config.get("use_thumbnail", True),
            dynamic_image_size=config.get("dynamic_image_size", True),
            source_format="original",
            source_llm_architecture=arch,
            eos_token_id=config.get("eos_token_id"),
            flash_mode=config.get("flash_mode"),
            flash_relative_threshold=config.get("flash_relative_threshold"),
            flash_absolute_threshold=config.get("flash_absolute_threshold"),
        )
    vision = _vision_from_hf(config["vision_config"])
    layer = config.get("vision_feature_layer", -1)
    if isinstance(layer, (list, tuple)):
        raise UserError(f"{path}: vision_feature_layer {layer} (several layers) is not supported.")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise UserError(f"{path}: vision_feature_select_strategy {strategy!r} is not supported (expected 'default').")
    llm, arch = _normalize_at(config["text_config"], "hf", path)
    return ModelConfig(
        vision_config=vision,
        llm_config=llm,
        downsample_ratio=config.get("downsample_ratio", 0.5),
        ps_version="v2",  # transformers' pixel_shuffle only implements v2
        select_layer=layer,
        template=config.get("template", "internvl2_5"),
        system_message=config.get("system_message"),
        force_image_size=vision.image_size,
        image_token_id=config.get("image_token_id", config.get("image_token_index")),
        source_format="hf",
        source_llm_architecture=arch,
        eos_token_id=config.get("eos_token_id"),
    )


def config_from_mlx(config: dict, path: str = "config.json") -> ModelConfig:
    llm = dict(config.get("llm_config") or {})
    types = sorted({lm.mlx_type for lm in LANGUAGE_MODELS.values()})
    if llm.get("model_type") not in types:
        raise UserError(f"{path}: llm_config.model_type is {llm.get('model_type')!r}, which mlx-internvl does not "
                        f"run; a converted model names one of: {', '.join(types)} (convert the model again).")
    validate.rope_scaling(llm)
    _fill_nulls(llm)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in config.items() if k in names} | {"llm_config": llm})

