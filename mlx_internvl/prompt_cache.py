"""Prompt caches on disk: the KV cache of a long image/video prompt, computed once and reused by later requests.

`save_prompt_cache_file` renders a prompt as a request would (template, system message, images or video frames,
tiles), runs it through the model up to the end of the given question text (the user turn is left open), and
writes the KV cache with mlx-lm's `save_prompt_cache` (safetensors, written under a temporary name and renamed).
Each layer keeps its own cache class: GPT-OSS's sliding-window layers are saved and loaded as mlx-lm's
`RotatingKVCache` (holding the window only), so a request from the file rotates them as one without it does.
The metadata records:
- the exact token ids cached, and a SHA-256 of each image's (or frame's) normalised tiles;
- the model's identity: a fingerprint of its weights (the SHA-256 of every byte of the checkpoint's config.json
  and safetensors files, remembered between runs by `digests` so an unchanged checkpoint is not read again, plus
  64 values of each tensor in memory; a model built in memory hashes every byte of its tensors), the compute
  dtype, the quantization, the SHA-256 of the loaded LoRA/DoRA adapter's tensors (or none), and, for the error
  messages, the model's path and revision.

A request reuses the file when its token ids start with the cached ids (and go on by at least one token) and its
first images are the cached ones, pixel for pixel: then only the rest of the prompt is run, and the cached images
are not encoded again. So the usual use is to cache an image (or a video) with an empty or fixed opening text, and
ask any question about it later: `mlx-internvl cache-prompt --image photo.jpg --out photo.safetensors`, then
`mlx-internvl generate --image photo.jpg --prompt "..." --prompt-cache-file photo.safetensors`. A file made by
another model, revision, dtype, quantization or adapter, or a request that does not extend the cached prompt, is
refused with an error that says which.

The file does not store image features: every cached image token is already in the KV cache, and a request that
extends the prefix never needs the features of a cached image again.

With an InternVL3.5-Flash router on, the file caches the prompt as the router shortened it: the token ids are the
compressed ids, and the metadata records the router's decision and score `p0` per cached tile. A request reuses it
only with the router on too (a full-resolution request, `--no-flash`, is refused, and so is a router-on request on
a file made at full resolution), and only when the router, deciding over all the request's tiles (the cached
tiles' scores come from the file, so their ViT is not run again), decides the cached tiles as the file did. (In a
chat, an image added in a later turn can change the cached tiles' decisions; the session then encodes the cached
image again for the tiles it re-decides.)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, RotatingKVCache, load_prompt_cache, save_prompt_cache

from .adapters import adapter_modules
from .digests import checkpoint_digest
from .errors import UserError
from .files import atomic_write
from .flash import select_features

FORMAT = "mlx-internvl-prompt-cache"
VERSION = 2  # 2: the weights fingerprint covers every byte of the checkpoint
SAMPLES_PER_TENSOR = 64
_MARK = "\u2063\u2063MLX-INTERNVL-CACHE-END\u2063\u2063"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


# -- identity ---------------------------------------------------------------------------------------------------

def _sampled(items) -> str:
    """SHA-256 over (name, shape, dtype, 64 values at fixed positions) of each tensor, in name order: catches a
    model changed in memory after loading (another tensor, a dense edit, a quantization) at almost no cost."""
    items = sorted(items, key=lambda kv: kv[0])
    h = hashlib.sha256()
    samples = []
    for _, v in items:
        flat = v.reshape(-1)
        n = flat.size
        idx = mx.array(sorted({(i * n) // SAMPLES_PER_TENSOR for i in range(SAMPLES_PER_TENSOR)} | {n - 1}))
        samples.append(flat[idx])
    mx.eval(samples)
    for (k, v), s in zip(items, samples):
        h.update(f"{k}|{tuple(v.shape)}|{v.dtype}|".encode())
        h.update(np.array(s.view(mx.uint8)).tobytes())
    return h.hexdigest()


def _every_byte(items) -> str:
    """SHA-256 over (name, shape, dtype, every byte) of each tensor, in name order."""
    h = hashlib.sha256()
    for k, v in sorted(items, key=lambda kv: kv[0]):
        h.update(f"{k}|{tuple(v.shape)}|{v.dtype}|".encode())
        h.update(np.asarray(mx.contiguous(v).view(mx.uint8)))
    return h.hexdigest()


def _weights_fingerprint(model, base) -> str:
    """Every byte of the checkpoint files the model was read from (their digests are cached, `digests`) plus the
    sampled fingerprint of the tensors in memory; every byte in memory for a model that has no such files."""
    source = getattr(model, "source_path", None)
    files = checkpoint_digest(Path(source)) if source and Path(source).is_dir() else None
    if files is None:
        return _every_byte(base)[:32]
    return hashlib.sha256(f"{files}|{_sampled(base)}".encode()).hexdigest()[:32]


def model_identity(model) -> dict:
    """What makes a KV cache valid for `model`: weights, dtype, quantization and adapter (see the module doc)."""
    adapters = tuple(name + "." for name, _ in adapter_modules(model))
    base, extra = [], []
    for k, v in tree_flatten(model.parameters()):
        a = next((a for a in adapters if k.startswith(a)), None)
        if a is None:
            base.append((k, v))
        elif k.startswith(a + "linear."):  # the base layer inside an adapter layer, under its own name
            base.append((a + k[len(a) + len("linear."):], v))
        else:
            extra.append((k, v))
    norm = model.language_model.model.norm.weight
    source = str(getattr(model, "source_path", "") or "")
    leaf = Path(source).name if source else ""
    return {
        "weights": _weights_fingerprint(model, base),
        "dtype": str(norm.dtype).replace("mlx.core.", ""),
        "quantization": json.dumps(model.config.quantization or None, sort_keys=True),
        "adapter": _every_byte(extra)[:32] if extra else "none",
        "model": source,
        "revision": leaf if _COMMIT.match(leaf) else "",
    }


def image_hashes(pixel_values, num_tiles: Sequence[int]) -> List[str]:
    """SHA-256 of each image's normalised tiles (`pixel_values` [T, S, S, 3] split by `num_tiles`, or a list of
    per-image arrays)."""
    if pixel_values is None:
        return []
    if isinstance(pixel_values, (list, tuple)):
        parts = [np.asarray(p, dtype=np.float32) for p in pixel_values]
    else:
        arr = np.asarray(pixel_values, dtype=np.float32)
        parts = np.split(arr, np.cumsum(num_tiles)[:-1]) if len(num_tiles) > 1 else [arr]
    return [hashlib.sha256(np.ascontiguousarray(p).tobytes()).hexdigest()[:32] for p in parts]


# -- the file ---------------------------------------------------------------------------------------------------

@dataclass
class PromptCacheFile:
    """A loaded prompt-cache file, checked against the model it will serve. `token_ids` are the cached ids."""

    path: str
    token_ids: List[int]
    image_hashes: List[str]
    num_tiles: List[int]
    identity: dict
    cache: list  # mlx-lm KV caches, never handed out directly (see `fresh_cache`)
    router: Optional[dict] = None  # Flash router on: {"compress": [bool per cached tile], "p0": [float ...]}

    @classmethod
    def load(cls, path: Union[str, Path], model) -> PromptCacheFile:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"{path}: no such prompt-cache file (make one with mlx-internvl cache-prompt)")
        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
        except Exception as e:
            raise UserError(f"{path}: not a readable prompt-cache file ({type(e).__name__}: {e}); make it again "
                            "with mlx-internvl cache-prompt") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{path}: not an mlx-internvl prompt-cache file (metadata 'format' is "
                            f"{(meta or {}).get('format')!r}, expected {FORMAT!r}); make it with "
                            "mlx-internvl cache-prompt")
        if meta.get("version") != str(VERSION):
            raise UserError(f"{path}: prompt-cache format version {meta.get('version')}, this mlx-internvl reads "
                            f"version {VERSION}; make the file again")
        ident = json.loads(meta["identity"])
        check_identity(ident, model_identity(model), str(path))
        if len(cache) != len(model.layers):
            raise UserError(f"{path}: holds {len(cache)} layers, the model has {len(model.layers)}")
        return cls(str(path), json.loads(meta["token_ids"]), json.loads(meta["image_hashes"]),
                   json.loads(meta["num_tiles"]), ident, cache, json.loads(meta.get("router", "null")))

    def fresh_cache(self) -> list:
        """New KV caches holding the cached prompt; generating into them leaves this object unchanged."""
        return [copy_cache(c) for c in self.cache]

    def prefix_length(self, ids: Sequence[int], hashes: Sequence[str]) -> int:
        """The number of cached tokens, after checking that the request (`ids`, its images' `hashes`) extends the
        cached prompt; otherwise a `UserError` that shows where it departs."""
        n = len(self.token_ids)
        ids = list(ids)
        if len(ids) <= n or ids[:n] != self.token_ids:
            at = next((i for i, (a, b) in enumerate(zip(ids, self.token_ids)) if a != b), min(len(ids), n))
            why = (f"it is only {len(ids)} tokens long and the file holds {n}" if ids[:n] == self.token_ids[:len(ids)]
                   else f"it departs at token {at} of {n}")
            raise UserError(f"{self.path}: this request does not extend the cached prompt ({why}). A request can "
                            "reuse the file only if it has the same template, system message, images and tiles, and "
                            "its question starts with the cached text")
        self.check_images(hashes)
        return n

    def check_images(self, hashes: Sequence[str]) -> None:
        """The request's first images (their `hashes`) must be the cached ones, pixel for pixel."""
        cached = len(self.image_hashes)
        if list(hashes[:cached]) != self.image_hashes:
            bad = next((i for i, (a, b) in enumerate(zip(hashes, self.image_hashes)) if a != b), len(hashes)) + 1
            raise UserError(f"{self.path}: image/frame {bad} of this request differs from the one cached (or is "
                            "missing); give the cached image(s), or make a new cache file")

    def check_router(self, on: bool) -> None:
        """Refuse a file whose image tokens were made with the Flash router in the other state than `on`."""
        if not self.image_hashes or on == (self.router is not None):
            return
        made = ("with the Flash router on (its compressed tiles hold 64 tokens)" if self.router
                else "at full resolution (Flash router off)")
        fix = "--flash (flash=True)" if self.router else "--no-flash (flash=False)"
        raise UserError(f"{self.path}: made {made}, but this request runs "
                        f"{'with the router on' if on else 'at full resolution'}; pass {fix}, or make the cache "
                        "again with cache-prompt in the same mode")

    def check_decisions(self, compress: Sequence[bool]) -> None:
        """Refuse the file when the router, deciding over all of a request's tiles (`compress`, the cached tiles
        first), decides the cached tiles otherwise than the file says: its KV would not be this request's."""
        cached = self.router["compress"]
        if [bool(c) for c in compress[:len(cached)]] == cached:
            return

        def marks(cs):
            return " ".join("low" if c else "full" for c in cs)
        raise UserError(f"{self.path}: next to this request's other images the Flash router decides the cached "
                        f"tiles as [{marks(compress[:len(cached)])}], the file holds [{marks(cached)}] (the router "
                        "decides over all the tiles of a request); make a cache file with all these images, or "
                        "pass --no-flash with a cache made with --no-flash")

    def cached_scores(self) -> List[np.ndarray]:
        """Per cached image, the router's score of each of its tiles, as the file recorded them."""
        p0 = np.array(self.router["p0"], dtype=np.float32)
        return np.split(p0, np.cumsum(self.num_tiles)[:-1]) if len(self.num_tiles) > 1 else [p0]


def copy_cache(c):
    """A new cache of `c`'s class holding what later steps read of it, in new arrays (mlx-lm's caches write into
    theirs in place): a KVCache up to its offset; a RotatingKVCache whose prompt, run in one piece, is longer than
    its window, only the `keep` first and the window's last tokens (as its next step would trim it)."""
    if isinstance(c, RotatingKVCache):
        keys, values, offset, keep, size, idx = c.state
        if idx == keys.shape[2] > size:  # still in temporal order, as a multi-token step leaves it
            keys, values = (mx.concatenate([a[..., :keep, :], a[..., a.shape[2] - size + keep:, :]], axis=2)
                            for a in (keys, values))
            idx = size
        return RotatingKVCache.from_state((keys[..., :, :], values[..., :, :], offset, keep, size, idx))
    if not isinstance(c, KVCache):
        raise UserError(f"a prompt-cache file cannot hold mlx-lm's {type(c).__name__}; run without it")
    new = KVCache()
    new.state = (c.keys[..., : c.offset, :], c.values[..., : c.offset, :], c.offset)
    return new


def check_identity(cached: dict, current: dict, where: str) -> None:
    """Refuse a cache made by another model, revision, dtype, quantization or adapter, saying which."""
    def who(ident):
        rev = f" at revision {ident['revision']}" if ident.get("revision") else ""
        return f"{ident.get('model') or 'a model'}{rev}"

    if cached.get("dtype") != current["dtype"]:
        raise UserError(f"{where}: made with dtype {cached.get('dtype')}, the model runs in {current['dtype']}; load "
                        f"it with --dtype {cached.get('dtype')} or make the cache again")
    if cached.get("quantization") != current["quantization"]:
        raise UserError(f"{where}: made with quantization {cached.get('quantization')}, the model has "
                        f"{current['quantization']}; make the cache again with this model")
    if cached.get("weights") != current["weights"]:
        raise UserError(f"{where}: made by another model or revision ({who(cached)}, weights fingerprint "
                        f"{cached.get('weights')}); this is {who(current)} (weights {current['weights']}). Make the "
                        "cache again with this model")
    if cached.get("adapter") != current["adapter"]:
        def ad(x):
            return "no adapter" if x == "none" else f"adapter {x}"
        raise UserError(f"{where}: made with {ad(cached.get('adapter'))}, the model has {ad(current['adapter'])}; "
                        "load the same --adapter or make the cache again")


def as_prompt_cache(value, model) -> PromptCacheFile:
    return value if isinstance(value, PromptCacheFile) else PromptCacheFile.load(value, model)


def cached_prefix(processor, prompt: str, num_tiles: Sequence[int], system_message: Optional[str] = None,
                  num_frames: int = 0) -> List[int]:
    """Token ids of the request for `prompt` up to the end of its text: the user turn left open, so that a
    question which starts with `prompt` extends them."""
    full = processor.render(prompt + _MARK, num_tiles, None, system_message, num_frames).text
    return processor.tokenizer.encode(full[: full.index(_MARK)])


def save_prompt_cache_file(model, processor, out: Union[str, Path], prompt: str = "", images=None, *, video=None,
                           num_frames: int = 8, max_tiles=None, system_message: Optional[str] = None,
                           exif_transpose: bool = False, prefill_step_size: int = 2048,
                           flash: Optional[bool] = None) -> PromptCacheFile:
    """Compute and write the KV cache of the opening of a request (`prompt` with `images`/`video`, as
    `stream_generate` would render it) to `out` (`.safetensors`, written atomically). Returns the file, loaded.
    `flash`: the Flash router (None: the checkpoint's `flash_mode`); requests must use the file in the same mode."""
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: a prompt-cache file must end in .safetensors")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory for the prompt-cache file")
    inputs = processor(prompt, images=images, max_tiles=max_tiles, system_message=system_message, video=video,
                       num_frames=num_frames, exif_transpose=exif_transpose)
    n_frames = 0 if video is None else len(inputs["num_tiles"]) - len(list(images or []))
    ids = cached_prefix(processor, prompt, inputs["num_tiles"], system_message, n_frames)
    full = inputs["input_ids"][0].tolist()
    if full[: len(ids)] != ids:
        raise UserError("the opening of this prompt tokenizes differently on its own than inside the whole prompt; "
                        "end --prompt with a space or a newline")
    features, router = None, None
    if inputs["pixel_values"] is not None:  # the cached opening holds every image token of the request
        enc = model.encode_request(ids, inputs["pixel_values"], flash)
        ids, features = enc.ids, enc.features
        if enc.compress is not None:
            router = {"compress": [bool(c) for c in enc.compress], "p0": [float(p) for p in enc.p0]}
    processor.check_length(len(ids) + 1)
    cache = model.make_cache()
    for _ in model.prefill(ids, features, cache, prefill_step_size):
        pass
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "identity": json.dumps(model_identity(model), sort_keys=True),
        "token_ids": json.dumps(ids),
        "image_hashes": json.dumps(image_hashes(inputs["pixel_values"], inputs["num_tiles"])),
        "num_tiles": json.dumps(list(inputs["num_tiles"])),
        "router": json.dumps(router),
        "prompt": prompt,
    }
    compact = [copy_cache(c) for c in cache]
    mx.eval([c.state for c in compact])
    atomic_write(out, lambda tmp: save_prompt_cache(tmp, compact, meta))
    return PromptCacheFile.load(out, model)


