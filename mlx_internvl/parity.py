"""Stage-by-stage comparison of the MLX model with the torch reference (the library behind `mlx-internvl parity`).

Both sides produce the same named stages from the same processor outputs:
vision_features `[P, 1+N, C]` (ViT hidden state at the selected layer, CLS first), image_features `[P, n, D]`
(after pixel shuffle + mlp1), inputs_embeds `[B, L, D]` (image rows merged), logits `[B, L, V]`, and a fixed number
of greedy steps (no early stop, each side with its own KV cache): greedy_tokens `[B, n]` and decode_logits
`[B, n, V]`, the logits each token was picked from.

For an InternVL3.5-Flash checkpoint with its router on, both sides add the router's stages per tile (reference: the
checkpoint's own remote code, `reference/flash.py`): router_pooled `[P, C]` (pooling_before_gating), router_p0
`[P]` (the gate's probability that the tile is simple), router_low `[P, 64, D]` (mlp2), router_full `[P, 256, D]`
(mlp1), router_decisions `[P]` and router_ids `[L']` (compared exactly), router_logits `[1, L', V]` (the routed
prompt's logits).

Because the torch side may need a CUDA/NPU box and the MLX side a Mac, the work splits in two halves:
`dump_reference` (torch; writes the processor inputs and the reference stages to one .npz) and `compare_dump`
(MLX; reads the inputs from that file). `run_parity` does both in one process.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import mlx.core as mx
import mlx_lm
import numpy as np

from .config import config_from_hf
from .errors import UserError
from .files import atomic_write, atomic_write_text, check_writable_dir, output_errors
from .hub import local_or_download
from .loading import load_model, resolve_model_path
from .processing import Processor
from .weights import read_config

STAGES = ("vision_features", "image_features", "inputs_embeds", "logits", "decode_logits",
          "router_pooled", "router_p0", "router_low", "router_full", "router_logits")
EXACT = ("router_decisions", "router_ids")  # compared value for value, reported apart from the tensors


def greedy_tokens(model, input_ids: mx.array, pixel_values: Optional[mx.array], n: int):
    """Greedy decoding with mlx-lm's KV cache (prefill from merged embeddings), exactly `n` steps.

    Returns tokens `[B, n]` and the logits each token was picked from, `[B, n, V]` (float32).
    """
    cache = model.make_cache()
    logits = model(input_ids, pixel_values=pixel_values, cache=cache)
    tokens, steps = [], []
    for i in range(n):
        if i:
            logits = model(tokens[-1][:, None], cache=cache)
        last = logits[:, -1].astype(mx.float32)
        steps.append(last)
        tokens.append(mx.argmax(last, axis=-1))
    return np.array(mx.stack(tokens, axis=1)), np.array(mx.stack(steps, axis=1))


def mlx_stages(model, input_ids: mx.array, pixel_values: Optional[mx.array],
               max_new_tokens: int = 16) -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    feats = None
    if pixel_values is not None:
        vit = model.vision_features(pixel_values)
        patch = model.config.vision_config.patch_size
        feats = model.project_features(vit, (pixel_values.shape[1] // patch, pixel_values.shape[2] // patch))
        out["vision_features"] = np.array(vit.astype(mx.float32))
        out["image_features"] = np.array(feats.astype(mx.float32))
    embeds = model.get_input_embeddings(input_ids, image_features=feats)
    out["inputs_embeds"] = np.array(embeds.astype(mx.float32))
    out["logits"] = np.array(model(input_ids, input_embeddings=embeds).astype(mx.float32))
    if max_new_tokens:
        out["greedy_tokens"], out["decode_logits"] = greedy_tokens(model, input_ids, pixel_values, max_new_tokens)
    if pixel_values is not None and input_ids.shape[0] == 1 and model.use_flash():
        out.update(mlx_router_stages(model, input_ids, pixel_values))
    return out


def mlx_router_stages(model, input_ids: mx.array, pixel_values: mx.array) -> Dict[str, np.ndarray]:
    """The Flash router's stages of one request (`input_ids` `[1, L]`), as `model.encode_request` routes it."""
    tiles, pooled = model.flash_stages(pixel_values)
    enc = model.route_tiles(np.array(input_ids)[0].tolist(), tiles)
    logits = model(mx.array(enc.ids)[None], image_features=enc.features)
    f32 = lambda a: np.array(a.astype(mx.float32))  # noqa: E731
    return {"router_pooled": f32(pooled), "router_p0": tiles.p0, "router_low": f32(tiles.low),
            "router_full": f32(tiles.full), "router_decisions": np.asarray(enc.compress, dtype=bool),
            "router_ids": np.array(enc.ids, dtype=np.int64), "router_logits": f32(logits)}


