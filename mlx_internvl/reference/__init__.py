"""The torch reference path (needs the `[torch]` extra): transformers' InternVL classes, stage by stage."""

from .model import ReferenceModel, pixel_shuffle_v1

__all__ = ["ReferenceModel", "pixel_shuffle_v1"]
