"""The `mlx-internvl` command line (installed as `mlx_internvl.cli`)."""