def compare_exact(ref: np.ndarray, got: np.ndarray, whole: bool = False) -> dict:
    """Two integer or boolean sequences: identical or not, their lengths, the first index where they part, and
    with `whole` both sequences."""
    a, b = np.asarray(ref).reshape(-1).astype(np.int64), np.asarray(got).reshape(-1).astype(np.int64)
    n = min(a.size, b.size)
    bad = np.flatnonzero(a[:n] != b[:n])
    first = int(bad[0]) if bad.size else (None if a.size == b.size else n)
    row = {"identical": first is None, "length_ref": int(a.size), "length_mlx": int(b.size), "first_mismatch": first}
    if whole:
        row.update(reference=a.tolist(), mlx=b.tolist())
    return row


def compare(reference: Dict[str, np.ndarray], ours: Dict[str, np.ndarray]) -> dict:
    """Per stage: shape, max-abs error, relative error (max-abs / max |reference|); tokens: agreement."""
    report = {}
    for name in STAGES:
        if name not in reference or name not in ours:
            continue
        ref, got = np.asarray(reference[name], np.float64), np.asarray(ours[name], np.float64)
        if ref.shape != got.shape:
            report[name] = {"shape_ref": list(ref.shape), "shape_mlx": list(got.shape), "error": "shape mismatch"}
            continue
        err = float(np.abs(ref - got).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        report[name] = {"shape": list(ref.shape), "max_abs": err, "rel": err / scale if scale else err,
                        "ref_max_abs_value": scale}
    if "greedy_tokens" in reference and "greedy_tokens" in ours:
        a, b = np.atleast_2d(reference["greedy_tokens"]), np.atleast_2d(ours["greedy_tokens"])
        steps = min(a.shape[1], b.shape[1])
        if a.shape[0] != b.shape[0]:
            report["greedy_tokens"] = {"error": f"batch mismatch: {a.shape[0]} vs {b.shape[0]}"}
            return report
        same = a[:, :steps] == b[:, :steps]
        bad = np.flatnonzero(~same.all(axis=0))
        report["greedy_tokens"] = {"n": int(same.size), "agree": int(same.sum()),
                                   "first_mismatch": int(bad[0]) if bad.size else None,
                                   "reference": a.tolist(), "mlx": b.tolist()}
    for name in EXACT:
        if name in reference and name in ours:
            report[name] = compare_exact(reference[name], ours[name], whole=name == "router_decisions")
    return report


# ---- the parity harness: inputs, the two halves, the report ----

def prepare_inputs(model_path: Union[str, Path], images: Sequence[Union[str, Path]], prompt: str,
                   max_tiles: Optional[int] = None) -> dict:
    """The processor's output for one request, as numpy: input_ids `[1, L]`, pixel_values `[P, S, S, 3]` or None,
    plus num_tiles, the prompt text and the `<IMG_CONTEXT>` id. Works for HF directories of either layout and for
    converted MLX directories."""
    path = Path(model_path)
    raw, _ = read_config(path)
    config = config_from_hf(raw, str(path / "config.json"))
    processor = Processor.from_pretrained(path, config)
    out = processor(prompt, images=list(images) or None, max_tiles=max_tiles)
    pixels = out["pixel_values"]
    return {
        "input_ids": np.array(out["input_ids"], dtype=np.int32),
        "pixel_values": None if pixels is None else np.array(pixels, dtype=np.float32),
        "num_tiles": list(out["num_tiles"]),
        "prompt": out["prompt"],
        "image_token_id": int(processor.image_token_id),
    }


def reference_stages(model_path: Union[str, Path], inputs: dict, device: Optional[str] = None,
                     dtype: str = "float32", tokens: int = 16, trust_remote_code: bool = False) -> tuple:
    """The torch side: transformers' InternVL on `device`, every stage; for a Flash checkpoint with its router on,
    then the router's stages from the checkpoint's own remote code (run only with `trust_remote_code`).
    Returns (stages, info)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise UserError("the torch side of parity needs torch and transformers: "
                        "pip install 'mlx-internvl[torch]'") from e
    from .reference import ReferenceModel
    from .reference.flash import is_flash

    path = Path(model_path)
    raw, _ = read_config(path)
    router = is_flash(raw) and inputs["pixel_values"] is not None
    if router:
        check_router_reference(path, raw, trust_remote_code)
    ref = ReferenceModel.from_pretrained(path, device=device, dtype=dtype, image_token_id=inputs["image_token_id"])
    stages = ref.run_stages(inputs["input_ids"], inputs["pixel_values"], tokens)
    info = {"device": ref.device, "dtype": dtype, "torch": torch.__version__,
            "transformers": transformers.__version__, "ps_version": ref.ps_version}
    if router:
        del ref  # one torch model at a time: the remote-code model holds a second copy of the weights
        stages.update(reference_router_stages(path, inputs, info["device"], dtype))
        info["router"] = f"{raw['auto_map']['AutoModel']} (the checkpoint's remote code)"
    return stages, info


def check_router_reference(path: Path, raw: dict, trust_remote_code: bool) -> None:
    """Before any model loads: the router's reference is the checkpoint's code, which runs only when asked to."""
    from .reference.flash import check_remote_code

    if not trust_remote_code:
        raise UserError(f"{path}: an InternVL3.5-Flash checkpoint with its router on; the router's only torch "
                        "reference is the checkpoint's own modeling_internvl_chat.py. Read that code, then pass "
                        "--trust-remote-code (trust_remote_code=True) to run it")
    check_remote_code(path, raw)


def reference_router_stages(path: Path, inputs: dict, device: str, dtype: str) -> dict:
    from .reference.flash import load_flash_reference, router_stages

    gc.collect()
    model = load_flash_reference(path, device, dtype)
    return router_stages(model, inputs["input_ids"], inputs["pixel_values"], inputs["image_token_id"])


def mlx_side(model_path: Union[str, Path], inputs: dict, dtype: Optional[str] = "float32", tokens: int = 16,
             router: bool = False) -> dict:
    """The MLX side: load (HF directories are converted in memory) and run every stage on the given inputs;
    `router`: the reference has the Flash router's stages, so this model must route too."""
    model, _ = load_model(model_path, dtype=dtype)
    if model.image_token_id != inputs["image_token_id"]:
        raise UserError(f"{model_path}: its <IMG_CONTEXT> id is {model.image_token_id}, the inputs use "
                        f"{inputs['image_token_id']}; compare models that share a tokenizer")
    if router and not model.use_flash():
        raise UserError(f"the reference stages hold an InternVL3.5-Flash router's, but {model_path} runs no router "
                        "(no Flash checkpoint, or its flash_mode is false); compare the checkpoint they are of")
    pixels = inputs.get("pixel_values")
    return mlx_stages(model, mx.array(inputs["input_ids"]), None if pixels is None else mx.array(pixels), tokens)


def _versions() -> dict:
    return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}


