"""The option spellings mlx-lm and mlx-vlm users type, next to the old ones: each alias parses to the same value,
and the ones that change what runs (`--image A B`, `-c config.yaml`, `--data DIR`, `--report-to`) are run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from builders import Case
from mlx_internvl.cli.main import cli
from mlx_internvl.cli.main import main as cli_main

ROOT = Path(__file__).parent.parent


def params(command: str, *args) -> dict:
    """What click makes of `mlx-internvl COMMAND ARGS` (without running it)."""
    cmd = cli.get_command(None, command)
    with cmd.make_context(command, [str(a) for a in args]) as ctx:
        return dict(ctx.params)


def same(command: str, old: list, new: list, keys: list) -> None:
    a, b = params(command, *old), params(command, *new)
    for k in keys:
        assert a[k] == b[k], (command, k, a[k], b[k])


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_generate_and_chat_aliases(command):
    same(command, ["--adapter", "ad"], ["--adapter-path", "ad"], ["adapter_path"])
    assert params(command, "--adapter-path", "ad")["adapter_path"] == "ad"
    same(command, ["--max-tokens", 12], ["-m", 12], ["max_tokens"])
    assert params(command, "-m", 12)["max_tokens"] == 12
    same(command, ["--temperature", 0.5], ["--temp", 0.5], ["temperature"])
    same(command, ["--system", "Be brief."], ["--system-prompt", "Be brief."], ["system_message"])
    # several images after one flag, as argparse's nargs="+" in mlx-lm / mlx-vlm, and the repeated form
    repeated = params(command, "--image", "a.jpg", "--image", "b.jpg", "-i", "c.jpg")["images"]
    assert repeated == ("a.jpg", "b.jpg", "c.jpg")
    assert params(command, "--image", "a.jpg", "b.jpg", "c.jpg")["images"] == repeated
    assert params(command, "-i", "a.jpg", "b.jpg", "--image=c.jpg", "--temp", "0.1")["images"] == repeated
    mixed = params(command, "--image", "a.jpg", "b.jpg", "--max-tokens", 3, "--image", "c.jpg")
    assert mixed["images"] == repeated and mixed["max_tokens"] == 3


def test_dash_m_is_max_tokens_as_in_mlx_lm():
    """mlx_lm.generate/chat take `-m` as --max-tokens; the old `-m MODEL` is refused with the way out."""
    result = CliRunner().invoke(cli, ["generate", "-m", "./InternVL3-1B-mlx", "--prompt", "hi"])
    assert result.exit_code == 2
    assert "-m is --max-tokens, as in mlx-lm; give the model with --model" in result.output
    for command in ("generate", "chat", "serve"):
        assert params(command, "--model", "some/repo")["model_path"] == "some/repo"
        opts = {o for p in cli.get_command(None, command).params for o in p.opts}
        assert "-m" not in opts or command in ("generate", "chat")  # mlx_lm.server has no -m either


def test_sampling_flags_reach_the_generation_call():
    from mlx_internvl.cli.generate_cmd import option_values

    p = params("generate", "--presence-penalty", 0.5, "--frequency-penalty", 0.25, "--logit-bias", '{"7": -100}',
               "--xtc-probability", 0.5, "--xtc-threshold", 0.2, "--top-k", 4, "--temp", 0.7)
    sampling, _ = option_values({k: v for k, v in p.items()})
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.logit_bias) == (0.5, 0.25, {7: -100.0})
    assert (sampling.xtc_probability, sampling.xtc_threshold, sampling.top_k, sampling.temperature) == (
        0.5, 0.2, 4, 0.7)
    assert params("generate", "--logit-bias", "7:-100,9:2.5")["logit_bias"] == {7: -100.0, 9: 2.5}
    result = CliRunner().invoke(cli, ["generate", "--logit-bias", "seven", "--prompt", "x"])
    assert result.exit_code == 2 and "give token ids and additive biases" in result.output


def cli_fails(capsys, *args) -> str:
    """Run `mlx-internvl ARGS`, expect the one-line error and exit status 1; return the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main([str(a) for a in args])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), err
    return err[0]


