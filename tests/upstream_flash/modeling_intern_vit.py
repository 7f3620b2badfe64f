"""Stand-in for upstream's InternViT: transformers' own `InternVLVisionModel` under the original checkpoint's
parameter names (`embeddings.class_embedding`, `encoder.layers.N.attn.qkv`, ...), so a checkpoint folder holding
these files loads with `AutoModel.from_pretrained(..., trust_remote_code=True)`. The parameters live under the
original names; each call maps them onto the transformers tower with the project's checkpoint mapping
(`mlx_internvl.reference.layout`) and runs that tower. The Flash tests that build the upstream model in memory pass
transformers' tower as `vision_model` and never build this one."""

import torch

from mlx_internvl.reference.layout import hf_state_to_original, original_config_to_hf, original_to_hf

has_flash_attn = False
_LLM = {"num_attention_heads": 1, "hidden_size": 1}  # what the mapping reads of the LLM; only vision keys pass here


class InternVisionModel(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers import InternVLVisionConfig, InternVLVisionModel

        vision = original_config_to_hf({"vision_config": config.to_dict(), "llm_config": {}})["vision_config"]
        tower = InternVLVisionModel(InternVLVisionConfig(**vision))
        self._tower = (tower,)  # a tuple: not a registered submodule, so its names stay out of the state dict
        hf = {f"vision_tower.{k}": v for k, v in tower.state_dict().items()}
        for key, t in hf_state_to_original(hf, _LLM).items():
            module, _, name = key[len("vision_model."):].rpartition(".")
            self._module(module).register_parameter(name, torch.nn.Parameter(torch.empty_like(t)))

    def _module(self, dotted: str) -> torch.nn.Module:
        m = self
        for part in dotted.split(".") if dotted else ():
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        return m

    def forward(self, pixel_values, output_hidden_states=False, return_dict=True):
        tower = self._tower[0]
        state = original_to_hf({f"vision_model.{k}": v for k, v in self.state_dict().items()}, _LLM)
        tower.load_state_dict({k[len("vision_tower."):]: v for k, v in state.items()}, strict=True, assign=True)
        return tower(pixel_values=pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
