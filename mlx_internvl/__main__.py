"""`python -m mlx_internvl ...` is the `mlx-internvl` command (as `python -m mlx_lm ...` is mlx-lm's)."""

from mlx_internvl.cli.main import main

if __name__ == "__main__":
    main()