def test_convert_takes_hf_path_and_mlx_path(build_case, tmp_path, monkeypatch, capsys):
    assert params("convert", "src", "out")["hf_path_arg"] == "src"
    p = params("convert", "--hf-path", "src", "--mlx-path", "out", "--upload-repo", "me/x")
    assert (p["hf_path"], p["mlx_path"], p["upload_repo"]) == ("src", "out", "me/x")
    assert params("convert", "--model", "src")["hf_path"] == "src"  # mlx_vlm.convert's alias
    built = build_case(Case("alias_tiny"))
    cli_run("convert", "--hf-path", built.original_dir, "--mlx-path", tmp_path / "a")
    cli_run("convert", built.original_dir, tmp_path / "b")
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()
    monkeypatch.chdir(tmp_path)  # mlx-lm's default output directory
    cli_run("convert", "--hf-path", built.original_dir)
    assert (tmp_path / "mlx_model" / "config.json").exists()
    assert "HF_PATH given twice" in cli_fails(capsys, "convert", built.original_dir, tmp_path / "c", "--hf-path", "x")
    assert not (tmp_path / "c").exists()


def test_fuse_export_aliases():
    same("fuse", ["--model", "m", "--adapter", "ad", "--out", "o"],
         ["--model", "m", "--adapter-path", "ad", "--save-path", "o"], ["adapter_path", "out"])
    assert params("fuse", "--model", "m", "--adapter-path", "ad", "--upload-repo", "me/x")["upload_repo"] == "me/x"
    assert params("export", "a", "b", "--upload-repo", "me/x")["upload_repo"] == "me/x"


LORA_BASE = ["--model", "m", "--data", "d.jsonl", "--adapter-path", "ad"]


def test_lora_aliases():
    pairs = [("--lr", "--learning-rate", 3e-4, "lr"), ("--max-length", "--max-seq-length", 512, "max_length"),
             ("--report-every", "--steps-per-report", 5, "report_every"),
             ("--val-every", "--steps-per-eval", 7, "val_every"),
             ("--grad-accum", "--grad-accumulation-steps", 3, "grad_accum")]
    for old, new, value, key in pairs:
        a = params("lora", *LORA_BASE, old, value)
        b = params("lora", *LORA_BASE, new, value)
        assert a[key] == b[key] == value, key
    same("lora", ["--model", "m", "--data", "d", "--adapter", "ad"], LORA_BASE[:4] + ["--adapter-path", "ad"],
         ["adapter_path"])
    assert params("lora", *LORA_BASE, "--train", "--fine-tune-type", "dora")["fine_tune_type"] == "dora"


