"""Stand-ins for the sibling modules that the Flash repos' `modeling_internvl_chat.py` imports (it is loaded from
`$MLX_INTERNVL_UPSTREAM_FLASH`, see tests/flash_oracle.py): `modeling_intern_vit` (the tests pass transformers'
InternViT as `vision_model`), `configuration_internvl_chat` (a plain config) and `conversation` (the one template the
tests use, `internvl2_5`)."""
