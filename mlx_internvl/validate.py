"""Checks at the edge: every option, argument, config value and data field is tested where it enters, before any
arithmetic, and a bad one is a `UserError` that names it, says what was expected, what was given and how to fix it.

The entry points (CLI commands, `generate`/`ChatSession`/`Processor` arguments, `config.json` readers, LoRA data
and training arguments) call these helpers; nothing deeper re-checks.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Tuple

from .errors import UserError

SEED_MAX = 2**64 - 1  # mx.random.seed and mx.random.key take an unsigned 64-bit integer
COUNT_MAX = 2**31 - 1  # counts and sizes reach MLX and numpy as int32
FLASH_WINDOW_MAX = 1_000_000  # loss ratios held by --train-flash router (4 MB as float32)
TRAIN_SEED_MAX = 2**32 - 1  # training reseeds MLX with seed * 1_000_003 + microbatch, which must stay under SEED_MAX


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def integer(name: str, value: Any, *, minimum: Optional[int] = None, maximum: Optional[int] = None,
            allow_none: bool = False, fix: str = "") -> Optional[int]:
    """`value` as an int (bools and floats refused), within [minimum, maximum]."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise UserError(f"{name}: expected an integer{_range(minimum, maximum)}, got {_fmt(value)} "
                        f"({type(value).__name__}){_fix(fix)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise UserError(f"{name}: expected an integer{_range(minimum, maximum)}, got {value}{_fix(fix)}")
    return value


def number(name: str, value: Any, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
           min_open: bool = False, max_open: bool = False, allow_none: bool = False,
           fix: str = "") -> Optional[float]:
    """`value` as a finite float within the bounds (NaN and infinities refused)."""
    if value is None and allow_none:
        return None
    want = f"a finite number{_range(minimum, maximum, min_open, max_open)}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise UserError(f"{name}: expected {want}, got {_fmt(value)} ({type(value).__name__}){_fix(fix)}")
    value = float(value)
    bad = not math.isfinite(value)
    if minimum is not None:
        bad = bad or value < minimum or (min_open and value == minimum)
    if maximum is not None:
        bad = bad or value > maximum or (max_open and value == maximum)
    if bad:
        raise UserError(f"{name}: expected {want}, got {value}{_fix(fix)}")
    return value


def choice(name: str, value: Any, options: Iterable, fix: str = "") -> Any:
    options = list(options)
    if value not in options:
        raise UserError(f"{name}: expected one of {', '.join(map(repr, options))}, got {_fmt(value)}{_fix(fix)}")
    return value


