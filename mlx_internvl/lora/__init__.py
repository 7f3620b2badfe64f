"""LoRA / QLoRA / DoRA fine-tuning of InternVL in MLX: data, rendering with loss masks, training, fusing, export."""

from ..adapters import LoraConfig, apply_lora, load_adapters, save_adapters
from .data import Sample, load_dataset
from .fuse import fuse, fuse_adapters
from .peft import export_peft
from .preference import PreferenceConfig
from .render import encode_sample
from .trainer import TrainingArgs, TrainResult, train
from .tune import finetune

__all__ = [
    "LoraConfig",
    "PreferenceConfig",
    "TrainingArgs",
    "TrainResult",
    "Sample",
    "apply_lora",
    "encode_sample",
    "export_peft",
    "finetune",
    "fuse",
    "fuse_adapters",
    "load_adapters",
    "load_dataset",
    "save_adapters",
    "train",
]
