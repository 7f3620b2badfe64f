"""Stub of upstream's config class: attributes only."""

from types import SimpleNamespace

from transformers import PretrainedConfig


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"

    def __init__(self, vision_config=None, llm_config=None, **kwargs):
        super().__init__(**{k: v for k, v in kwargs.items() if not k.startswith("flash_")})
        self.vision_config = SimpleNamespace(**(vision_config or {}))
        self.llm_config = llm_config
        for k, v in kwargs.items():
            if k.startswith("flash_"):
                setattr(self, k, v)
