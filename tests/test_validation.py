"""Bad input at every entry ends in one `UserError` that names it: CLI options, Python API arguments, config.json
values, LoRA data lines and options, image URLs; and the guards that need a little set-up (a trickling server,
threads, a NaN mid-run)."""

import http.server
import io
import json
import shutil
import socketserver
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ASSETS
from PIL import Image

import mlx_internvl
from builders import Case
from lora_fixtures import color_task
from mlx_internvl.chat import ChatSession
from mlx_internvl.cli.main import cli, main
from mlx_internvl.convert import convert
from mlx_internvl.errors import UserError
from mlx_internvl.fetch import FetchPolicy, fetch_url
from mlx_internvl.files import atomic_write_text
from mlx_internvl.images import open_image
from mlx_internvl.processing import dynamic_preprocess
from mlx_internvl.projector import pixel_shuffle
from mlx_internvl.video import frame_indices, load_video_frames

IMG = ASSETS / "images" / "image1.jpg"
CASE = Case("smoke_qwen2")


@pytest.fixture(scope="module")
def tiny(build_case, tmp_path_factory):
    built = build_case(CASE)
    mlx_dir = tmp_path_factory.mktemp("val") / "mlx"
    convert(built.hf_dir, mlx_dir)
    model, processor = mlx_internvl.load(mlx_dir)
    return built, mlx_dir, model, processor


def one_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code in (1, 2) and "Traceback" not in err, err
    return err


# --- CLI options: refused before the model is even looked for ---------------------------------------------------

@pytest.mark.parametrize("option,value,named", [
    ("--min-p", "2", "min_p"), ("--prefill-step-size", "0", "prefill_step_size"),
    ("--temperature", "nan", "temperature"), ("--top-p", "inf", "top_p"), ("--top-k", "-1", "top_k"),
    ("--max-tokens", "0", "max_tokens"), ("--repetition-penalty", "-1", "repetition_penalty"),
    ("--max-kv-size", "3", "max_kv_size"), ("--seed", "-5", "seed"), ("--seed", str(2**64), "seed"),
    ("--seed", "9" * 20, "seed"), ("--top-k", str(2**31), "top_k"), ("--max-tokens", str(2**31), "max_tokens"),
    ("--prefill-step-size", "1" * 5000, "prefill_step_size"), ("--logit-bias", '{"²": 1}', "logit_bias"),
    ("--logit-bias", "--5:1", "logit_bias"), ("--logit-bias", "1" * 5000 + ":1", "logit_bias")])
def test_generate_options(capsys, option, value, named):
    """Each integer has a range (`sampling.INT_RANGES`: a seed is what mx.random.seed takes, [0, 2**64)), checked
    by click or by `SamplingOptions` before the model is looked for."""
    err = one_error(capsys, ["generate", "--model", "/nonexistent/model", "-p", "hi", option, value])
    last = err.strip().splitlines()[-1]
    assert last.startswith((f"Error: {named}", f"Error: Invalid value for '{option}'")), err
    assert "/nonexistent" not in err


@pytest.mark.parametrize("option,value", [("--save-every", "0"), ("--report-every", "0"), ("--lr", "nan"),
                                          ("--max-tiles", "0"), ("--epochs", "inf"), ("--alpha", "nan"),
                                          ("--grad-accum", "0"), ("--min-lr", "-1"), ("--seed", str(2**32)),
                                          ("--batch-size", str(2**31)), ("--iters", str(2**40))])
def test_lora_options(capsys, tmp_path, option, value):
    (tmp_path / "d.jsonl").write_text("")
    err = one_error(capsys, ["lora", "--model", "/nonexistent/model", "--data", tmp_path / "d.jsonl",
                             "--adapter-path", tmp_path / "ad", option, value])
    assert err.startswith(f"Error: {option}:"), err
    assert not (tmp_path / "ad").exists()


def test_lora_quantize_group_size_that_quantizes_nothing(tmp_path):
    from mlx_internvl.lora import finetune

    with pytest.raises(UserError, match="--q-group-size: expected one of 32, 64, 128, got 48"):
        finetune("/nonexistent", tmp_path / "d.jsonl", tmp_path / "ad", quantize_bits=4, q_group_size=48)


def test_bench_tiles(capsys):
    assert one_error(capsys, ["bench", "--tiles", "a,b"]).startswith("Error: --tiles 'a,b'")


def test_chat_survives_an_unbalanced_quote(tiny):
    _, mlx_dir, _, _ = tiny
    r = CliRunner().invoke(cli, ["chat", "--model", str(mlx_dir), "--max-tokens", "3"],
                           input='/image "x\nHello\n/exit\n', catch_exceptions=False)
    assert r.exit_code == 0
    assert "cannot read the command (No closing quotation)" in r.output