# -- requests ---------------------------------------------------------------------------------------------------

def feature_rows(model, pixel_values, num_tiles: Sequence[int], per_tile: int, start: int, stop: int):
    """Rows [start, stop) of the image features of a request, encoding only the images that overlap them."""
    if pixel_values is None or stop <= start:
        return None
    parts, row, tile = [], 0, 0
    for t in num_tiles:
        n = t * per_tile
        if row + n > start and row < stop:
            feats = model.extract_feature(pixel_values[tile: tile + t]).reshape(n, -1)
            parts.append(feats[max(start - row, 0): stop - row])
        row, tile = row + n, tile + t
    return mx.concatenate(parts) if len(parts) > 1 else parts[0]


def prepare_request(model, processor, ids: List[int], pixel_values, num_tiles: Sequence[int], *, draft=None,
                    prompt_cache_file=None, prefill_step_size: int = 2048) -> Tuple[List[int], object, object, list]:
    """(ids to run, target image features for them, draft image features for them, prompt cache or None) for a
    request, using a prompt-cache file and/or a draft model."""
    image_id = processor.image_token_id
    per_tile = processor.config.num_image_token
    start, cache = 0, None
    if prompt_cache_file is not None:
        pcf = as_prompt_cache(prompt_cache_file, model)
        pcf.check_router(False)
        start = pcf.prefix_length(ids, image_hashes(pixel_values, num_tiles))
        cache = pcf.fresh_cache()
    before = sum(1 for t in ids[:start] if t == image_id)
    total = sum(1 for t in ids if t == image_id)
    feats = feature_rows(model, pixel_values, num_tiles, per_tile, before, total)
    draft_feats = None
    if draft is not None:
        if draft.shares_vision:
            draft_feats = feats
        else:
            draft_feats = feature_rows(draft.model, pixel_values, num_tiles, per_tile, before, total)
        if cache is not None:  # the file holds the target's cache only: run the cached part through the draft
            d_cache = draft.model.make_cache()
            draft.prefill_draft(ids[:start], feature_rows(draft.model if not draft.shares_vision else model,
                                                          pixel_values, num_tiles, per_tile, 0, before),
                                d_cache, prefill_step_size)
            cache = cache + d_cache
    return ids[start:], feats, draft_feats, cache


def prepare_routed_request(model, ids: List[int], pixel_values, num_tiles: Sequence[int], prompt_cache_file):
    """(ids to run, image rows for them, prompt cache, per-tile decisions, per-tile p0) for a request with the Flash
    router on that extends a prompt-cache file made with it on (`ids` rendered with full tiles). The router decides
    over all the request's tiles, the cached ones by their scores in the file, and must decide those as the file
    did (otherwise the cached KV is not this request's)."""
    pcf = as_prompt_cache(prompt_cache_file, model)
    pcf.check_router(True)
    pcf.check_images(image_hashes(pixel_values, num_tiles))
    n_cached = sum(pcf.num_tiles)
    new = model.flash_tiles(pixel_values[n_cached:]) if pixel_values.shape[0] > n_cached else None
    p0 = np.concatenate(pcf.cached_scores() + ([new.p0] if new else []))
    compress, short = model.route_ids(ids, p0)
    pcf.check_decisions(compress)
    start = pcf.prefix_length(short, image_hashes(pixel_values, num_tiles))
    feats = None if new is None else select_features(new, compress[n_cached:])
    return short[start:], feats, pcf.fresh_cache(), compress, p0
