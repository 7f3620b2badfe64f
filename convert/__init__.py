"""Checkpoint conversion between the Hugging Face layouts and MLX (installed as `mlx_internvl.convert`)."""

from .convert import convert
from .export import export_hf
from .read import read_hf

__all__ = ["convert", "export_hf", "read_hf"]
