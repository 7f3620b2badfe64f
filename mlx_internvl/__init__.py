"""mlx-internvl: InternVL vision-language models in MLX."""

from .config import ModelConfig, VisionConfig
from .loading import load, load_model
from .model import InternVLChatModel, merge_image_features
from .processing import Processor, dynamic_preprocess
from .projector import pixel_shuffle

__version__ = "0.1.0"

__all__ = [
    "load",
    "load_model",
    "InternVLChatModel",
    "ModelConfig",
    "VisionConfig",
    "Processor",
    "dynamic_preprocess",
    "merge_image_features",
    "pixel_shuffle",
]
