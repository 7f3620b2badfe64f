"""mlx-internvl: InternVL vision-language models in MLX."""

from . import _blas  # noqa: F401  (must run before mlx is imported; opt-in, see _blas.py)
from .chat import ChatSession
from .config import ModelConfig, VisionConfig
from .generate import batch_generate, generate, stream_generate
from .loading import load, load_model
from .model import InternVLChatModel, merge_image_features
from .processing import Processor, dynamic_preprocess
from .projector import pixel_shuffle
from .sampling import KVOptions, SamplingOptions

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
    "generate",
    "stream_generate",
    "batch_generate",
    "ChatSession",
    "SamplingOptions",
    "KVOptions",
]