def build_report(model_path, inputs: dict, ref: dict, ours: dict, ref_info: dict, mlx_dtype) -> dict:
    stages = compare(ref, ours)
    apart = ("greedy_tokens",) + EXACT
    return {
        "model": str(model_path),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "num_tiles": [int(n) for n in inputs["num_tiles"]],
        "reference": ref_info,
        "mlx": dict(_versions(), dtype=mlx_dtype),
        "stages": {k: v for k, v in stages.items() if k not in apart},
        "greedy_tokens": stages.get("greedy_tokens"),
        "router": {k[len("router_"):]: stages[k] for k in EXACT if k in stages} or None,
    }


def run_parity(model_path, images: Sequence = (), prompt: str = "Describe the image.", device: Optional[str] = None,
               dtype: str = "float32", max_tiles: Optional[int] = None, tokens: int = 16,
               trust_remote_code: bool = False) -> dict:
    """Both sides in this process: processor inputs, torch stages, MLX stages, and their comparison."""
    path = local_or_download(model_path)
    inputs = prepare_inputs(path, images, prompt, max_tiles)
    ref, info = reference_stages(path, inputs, device, dtype, tokens, trust_remote_code)
    ours = mlx_side(path, inputs, dtype, tokens, router="router_p0" in ref)
    return build_report(path, inputs, ref, ours, info, dtype)


def dump_reference(model_path, out: Union[str, Path], images: Sequence = (), prompt: str = "Describe the image.",
                   device: Optional[str] = None, dtype: str = "float32", max_tiles: Optional[int] = None,
                   tokens: int = 16, trust_remote_code: bool = False) -> Path:
    """The torch half: write the processor inputs and every reference stage to `out` (.npz, no pickles), in one
    rename once complete: a failed write (a full disk) is one `UserError` and leaves no partial file."""
    out = Path(out)
    check_writable_dir(out.parent, "--out directory")  # before the reference model runs
    path = local_or_download(model_path)
    inputs = prepare_inputs(path, images, prompt, max_tiles)
    stages, info = reference_stages(path, inputs, device, dtype, tokens, trust_remote_code)
    meta = dict(info, model=str(path), prompt=inputs["prompt"], num_tiles=inputs["num_tiles"],
                image_token_id=inputs["image_token_id"], tokens=tokens)
    arrays = {"input_ids": inputs["input_ids"], "meta": np.array(json.dumps(meta))}
    if inputs["pixel_values"] is not None:
        arrays["pixel_values"] = inputs["pixel_values"]
    arrays.update({f"ref_{k}": v for k, v in stages.items()})

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez adds no suffix to it
            np.savez(f, **arrays)  # uncompressed: float noise hardly compresses and zlib is slow on large logits

    with output_errors(out, "stages file"):
        out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write, "stages file")
    return out


