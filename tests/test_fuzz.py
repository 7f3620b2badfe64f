"""Property-based fuzzing of every input class: whatever goes in, the outcome is a result or a `UserError` that names
the input — never another exception, never a traceback.

Examples are bounded (`max_examples`) and derandomized, so the run is fast and the same every time. With
`MLX_INTERNVL_FUZZ_REPORT=path` the tally of outcomes per class is written there (benchmarks/reliability_table.py
turns it into docs/reliability.md's table).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from conftest import ASSETS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import mlx_internvl
from builders import Case
from lora_fixtures import color_task
from mlx_internvl.cli.main import main
from mlx_internvl.convert import convert
from mlx_internvl.errors import UserError
from mlx_internvl.images import open_image
from mlx_internvl.processing import image_to_tiles

TALLY = defaultdict(Counter)
CASE = Case("smoke_qwen2")


def fuzz(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


def outcome(cls: str, call, names):
    """Run `call`; a result or a UserError whose message passes `names(message)` is fine, anything else fails."""
    try:
        call()
    except UserError as e:
        assert names(str(e)), f"{cls}: the error does not name the input: {e}"
        TALLY[cls]["UserError"] += 1
        return
    TALLY[cls]["result"] += 1


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    path = os.environ.get("MLX_INTERNVL_FUZZ_REPORT")
    if path:
        old = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        old.update({k: dict(v) for k, v in TALLY.items()})
        Path(path).write_text(json.dumps(old, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def tiny(build_case, tmp_path_factory):
    built = build_case(CASE)
    root = tmp_path_factory.mktemp("fuzz")
    mlx_dir = root / "mlx"
    convert(built.hf_dir, mlx_dir)
    model, processor = mlx_internvl.load(mlx_dir)
    return built, root, mlx_dir, model, processor


scalars = st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                           max_size=3), max_leaves=8)
pieces = st.sampled_from(["<image>", "<video>", "hello", " ", "\n", "<img>", "</img>", "<IMG_CONTEXT>", "<|im_end|>",
                          "Image-1: ", "é", "\x00", "\ud7ff", "{system_message}", "%s"])
texts = st.lists(pieces | st.text(max_size=6), max_size=8).map("".join)
plain = st.text(st.characters(exclude_categories=("Cs",)), max_size=16)  # ordinary text, any script
# mostly text (plain or with markers), one in eight a non-string
questions = st.integers(0, 7).flatmap(lambda k: scalars if k == 0 else (plain if k % 2 else texts))


# --- chat messages and histories -> prompt ----------------------------------------------------------------------

CHAT_WORDS = ("prompt", "history", "system_message", "<image>", "<video>", "placeholder", "context", "reserved",
              "max_tiles", "frames", "images")


@fuzz(150)
@given(question=questions,
       history=st.integers(0, 7).flatmap(lambda k: [
           st.lists(st.tuples(questions, questions) | st.lists(questions, max_size=3) | scalars, max_size=3),
           scalars][k % 2] if k < 2 else (st.none() if k < 5 else st.lists(st.tuples(plain, plain), max_size=3))),
       system=st.none() | questions, n_images=st.integers(0, 2), n_frames=st.integers(0, 2),
       max_tiles=st.integers(0, 7).flatmap(lambda k: st.sampled_from([0, -1, "2", 1.5, [1], [1, 1]]) if k == 0
                                           else st.none() | st.integers(1, 3)))
def test_chat_messages_to_prompt(tiny, question, history, system, n_images, n_frames, max_tiles):
    processor = tiny[4]
    images = [Image.new("RGB", (30 + 10 * i, 20)) for i in range(n_images)]
    video = [Image.new("RGB", (16, 16))] * n_frames if n_frames else None
    outcome("chat messages and histories -> prompt",
            lambda: processor(question, images=images, history=history, system_message=system, video=video,
                              max_tiles=max_tiles),
            lambda m: any(w in m for w in CHAT_WORDS))


# --- LoRA data rows in every format -----------------------------------------------------------------------------

image_refs = st.just("img.png") | st.sampled_from([
    "img.png", "missing.png", "", "cut.jpg", "sub", "data:image/png;base64,AAAA", "data:nocomma",
    "http://127.0.0.1:9/x.png", "/etc/passwd", 5, None]) | st.lists(st.sampled_from(["img.png", "cut.jpg", 3]),
                                                                   max_size=3)
internvl_rows = st.fixed_dictionaries(
    {"conversations": st.one_of(
        st.tuples(st.just({"from": "human", "value": "<image>\nWhat?"}),
                  st.fixed_dictionaries({"from": st.just("gpt"), "value": plain})).map(list),
        st.lists(st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "user", 3]),
                                        "value": questions}) | json_values, max_size=4), json_values)},
    optional={"image": image_refs, "video": st.sampled_from(["v.mp4", ""])})
swift_rows = st.fixed_dictionaries(
    {"query": questions, "response": questions},
    optional={"history": st.lists(st.lists(questions, max_size=3), max_size=2) | json_values, "images": image_refs,
              "system": questions})
parts = st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "image_url", "video", None])},
                              optional={"text": questions, "image": image_refs,
                                        "image_url": image_refs | st.fixed_dictionaries({"url": image_refs})})
openai_rows = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                                 "content": questions | st.lists(parts, max_size=3)}),
                          max_size=4) | json_values},
    optional={"images": image_refs})
answers = plain.filter(lambda s: s.strip() != "")
good_rows = st.one_of(  # well-formed lines of each format, with any text
    st.builds(lambda q, a: {"image": "img.png", "conversations": [{"from": "human", "value": q},
                                                                 {"from": "gpt", "value": a}]}, plain, answers),
    st.builds(lambda q, a: {"query": q, "response": a, "images": ["img.png"]}, plain, answers),
    st.builds(lambda q, a: {"messages": [{"role": "user", "content": [{"type": "image", "image": "img.png"},
                                                                      {"type": "text", "text": q}]},
                                         {"role": "assistant", "content": a}]}, plain, answers))
rows = st.one_of(good_rows, good_rows, internvl_rows, swift_rows, openai_rows, json_values)
lines = rows.map(json.dumps) | st.text(max_size=20) | st.sampled_from(["[" * 3000 + "]" * 3000, "{", '{"a": 1'])


@pytest.fixture(scope="module")
def data_dir(tiny):
    root = tiny[1] / "data"
    color_task(root, 1, "base", seed=0)
    shutil.copy(root / "base0.png", root / "img.png")
    raw = (ASSETS / "images" / "image3.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(raw[: len(raw) // 3])
    (root / "sub").mkdir()
    return root


@fuzz(120)
@given(batch=st.lists(lines, min_size=1, max_size=3))
def test_lora_data_rows(tiny, data_dir, batch):
    from mlx_internvl.lora.data import load_dataset
    from mlx_internvl.lora.trainer import TrainingArgs, encode_dataset

    path = data_dir / "fuzz.jsonl"
    text = "\n".join(batch) + "\n"
    path.write_text(text)

    def run():
        ds = load_dataset(path)
        encoded, problems, _ = encode_dataset(ds, tiny[4], TrainingArgs(max_length=4096))
        numbered = [i + 1 for i, line in enumerate(text.split("\n")) if line.strip()]
        for p in problems:  # each bad line is named by file and line
            assert any(p.startswith(f"{path}:{n}: ") for n in numbered), p
        TALLY["LoRA data lines"]["line kept"] += len(encoded)
        TALLY["LoRA data lines"]["line reported (file:line: why)"] += len(problems)

    outcome("LoRA data files", run, lambda m: str(path) in m)


# --- config.json ------------------------------------------------------------------------------------------------

config_values = (st.none() | st.booleans() | st.integers(-2, 70) | st.floats(allow_nan=True, allow_infinity=True)
                 | st.text(max_size=8) | st.lists(st.integers(0, 64), max_size=2)
                 | st.dictionaries(st.sampled_from(["bits", "group_size", "type", "factor"]), st.integers(-1, 130),
                                   max_size=2))


@pytest.fixture(scope="module")
def config_dirs(tiny):
    built, root, mlx_dir = tiny[:3]
    dirs = {}
    for name, src in (("mlx", mlx_dir), ("original", built.original_dir), ("hf", built.hf_dir)):
        d = root / f"cfg-{name}"
        shutil.copytree(src, d)
        dirs[name] = (d, json.loads((d / "config.json").read_text()))
    return dirs


@fuzz(100)
@given(fmt=st.sampled_from(["mlx", "original", "hf"]), data=st.data())
def test_config_json(tiny, config_dirs, fmt, data):
    d, base = config_dirs[fmt]
    cfg = json.loads(json.dumps(base))
    for _ in range(data.draw(st.integers(1, 3))):
        # Drawn anew each time: an earlier mutation may have replaced a section with a non-object value.
        sections = [None] + [k for k, v in cfg.items() if isinstance(v, dict)]
        section = data.draw(st.sampled_from(sections))
        target = cfg if section is None else cfg[section]
        keys = sorted(target) + ["quantization", "group_size", "rope_scaling"]
        key = data.draw(st.sampled_from(keys))
        if data.draw(st.booleans()) and key in target and key not in ("architectures", "model_type"):
            del target[key]
        else:
            target[key] = data.draw(config_values)
    if data.draw(st.integers(0, 20)) == 0:
        cfg = data.draw(st.sampled_from([[cfg], "x", 3, None]))
    (d / "config.json").write_text(json.dumps(cfg))
    outcome(f"config.json ({fmt} layout)", lambda: mlx_internvl.load(d, lazy=True),
            lambda m: str(d / "config.json") in m or str(d) in m)


# --- image bytes: truncated and mutated real photos -------------------------------------------------------------

PHOTOS = {name: (ASSETS / "images" / name).read_bytes() for name in ("image1.jpg", "image3.jpg", "chelsea.png")}


@fuzz(150)
@given(name=st.sampled_from(sorted(PHOTOS)), cut=st.just(1.0) | st.floats(0.0, 1.0), flips=st.lists(
    st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=4), header=st.booleans())
def test_image_bytes(tiny, name, cut, flips, header):
    data = bytearray(PHOTOS[name])
    for pos, value in flips:  # mutate, mostly in the first kilobyte, where the headers are
        i = int(pos * (min(len(data), 1024) if header else len(data))) % len(data)
        data[i] = value
    data = bytes(data[: max(0, int(len(data) * cut))]) if cut < 0.98 else bytes(data)
    config = tiny[4].config
    outcome("image bytes (truncated / mutated photos)",
            lambda: image_to_tiles(open_image(data), config, 2),
            lambda m: m.startswith(f"image <{len(data)} bytes>"))


# --- CLI option values ------------------------------------------------------------------------------------------

NUMBERS = ["0", "1", "-1", "2", "0.5", "nan", "inf", "-inf", "1e309", "abc", "", "3.7", "99999999999999999999"]
GENERATE_OPTIONS = ["--temperature", "--top-p", "--top-k", "--min-p", "--repetition-penalty", "--seed",
                    "--max-tiles", "--num-frames", "--prefill-step-size", "--max-kv-size", "--kv-bits"]


def cli_outcome(cls, capsys, argv, given_options):
    capsys.readouterr()
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2, None) and "Traceback" not in err, err
    if code in (0, None):
        TALLY[cls]["result"] += 1
        return
    line = next((x for x in err.splitlines() if x.startswith("Error:")), "")
    names = {o for o in given_options} | {o.lstrip("-").replace("-", "_") for o in given_options}
    assert any(n in line for n in names), err
    TALLY[cls]["UserError" if code == 1 else "usage error (click)"] += 1


@fuzz(40)
@given(opts=st.dictionaries(st.sampled_from(GENERATE_OPTIONS), st.sampled_from(NUMBERS), min_size=1, max_size=3),
       max_tokens=st.sampled_from(["1", "2", "0", "-3", "x"]))
def test_cli_generate_options(tiny, capsys, opts, max_tokens):
    argv = ["generate", "--model", str(tiny[2]), "-p", "Hi", "--max-tokens", max_tokens]
    for k, v in opts.items():
        argv += [k, v]
    cli_outcome("CLI option values (generate)", capsys, argv, list(opts) + ["--max-tokens"])


LORA_OPTIONS = ["--rank", "--alpha", "--dropout", "--lr", "--min-lr", "--warmup", "--weight-decay", "--save-every",
                "--report-every", "--max-length", "--max-tiles", "--batch-size", "--grad-accum",
                "--keep-checkpoints", "--val-batches", "--num-layers", "--epochs"]


@fuzz(15)
@given(opts=st.dictionaries(st.sampled_from(LORA_OPTIONS), st.sampled_from(NUMBERS), min_size=1, max_size=3))
def test_cli_lora_options(tiny, data_dir, capsys, tmp_path_factory, opts):
    argv = ["lora", "--model", str(tiny[2]), "--data", str(data_dir / "base.jsonl"), "--iters", "1",
            "--adapter-path", str(tmp_path_factory.mktemp("ad") / "ad")]
    for k, v in opts.items():
        argv += [k, v]
    cli_outcome("CLI option values (lora)", capsys, argv, list(opts))