def _range(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def _fix(fix: str) -> str:
    return f"; {fix}" if fix else ""


# --- images and frames ------------------------------------------------------------------------------------------
# (sampling and KV-cache options are checked by `sampling.SamplingOptions` / `KVOptions` themselves)

def max_tiles(value, name: str = "max_tiles"):
    """None (the config's), an int >= 1, or a list/tuple of those (one per image)."""
    if isinstance(value, (list, tuple)):
        return [integer(f"{name}[{i}]", v, minimum=1, allow_none=True) for i, v in enumerate(value)]
    return integer(name, value, minimum=1, allow_none=True, fix="tiles per image, thumbnail not counted")


def num_frames(value) -> int:
    return integer("num_frames", value, minimum=1, fix="frames sampled from the video")


def path(name: str, value: Any) -> Path:
    """`value` as a path (a str or os.PathLike, not empty), `~` expanded."""
    if isinstance(value, (str, os.PathLike)) and str(value):
        return Path(value).expanduser()
    raise UserError(f"{name}: expected a file path (str or pathlib.Path), got {_fmt(value)} ({type(value).__name__})")


def bound(value: Any, name: str = "bound") -> Optional[Tuple[float, float]]:
    """None (the whole video), or (start, end) in seconds with 0 <= start < end."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise UserError(f"{name}: expected (start, end) in seconds, got {_fmt(value)} ({type(value).__name__})")
    start, end = number(f"{name}[0]", value[0], minimum=0), number(f"{name}[1]", value[1], minimum=0)
    if end <= start:
        raise UserError(f"{name}: the end ({end} s) must come after the start ({start} s)")
    return start, end


# --- config.json ------------------------------------------------------------------------------------------------

_POS_INT, _INT, _POS_NUM, _BOOL, _STR, _RATIO, _DICT = "pos_int", "int", "pos_num", "bool", "str", "ratio", "dict"

# Keys whose type matters to the code that reads them; others pass through untouched.
TOP_KEYS = {
    "downsample_ratio": _RATIO, "select_layer": _INT, "force_image_size": _POS_INT, "min_dynamic_patch": _POS_INT,
    "max_dynamic_patch": _POS_INT, "use_thumbnail": _BOOL, "dynamic_image_size": _BOOL, "ps_version": _STR,
    "template": _STR, "system_message": _STR, "vision_feature_layer": _INT, "image_token_id": _INT,
    "image_token_index": _INT,
}
VISION_KEYS = {
    "hidden_size": _POS_INT, "num_hidden_layers": _POS_INT, "num_attention_heads": _POS_INT,
    "intermediate_size": _POS_INT, "patch_size": _POS_INT, "image_size": _POS_INT, "num_channels": _POS_INT,
    "layer_norm_eps": _POS_NUM, "norm_type": _STR, "hidden_act": _STR, "qkv_bias": _BOOL,
    "qk_normalization": _BOOL, "attention_bias": _BOOL, "use_qk_norm": _BOOL,
}
TEXT_KEYS = {
    "hidden_size": _POS_INT, "num_hidden_layers": _POS_INT, "num_attention_heads": _POS_INT,
    "num_key_value_heads": _POS_INT, "intermediate_size": _POS_INT, "vocab_size": _POS_INT,
    "max_position_embeddings": _POS_INT, "head_dim": _POS_INT, "rms_norm_eps": _POS_NUM, "rope_theta": _POS_NUM,
    "tie_word_embeddings": _BOOL, "num_experts": _POS_INT, "num_experts_per_tok": _POS_INT,
    "moe_intermediate_size": _POS_INT, "model_type": _STR, "rope_scaling": _DICT, "rope_parameters": _DICT,
}
NULLABLE_TOP = ("template", "system_message", "image_token_id", "image_token_index", "force_image_size")
REQUIRED_TEXT = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUPS = (32, 64, 128)


def _check_value(where: str, key: str, kind: str, value, nullable: bool) -> None:
    name = f"{where}: key {key!r}"
    if value is None and nullable:
        return
    if kind == _POS_INT:
        if key in ("image_size", "patch_size") and isinstance(value, list) and value:
            for i, v in enumerate(value):
                integer(f"{name}[{i}]", v, minimum=1)
            return
        integer(name, value, minimum=1)
    elif kind == _INT:
        integer(name, value)
    elif kind == _POS_NUM:
        number(name, value, minimum=0.0, min_open=True)
    elif kind == _RATIO:
        number(name, value, minimum=0.0, maximum=1.0, min_open=True)
    elif kind == _BOOL:
        if not isinstance(value, bool):
            raise UserError(f"{name}: expected true or false, got {_fmt(value)} ({type(value).__name__})")
    elif kind == _DICT:
        if not isinstance(value, dict):
            raise UserError(f"{name}: expected a JSON object or null, got {_fmt(value)} ({type(value).__name__})")
    elif kind == _STR:
        if not isinstance(value, str):
            raise UserError(f"{name}: expected a string, got {_fmt(value)} ({type(value).__name__})")


def _check_section(where: str, section, spec: dict, required=(), nullable=()) -> None:
    if not isinstance(section, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(section).__name__}")
    for key in required:
        if key not in section:
            raise UserError(f"{where}: missing key {key!r} (expected a positive integer)")
    for key, kind in spec.items():
        if key in section:
            _check_value(where, key, kind, section[key], nullable=key in nullable)


def check_quantization(quant, where: str) -> None:
    """A `quantization` block as mlx-lm writes it: group_size, bits, optional mode, per-layer overrides."""
    if quant is None:
        return
    if not isinstance(quant, dict):
        raise UserError(f"{where}: expected a JSON object with 'group_size' and 'bits', got {type(quant).__name__}")
    for key in ("group_size", "bits"):
        if key not in quant:
            raise UserError(f"{where}: missing key {key!r}; a quantized model's config has both 'group_size' and "
                            "'bits' (convert the model again)")
    choice(f"{where}: key 'group_size'", quant["group_size"], QUANT_GROUPS)
    choice(f"{where}: key 'bits'", quant["bits"], QUANT_BITS)
    for key, value in quant.items():
        if isinstance(value, dict):
            check_quantization(value, f"{where}.{key}")


def check_config_json(raw, path: str = "config.json", fmt: Optional[str] = None) -> None:
    """The structure and value types of a config.json dict (original, -hf or converted MLX layout)."""
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object ({{...}}) at the top level, got {type(raw).__name__}")
    text_key = "llm_config" if "llm_config" in raw or fmt in ("original", "mlx") else "text_config"
    for key, kind in TOP_KEYS.items():
        if key in raw:
            _check_value(path, key, kind, raw[key], nullable=key in NULLABLE_TOP)
    if "vision_config" in raw:
        _check_section(f"{path}: vision_config", raw["vision_config"], VISION_KEYS)
    if text_key in raw:
        _check_section(f"{path}: {text_key}", raw[text_key], TEXT_KEYS, required=REQUIRED_TEXT,
                       nullable=("num_key_value_heads", "head_dim", "rope_theta", "max_position_embeddings",
                                 "rope_scaling", "rope_parameters"))
        text = raw[text_key]
        heads, kv = text["num_attention_heads"], text.get("num_key_value_heads")
        if kv is not None and heads % kv:
            raise UserError(f"{path}: {text_key}: num_attention_heads {heads} is not a multiple of "
                            f"num_key_value_heads {kv}")
        if text.get("head_dim") is None and text["hidden_size"] % heads:
            raise UserError(f"{path}: {text_key}: hidden_size {text['hidden_size']} is not divisible by "
                            f"num_attention_heads {heads} (and no head_dim is given)")
    if "quantization" in raw:
        check_quantization(raw["quantization"], f"{path}: quantization")


# rope_scaling types a language model config may name, and the keys each needs.
ROPE_KINDS = {
    "default": (), "linear": ("factor",), "dynamic": ("factor",), "llama3": ("factor",), "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "su": ("short_factor", "long_factor", "original_max_position_embeddings"), "mrope": ("mrope_section",),
}
_ROPE_LISTS = ("short_factor", "long_factor", "mrope_section")


def rope_scaling(llm_config: dict) -> None:
    """A clear error for a normalized `rope_scaling` this port cannot run (an unknown type, a missing or bad key,
    longrope factors of the wrong length)."""
    rs = llm_config.get("rope_scaling") or {}
    kind = rs.get("type") or rs.get("rope_type") or "default"
    where = f"the language model's rope_scaling (type {kind!r})"
    if kind not in ROPE_KINDS:
        raise UserError(f"{where} is not supported; supported types: {', '.join(ROPE_KINDS)}.")
    for key in ROPE_KINDS[kind]:
        value = rs.get(key)
        if key in _ROPE_LISTS:
            if not isinstance(value, list):
                raise UserError(f"{where} needs a list {key!r}, got {value!r}.")
        elif not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise UserError(f"{where} needs a positive number {key!r}, got {value!r}.")
    if kind in ("longrope", "su"):
        head_dim = llm_config.get("head_dim") or llm_config["hidden_size"] // llm_config["num_attention_heads"]
        half = int(head_dim * llm_config.get("partial_rotary_factor", 1.0)) // 2
        for key in ("short_factor", "long_factor"):
            if len(rs[key]) != half:
                raise UserError(f"{where}: {key!r} has {len(rs[key])} values, but the rotary dimension needs "
                                f"{half} (half of {2 * half}).")


@contextmanager
def naming(path) -> Iterator[None]:
    """Prefix a config error with the file it came from, when the message does not name it already."""
    try:
        yield
    except UserError as e:
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from e


# --- conversations ----------------------------------------------------------------------------------------------

RESERVED = ("<IMG_CONTEXT>", "<img>", "</img>")


def conversation(question, history=None, system_message=None) -> None:
    """A question (str), a history of (question, answer) string pairs, and a system message (str or None).
    The image-token markers are reserved: typed into the text they would take image features that do not exist."""
    if not isinstance(question, str):
        raise UserError(f"the question/prompt: expected a string, got {_fmt(question)} ({type(question).__name__})")
    _reserved("the question/prompt", question)
    if history is not None:
        if not isinstance(history, (list, tuple)):
            raise UserError(f"history: expected a list of (question, answer) pairs, got {type(history).__name__}")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise UserError(f"history[{i}]: expected a (question, answer) pair of strings, got {_fmt(pair)}")
            _reserved(f"history[{i}]", pair[0] + pair[1])
    if system_message is not None and not isinstance(system_message, str):
        raise UserError(f"system_message: expected a string or None, got {_fmt(system_message)} "
                        f"({type(system_message).__name__})")
    if system_message is not None:
        _reserved("system_message", system_message)


def _reserved(name: str, text: str) -> None:
    for marker in RESERVED:
        if marker in text:
            raise UserError(f"{name} contains the reserved token {marker}; write <image> where an image goes")


# --- LoRA training ----------------------------------------------------------------------------------------------

def check_training_args(args) -> None:
    """`TrainingArgs` (the `lora` command's options), each named by its flag."""
    integer("--batch-size", args.batch_size, minimum=1, maximum=COUNT_MAX)
    integer("--grad-accum", args.grad_accum, minimum=1, maximum=COUNT_MAX)
    number("--lr", args.lr, minimum=0.0, min_open=True, fix="e.g. 1e-4")
    number("--min-lr", args.min_lr, minimum=0.0)
    if args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr} is above --lr {args.lr}; the cosine decay goes from --lr down to "
                        "--min-lr")
    integer("--warmup", args.warmup, minimum=0, maximum=COUNT_MAX)
    number("--weight-decay", args.weight_decay, minimum=0.0)
    integer("--iters", args.iters, minimum=1, maximum=COUNT_MAX, allow_none=True)
    number("--epochs", args.epochs, minimum=0.0, min_open=True, allow_none=True)
    integer("--max-length", args.max_length, minimum=2, maximum=COUNT_MAX)
    integer("--max-tiles", args.max_tiles, minimum=1, maximum=COUNT_MAX, allow_none=True,
            fix="leave it out for the checkpoint's max_dynamic_patch")
    integer("--val-every", args.val_every, minimum=0, maximum=COUNT_MAX,
            fix="0 validates only at the start and the end")
    integer("--val-batches", args.val_batches, minimum=-1, maximum=COUNT_MAX, fix="-1 is the whole validation set")
    if args.val_batches == 0:
        raise UserError("--val-batches: expected -1 (all) or a count >= 1, got 0")
    integer("--save-every", args.save_every, minimum=1, maximum=COUNT_MAX,
            fix="checkpoints are also written at the last step")
    integer("--report-every", args.report_every, minimum=1, maximum=COUNT_MAX)
    integer("--keep-checkpoints", args.keep_checkpoints, minimum=0, maximum=COUNT_MAX, fix="0 keeps all")
    integer("--seed", args.seed, minimum=0, maximum=TRAIN_SEED_MAX)
    number("--flash-percentile", getattr(args, "flash_percentile", 50.0), minimum=0.0, maximum=100.0)
    integer("--flash-window", getattr(args, "flash_window", 1), minimum=1, maximum=FLASH_WINDOW_MAX,
            fix="the window is kept in the optimizer state and in every checkpoint")
    for name in ("grad_checkpoint", "compile", "skip_bad", "bias_correction"):
        if not isinstance(getattr(args, name, False), bool):
            raise UserError(f"{name}: expected True or False, got {getattr(args, name)!r}")