def captured_finetune(monkeypatch, *args):
    """Run `mlx-internvl lora ARGS` in this process with `finetune` replaced by a recorder."""
    import mlx_internvl.cli.lora_cmd as lora_cmd

    calls = []
    monkeypatch.setattr(lora_cmd, "finetune", lambda *a, **k: calls.append((a, k)))
    result = CliRunner().invoke(cli, ["lora", *[str(a) for a in args]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (a, k), = calls
    return a, k, result.output


def test_lora_config_yaml_with_mlx_lm_keys(monkeypatch, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    for name in ("train.jsonl", "valid.jsonl"):
        (tmp_path / "data" / name).write_text("{}\n")
    cfg = tmp_path / "lora.yaml"
    cfg.write_text("\n".join([
        "model: some/base", f"data: {tmp_path / 'data'}", f"adapter_path: {tmp_path / 'ad'}", "train: true",
        "fine_tune_type: dora", "batch_size: 2", "iters: 30", "learning_rate: 2e-5", "steps_per_report: 5",
        "steps_per_eval: 10", "grad_accumulation_steps: 4", "max_seq_length: 1024", "num_layers: 2",
        "optimizer: adamw", "mask_prompt: true", "lr_schedule:", "  name: cosine_decay", "  warmup: 3",
        "lora_parameters:", "  rank: 4", "  dropout: 0.1", "  scale: 8.0",
        "  keys: [self_attn.q_proj, self_attn.v_proj]", ""]))
    (model, data, adapter_path), k, out = captured_finetune(monkeypatch, "-c", cfg, "--iters", 40)
    lora, args = k["lora"], k["args"]
    assert model == "some/base" and data == [str(tmp_path / "data" / "train.jsonl")]
    assert k["val"] == [str(tmp_path / "data" / "valid.jsonl")] and adapter_path == str(tmp_path / "ad")
    assert args.iters == 40  # the command line wins over the file, as in mlx-lm
    assert (args.batch_size, args.lr, args.report_every, args.val_every, args.grad_accum, args.max_length,
            args.warmup) == (2, 2e-5, 5, 10, 4, 1024, 3)
    assert (lora.rank, lora.dropout, lora.alpha, lora.dora, lora.num_layers, lora.targets) == (
        4, 0.1, 32.0, True, 2, ["q_proj", "v_proj"])
    assert "ignoring 'mask_prompt'" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndata: d.jsonl\nadapter_path: ad\nwarmup_steps: 3\n")
    assert "bad.yaml: unknown option(s) warmup_steps" in cli_fails(capsys, "lora", "-c", bad)


def test_report_to_goes_through_mlx_lm_callbacks(build_case, tmp_path, monkeypatch, capsys):
    """`--report-to wandb` builds mlx-lm's WandBCallback; a stand-in `wandb` module records what it is given."""
    import mlx_lm.tuner.callbacks as callbacks

    from lora_fixtures import color_task

    class FakeWandb:
        def __init__(self):
            self.init_kwargs, self.logged = None, []

        def init(self, **kw):
            self.init_kwargs = kw

        def log(self, data, step=None):
            self.logged.append((step, data))

    fake = FakeWandb()
    monkeypatch.setattr(callbacks, "wandb", fake)
    built = build_case(Case("alias_tiny"))
    color_task(tmp_path / "data", 8, "train", seed=1)
    (tmp_path / "data" / "valid.jsonl").write_text((tmp_path / "data" / "train.jsonl").read_text())
    ad = tmp_path / "ad"
    cli_run("lora", "--model", built.hf_dir, "--data", tmp_path / "data", "--adapter", ad, "--iters", 4,
            "--batch-size", 2, "--steps-per-report", 2, "--steps-per-eval", 4, "--learning-rate", 1e-3,
            "--dtype", "float32", "--report-to", "wandb", "--project-name", "tiny")
    assert fake.init_kwargs["project"] == "tiny" and fake.init_kwargs["dir"] == str(ad)
    assert fake.init_kwargs["config"]["lr"] == 1e-3
    train = [(s, d) for s, d in fake.logged if "train_loss" in d]
    val = [(s, d) for s, d in fake.logged if "val_loss" in d]
    assert [s for s, _ in train] == [2, 4] and [s for s, _ in val] == [0, 4]
    # the same numbers as the run's own loss.csv
    rows = [line.split(",") for line in (ad / "loss.csv").read_text().splitlines()]
    header = rows[0]
    csv_train = [float(r[header.index("loss")]) for r in rows[1:] if r[header.index("split")] == "train"]
    assert [round(d["train_loss"], 6) for _, d in train] == [round(x, 6) for x in csv_train]
    assert {"learning_rate", "iterations_per_second", "tokens_per_second", "trained_tokens", "peak_memory"} <= set(
        train[0][1])
    err = cli_fails(capsys, "lora", "--model", built.hf_dir, "--data", tmp_path / "data", "--adapter-path",
                    tmp_path / "ad2", "--report-to", "nowhere")
    assert "--report-to nowhere: nowhere callback doesn't exist" in err


def test_python_dash_m_runs_the_command():
    r = subprocess.run([sys.executable, "-m", "mlx_internvl", "generate", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "--adapter-path" in r.stdout and "--max-tokens" in r.stdout and "-m," in r.stdout


def cli_run(*args) -> None:
    try:
        cli_main([str(a) for a in args])
    except SystemExit as e:
        assert e.code in (0, None), f"mlx-internvl {' '.join(map(str, args))} exited with {e.code}"


def test_image_a_b_runs_like_repeated_image(build_case, tmp_path, capsys):
    """End to end: two images after one flag give the same reply as the flag repeated."""
    from PIL import Image

    built = build_case(Case("alias_tiny"))
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (60, 40), colour).save(tmp_path / f"{i}.png")
    common = ["generate", "--model", built.original_dir, "--prompt", "Compare.", "-m", 6, "--verbose"]
    cli_run(*common, "--image", tmp_path / "0.png", tmp_path / "1.png")
    a = capsys.readouterr()
    cli_run(*common, "--image", tmp_path / "0.png", "--image", tmp_path / "1.png")
    b = capsys.readouterr()
    assert a.out == b.out
    assert "Image-1: <image>\nImage-2: <image>" in a.err and a.err.count("Tiles per image") == 1
