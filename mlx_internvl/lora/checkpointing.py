"""Gradient checkpointing for LoRA training: a layer class's forward pass is recomputed in the backward pass."""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx

from ..adapters import LoraConfig


@contextmanager
def grad_checkpointing(layer_types):
    """Recompute these layer classes' forward passes in the backward pass (class-wide, restored on exit)."""
    saved = {cls: cls.__call__ for cls in layer_types}

    def wrap(fn):
        def call(self, *args, **kwargs):
            def inner(params, *a, **k):
                self.update(params)
                return fn(self, *a, **k)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        return call

    for cls, fn in saved.items():
        cls.__call__ = wrap(fn)
    try:
        yield
    finally:
        for cls, fn in saved.items():
            cls.__call__ = fn


def layer_types(model, lora: LoraConfig) -> set:
    """The layer classes gradient checkpointing wraps: the decoder layer, and the ViT layer when it is trained."""
    types = {type(model.language_model.layers[0])}
    if lora.train_vision:
        types.add(type(model.vision_model.encoder.layers[0]))
    return types