# --- Python API -------------------------------------------------------------------------------------------------

API = {
    "zero-width PIL image": (lambda m, p: p("hi", images=[Image.new("RGB", (0, 10))]), "0x10 pixels"),
    "max_tiles as a string": (lambda m, p: p("hi", images=[IMG], max_tiles="3"), "max_tiles: expected an integer"),
    "num_frames 2.5": (lambda m, p: p("hi", video=[Image.new("RGB", (8, 8))], num_frames=2.5), "num_frames"),
    "prompt None": (lambda m, p: p(None), "prompt"),
    "history of triples": (lambda m, p: p("hi", history=[("a", "b", "c")]), "history[0]"),
    "images an int": (lambda m, p: p("hi", images=5), "images"),
    "system message int": (lambda m, p: p("hi", system_message=3), "system_message"),
    "max_tokens 2.5": (lambda m, p: mlx_internvl.generate(m, p, "hi", max_tokens=2.5), "max_tokens"),
    "temperature '0.5'": (lambda m, p: mlx_internvl.generate(m, p, "hi", temperature="0.5"), "temperature"),
    "top_k 2.5": (lambda m, p: mlx_internvl.generate(m, p, "hi", top_k=2.5), "top_k"),
    "kv_bits 5": (lambda m, p: mlx_internvl.generate(m, p, "hi", kv_bits=5), "kv_bits"),
    "chat max_tiles 0": (lambda m, p: ChatSession(m, p, max_tiles=0), "max_tiles"),
    "chat question None": (lambda m, p: ChatSession(m, p).ask(None), "prompt"),
    "empty video": (lambda m, p: p("hi", video=[]), "video"),
    # an id past the vocabulary indexes out of bounds in the logits processor (a heap corruption on the CPU)
    "logit_bias past the vocabulary": (lambda m, p: mlx_internvl.generate(m, p, "hi", logit_bias={5000: 1.0}),
                                       "not a token id of this model"),
    "chat logit_bias past the vocabulary": (lambda m, p: ChatSession(m, p, logit_bias={5000: 1.0}),
                                            "not a token id of this model"),
    "batch logit_bias past the vocabulary": (lambda m, p: mlx_internvl.batch_generate(
        m, p, ["hi"], logit_bias={5000: 1.0}), "not a token id of this model"),
    "seed 2**64": (lambda m, p: mlx_internvl.generate(m, p, "hi", temperature=1.0, seed=2**64), "seed"),
}


@pytest.mark.parametrize("name", list(API))
def test_api_arguments(tiny, name):
    _, _, model, processor = tiny
    call, named = API[name]
    with pytest.raises(UserError, match=named.replace("[", r"\[")):
        call(model, processor)


