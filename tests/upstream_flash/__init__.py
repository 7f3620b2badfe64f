"""The InternVL3.5-Flash repos' own `modeling_internvl_chat.py` (OpenGVLab, MIT licence: LICENSE), trimmed to the
inference path, as the test oracle for the Flash router. Its sibling imports are stubbed: `modeling_intern_vit`
(the tests pass transformers' InternViT as `vision_model`), `configuration_internvl_chat` (a plain config) and
`conversation` (the one template the tests use, `internvl2_5`, from the upstream template table)."""
