"""Stand-in for upstream's config class: the attributes its modeling file reads. `vision_config` becomes a plain
`PretrainedConfig`, `llm_config` (a dict when read from a checkpoint's config.json) transformers' config of its
`model_type`, so the config also loads with `AutoConfig.from_pretrained(..., trust_remote_code=True)`."""

from transformers import AutoConfig, PretrainedConfig


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"

    def __init__(self, vision_config=None, llm_config=None, **kwargs):
        super().__init__(**{k: v for k, v in kwargs.items() if not k.startswith("flash_")})
        if not isinstance(vision_config, PretrainedConfig):
            vision_config = PretrainedConfig(**(vision_config or {}))
        if isinstance(llm_config, dict):
            llm_config = AutoConfig.for_model(**llm_config)
        self.vision_config = vision_config
        self.llm_config = llm_config
        for k, v in kwargs.items():
            if k.startswith("flash_"):
                setattr(self, k, v)
