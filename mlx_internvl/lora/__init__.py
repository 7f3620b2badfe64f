"""LoRA / QLoRA fine-tuning of InternVL in MLX."""
