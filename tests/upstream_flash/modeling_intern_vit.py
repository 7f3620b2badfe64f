"""Stub: the tests hand the upstream model transformers' InternViT as `vision_model`."""

has_flash_attn = False


class InternVisionModel:  # never built: vision_model is always passed in
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("pass vision_model=")