VIDEO = ASSETS / "video" / "carphone_pristine.mp4"  # 120 frames, 4 s
FUNCTIONS = {
    "load_video_frames num_frames 2.5": (lambda: load_video_frames(VIDEO, num_frames=2.5), "num_frames: expected an"),
    "load_video_frames num_frames '8'": (lambda: load_video_frames(VIDEO, num_frames="8"), "num_frames: expected an"),
    "load_video_frames bound reversed": (lambda: load_video_frames(VIDEO, bound=(3, 1)), "bound: the end"),
    "load_video_frames bound NaN": (lambda: load_video_frames(VIDEO, bound=(float("nan"), 1)), "bound\\[0\\]"),
    "load_video_frames bound a string": (lambda: load_video_frames(VIDEO, bound="1-2"), "bound: expected"),
    "load_video_frames bound past the end": (lambda: load_video_frames(VIDEO, bound=(100, 200)), "after the video"),
    "load_video_frames path an int": (lambda: load_video_frames(5), "video: expected a file path"),
    "frame_indices num_segments 2.5": (lambda: frame_indices(10, 30.0, 2.5), "num_frames"),
    "dynamic_preprocess max_num 2.5": (lambda: dynamic_preprocess(Image.new("RGB", (9, 9)), max_num=2.5), "max_num"),
    "dynamic_preprocess image_size 0": (lambda: dynamic_preprocess(Image.new("RGB", (9, 9)), image_size=0),
                                        "image_size"),
    "dynamic_preprocess a path": (lambda: dynamic_preprocess(str(IMG)), "expected a PIL image"),
    "pixel_shuffle scale 0": (lambda: pixel_shuffle(mx.zeros((1, 4, 4, 2)), scale_factor=0), "scale_factor"),
    "pixel_shuffle scale 0.3": (lambda: pixel_shuffle(mx.zeros((1, 4, 4, 2)), scale_factor=0.3), "scale_factor"),
    "pixel_shuffle version v3": (lambda: pixel_shuffle(mx.zeros((1, 4, 4, 2)), version="v3"), "version"),
    "pixel_shuffle 3-d input": (lambda: pixel_shuffle(mx.zeros((4, 4, 2))), "expected \\[N, G, G, C\\]"),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_public_functions_check_their_arguments(name):
    pytest.importorskip("av")
    call, named = FUNCTIONS[name]
    with pytest.raises(UserError, match=named):
        call()


def test_a_single_image_need_not_be_in_a_list(tiny):
    processor = tiny[3]
    assert processor("hi", images=str(IMG))["num_tiles"] == processor("hi", images=[IMG])["num_tiles"]


# --- config.json ------------------------------------------------------------------------------------------------

def _set(section, key, value):
    def mutate(cfg):
        (cfg if section is None else cfg[section])[key] = value
    return mutate


CONFIGS = {
    "hidden_size '64'": (_set("llm_config", "hidden_size", "64"), "llm_config: key 'hidden_size': expected an integer"),
    "num_hidden_layers 'two'": (_set("llm_config", "num_hidden_layers", "two"), "'num_hidden_layers'"),
    "vocab_size null": (_set("llm_config", "vocab_size", None), "'vocab_size'"),
    "num_attention_heads 0": (_set("llm_config", "num_attention_heads", 0), "'num_attention_heads'"),
    "quantization without group_size": (_set(None, "quantization", {"bits": 4}), "missing key 'group_size'"),
    "downsample_ratio 0": (_set(None, "downsample_ratio", 0), "'downsample_ratio'"),
    "rope_scaling a string": (_set("llm_config", "rope_scaling", "x"), "'rope_scaling'"),
    "rope_scaling type unknown": (_set("llm_config", "rope_scaling", {"type": "ntk-by-parts", "factor": 2.0}),
                                  "rope_scaling (type 'ntk-by-parts') is not supported; supported types: default"),
    "rope_scaling dynamic without factor": (_set("llm_config", "rope_scaling", {"type": "dynamic"}),
                                            "(type 'dynamic') needs a positive number 'factor', got None"),
    "rope_scaling longrope factors too short": (
        _set("llm_config", "rope_scaling", {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
                                            "original_max_position_embeddings": 32}), "'short_factor' has 1 values"),
    "select_layer 99": (_set(None, "select_layer", 99), "select_layer 99"),
    "image_size not square": (_set("vision_config", "image_size", [448, 224]), "image_size [448, 224] is not square"),
    "model_type empty": (_set("llm_config", "model_type", ""), "llm_config.model_type is ''"),
    # null means one KV head per attention head, as transformers reads it; this checkpoint has fewer, so its
    # weights do not fit that and the error says which tensor.
    "num_key_value_heads null": (_set("llm_config", "num_key_value_heads", None), "k_proj.bias"),
    "a JSON list": (None, "expected a JSON object"),
}


def test_square_sizes_given_as_lists_load(tiny, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny[1], d)
    cfg = json.loads((d / "config.json").read_text())
    size, patch = cfg["vision_config"]["image_size"], cfg["vision_config"]["patch_size"]
    cfg["vision_config"].update(image_size=[size, size], patch_size=[patch, patch])
    (d / "config.json").write_text(json.dumps(cfg))
    model, _ = mlx_internvl.load(d, lazy=True)
    assert (model.config.vision_config.image_size, model.config.vision_config.patch_size) == (size, patch)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_values(tiny, tmp_path, name):
    mutate, named = CONFIGS[name]
    d = tmp_path / "m"
    shutil.copytree(tiny[1], d)
    cfg = json.loads((d / "config.json").read_text())
    if mutate is None:
        cfg = [cfg]
    else:
        mutate(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        mlx_internvl.load(d)
    assert str(d / "config.json") in str(e.value) and named in str(e.value)


# --- images and URLs --------------------------------------------------------------------------------------------

class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def serve(handler_body):
    """A 127.0.0.1 server whose GET runs `handler_body(wfile)`; bounded: every response ends within 6 s."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            try:
                handler_body(self)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    server = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/x.png"


def test_url_that_trickles_is_cut_at_the_deadline():
    def trickle(h):
        h.send_response(200)
        h.end_headers()
        end = time.monotonic() + 6
        while time.monotonic() < end:
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.05)

    server, url = serve(trickle)
    try:
        with pytest.raises(UserError, match="within the 1 s deadline"):
            fetch_url(url, FetchPolicy(allow_private=True, deadline_s=1))
    finally:
        server.shutdown()


def test_url_size_cap():
    def endless(h):
        h.send_response(200)
        h.end_headers()
        for _ in range(200):
            h.wfile.write(b"x" * 8192)

    def declared(h):
        h.send_response(200)
        h.send_header("Content-Length", str(10 ** 9))
        h.end_headers()

    for body, words in ((endless, "more than 100000 bytes"), (declared, "1000000000 bytes is over")):
        server, url = serve(body)
        try:
            with pytest.raises(UserError, match=words):
                fetch_url(url, FetchPolicy(allow_private=True, max_bytes=100_000))
        finally:
            server.shutdown()


def test_pixel_limit_does_not_touch_pillows_global(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000_000)
    data = IMG.read_bytes()
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(Image.MAX_IMAGE_PIXELS)

    watcher = threading.Thread(target=watch)
    watcher.start()
    errors = []

    def work(limit):
        for _ in range(5):
            try:
                open_image(data, max_pixels=limit)
            except UserError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=work, args=(limit,)) for limit in (100, 10 ** 8, 100, 10 ** 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert seen == {50_000_000}
    assert len(errors) == 10 and all("too large to decode safely" in e for e in errors)


# --- LoRA data --------------------------------------------------------------------------------------------------

def _bomb_png(width=20000, height=20000) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_bad_data_lines_are_listed_up_front(tiny, tmp_path):
    from mlx_internvl.lora.data import load_dataset
    from mlx_internvl.lora.trainer import TrainingArgs, encode_dataset

    good = color_task(tmp_path, 2, "t", seed=0)
    (tmp_path / "bomb.png").write_bytes(_bomb_png())
    data = IMG.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    bad_image = lambda name: dict(good[0], image=name)  # noqa: E731
    lines = [json.dumps(good[0]), "[" * 50000 + "]" * 50000, json.dumps(bad_image("bomb.png")),
             json.dumps(bad_image("cut.jpg")), json.dumps(good[1])]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_dataset(tmp_path / "d.jsonl")
    encoded, problems, _ = encode_dataset(ds, tiny[3], TrainingArgs())
    assert len(encoded) == 2 and len(problems) == 3, problems
    assert problems[0].endswith("d.jsonl:2: JSON nested too deeply to read (thousands of levels); is the line garbled?")
    assert "d.jsonl:3: image" in problems[1] and "too large to decode safely" in problems[1]
    assert "d.jsonl:4: image" in problems[2] and "truncated" in problems[2]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    import mlx.core as mx

    from mlx_internvl.lora import LoraConfig, TrainingArgs, finetune, trainer

    color_task(tmp_path, 4, "t", seed=0)
    real, calls = trainer.loss_sum, [0]

    def poisoned(model, batch, frozen_features=True):
        calls[0] += 1
        ce, n = real(model, batch, frozen_features)
        return (ce * mx.array(float("nan")) if calls[0] >= 3 else ce), n

    monkeypatch.setattr(trainer, "loss_sum", poisoned)
    args = TrainingArgs(batch_size=2, iters=4, save_every=1, compile=False)
    with pytest.raises(UserError, match=r"step 3: the training loss is nan.*checkpoint, step-0000002.*--resume"):
        finetune(tiny[1], tmp_path / "t.jsonl", tmp_path / "ad", lora=LoraConfig(rank=2), args=args,
                 log=lambda *_: None)
    kept = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
    step2 = mx.load(str(tmp_path / "ad" / "checkpoints" / "step-0000002" / "adapters.safetensors"))
    assert all(np.isfinite(np.array(v)).all() for v in kept.values())
    assert all(np.array_equal(np.array(kept[k]), np.array(step2[k])) for k in kept)


def test_equal_length_samples_are_shuffled_within_their_bucket():
    from mlx_internvl.lora.batching import Batcher
    from mlx_internvl.lora.render import Encoded

    samples = [Encoded(np.zeros(40 + (i % 3), np.int32), np.ones(40 + (i % 3), bool), [], [], 1, str(i))
               for i in range(24)]
    orders = {seed: Batcher(samples, 4, None, 0, 1, seed=seed).batches for seed in (0, 1)}
    assert orders[0] != orders[1]
    for batches in orders.values():  # padding is unchanged: every batch stays inside one 32-token bucket
        assert all(len({-(-len(samples[i].ids) // 32) for i in b}) == 1 for b in batches)


# --- outputs ----------------------------------------------------------------------------------------------------

def test_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    def failing(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    from mlx_internvl.files import atomic_write

    with pytest.raises(UserError, match="no space left"):
        atomic_write(target, failing)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    with pytest.raises(UserError, match="is a directory"):
        atomic_write_text(tmp_path, "x")


def test_image_bytes_report_their_size(tmp_path):
    with pytest.raises(UserError, match=r"image <5 bytes>: not a readable image"):
        open_image(b"hello")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    assert open_image(buf.getvalue()).size == (4, 4)