def read_dump(path: Union[str, Path]) -> tuple:
    """(inputs, reference stages, meta) from a file written by `dump_reference`."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        meta = json.loads(str(data["meta"]))
        inputs = {"input_ids": data["input_ids"],
                  "pixel_values": data["pixel_values"] if "pixel_values" in data else None,
                  "num_tiles": meta["num_tiles"], "image_token_id": meta["image_token_id"]}
        ref = {k[len("ref_"):]: data[k] for k in data.files if k.startswith("ref_")}
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; write it with `mlx-internvl parity dump`") from None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a stages file written by `mlx-internvl parity dump` ({e})") from e
    return inputs, ref, meta


def compare_dump(model_path, dump: Union[str, Path], dtype: Optional[str] = None) -> dict:
    """The MLX half: run the model on the inputs stored in `dump` and compare with its reference stages.
    `dtype` defaults to the one the reference ran in."""
    path = resolve_model_path(model_path)
    inputs, ref, meta = read_dump(dump)
    dtype = dtype or meta.get("dtype", "float32")
    ours = mlx_side(path, inputs, dtype, int(meta.get("tokens", 16)), router="router_p0" in ref)
    keep = ("device", "dtype", "torch", "transformers", "ps_version", "model", "router")
    info = {k: meta[k] for k in keep if k in meta}
    return build_report(path, inputs, ref, ours, info, dtype)


def format_report(report: dict) -> str:
    """The report as a small text table: per stage max-abs and relative error, then greedy-token agreement and
    (Flash) the router's decisions and prompt ids."""
    ref, ours = report["reference"], report["mlx"]
    lines = [
        f"model: {report['model']}",
        f"reference: torch {ref.get('torch')} / transformers {ref.get('transformers')} on {ref.get('device')} "
        f"({ref.get('dtype')}); mlx {ours['mlx']} / mlx-lm {ours['mlx_lm']} ({ours['dtype']})",
        f"prompt: {report['prompt_tokens']} tokens, tiles per image: {report['num_tiles'] or 'no image'}",
    ]
    if ref.get("router"):
        lines.append(f"router reference: {ref['router']}")
    lines += [
        "",
        f"{'stage':<16} {'shape':<18} {'max-abs':>10} {'relative':>10}",
    ]
    for name, row in report["stages"].items():
        if "error" in row:
            lines.append(f"{name:<16} {row['error']}: reference {row['shape_ref']}, mlx {row['shape_mlx']}")
            continue
        shape = "x".join(str(d) for d in row["shape"])
        lines.append(f"{name:<16} {shape:<18} {row['max_abs']:>10.2e} {row['rel']:>10.2e}")
    tok = report.get("greedy_tokens")
    if tok and "error" not in tok:
        first = "none" if tok["first_mismatch"] is None else f"step {tok['first_mismatch']}"
        lines += ["", f"greedy tokens: {tok['agree']}/{tok['n']} identical (first mismatch: {first})"]
    elif tok:
        lines += ["", f"greedy tokens: {tok['error']}"]
    return "\n".join(lines + format_router(report.get("router")))


def format_router(router: Optional[dict]) -> list:
    """The router's exact stages: per-tile decisions (1: compressed) and the compressed prompt ids."""
    if not router:
        return []
    lines = [""]
    dec, ids = router.get("decisions"), router.get("ids")
    if dec:
        marks = " ".join(map(str, dec.get("reference", [])))
        if dec["identical"]:
            lines.append(f"router decisions: identical, {sum(dec.get('reference', []))}/{dec['length_ref']} tiles "
                         f"compressed ({marks})")
        else:
            lines.append(f"router decisions: DIFFER from tile {dec['first_mismatch']} (reference {marks}; "
                         f"mlx {' '.join(map(str, dec.get('mlx', [])))})")
    if ids:
        if ids["identical"]:
            lines.append(f"router prompt ids: identical ({ids['length_ref']} ids)")
        else:
            lines.append(f"router prompt ids: DIFFER from position {ids['first_mismatch']} (reference "
                         f"{ids['length_ref']} ids, mlx {ids['length_mlx']})")
    return lines


def write_json(report: dict, path: Union[str, Path]) -> None:
    atomic_write_text(path, json.dumps(report, indent=2), "parity report")
