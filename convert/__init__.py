"""Checkpoint conversion between the Hugging Face layouts and MLX (installed as `mlx_internvl.convert`)."""

from .convert import convert

__all__ = ["convert"]
