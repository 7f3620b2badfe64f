"""Benchmarks: full-size architecture presets with random weights, MLX vs the torch reference."""
