"""How one InternVL is split across a `distributed.Group`: the language model tensor-parallel through mlx-lm's own
`Model.shard()` (Qwen2/2.5, Qwen3, Qwen3-MoE, Llama, InternLM2-as-Llama and GPT-OSS) or pipelined through its
`pipeline()`, the vision encoder on rank 0 only.

`shard()` splits every decoder layer's q/k/v/gate/up projections by output rows and o/down by input columns, one
all-reduce after each of those two; embeddings, norms, MoE routers and the head stay whole on every rank. Experts
keep their number: each rank holds every expert's slice of the hidden width (GPT-OSS's attention sinks go with
their heads). LoRA layers are split the same way (their factors cut like their base). The vision encoder runs on
rank 0 only and its image features are handed to the other ranks with one all-reduce per request: a ViT runs once
per image, not per token, so sharding it would save no decode time, and InternViT-6B's 25 heads and whole-width
qk-norm do not split with `shard_linear`.
A Flash checkpoint's router (`pooling_before_gating`, `gating`) and `mlp2` stay on rank 0 too: it routes the tiles
and hands the other ranks the routed image rows and its per-tile decisions (from which each rank cuts its own copy
of the prompt ids) with the same one all-reduce. The other ranks never read the vision or router weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

from . import wire
from .backbones import backbone_module
from .cache import human_size
from .distributed import Group, settle
from .errors import UserError
from .flash import FlashTiles, compress_ids
from .loading import load as load_whole
from .loading import resolve_model_path
from .model import EncodedRequest, InternVLChatModel
from .validate import QUANT_GROUPS

logger = logging.getLogger("mlx_internvl")
SHARDABLE = ("qwen2", "qwen3", "qwen3_moe", "llama", "gpt_oss")
PARALLEL_ENV = "MLX_INTERNVL_PARALLEL"  # "tensor" (default) or "pipeline"
RANK0_FLASH = ("pooling_before_gating", "gating", "mlp2")  # the Flash modules only rank 0 holds


def check_shardable(config, size: int, where: str = "config.json", mode: str = "tensor") -> None:
    """A `UserError` unless mlx-lm can split this language model over `size` ranks (`mode` tensor or pipeline)."""
    llm = config.llm_config
    mt = llm["model_type"]
    if mode == "pipeline":
        if not hasattr(backbone_module(mt), "PipelineMixin"):
            raise UserError(f"{where}: mlx-lm's {mt} model has no pipeline split (qwen2 and qwen3_moe have one); "
                            f"unset {PARALLEL_ENV} to split it tensor-parallel instead.")
        if llm["num_hidden_layers"] < size:
            raise UserError(f"{where}: {llm['num_hidden_layers']} decoder layers cannot make {size} pipeline stages")
        return
    if mode != "tensor":
        raise UserError(f"{PARALLEL_ENV}={mode!r}: expected 'tensor' or 'pipeline'")
    if mt not in SHARDABLE:
        why = ("mlx-internvl does not split it yet" if hasattr(backbone_module(mt).Model, "shard")
               else f"mlx-lm's {mt} model has no tensor-parallel shard()")
        raise UserError(
            f"{where}: the language model is {mt!r}, and {why}; distributed runs support {', '.join(SHARDABLE)} "
            "(InternLM2 runs as llama). Run this model in one process (without mlx.launch)."
        )
    dims, widths = _split_dims(llm)
    for name, value in dims.items():
        if value % size:
            ok = [n for n in range(2, value + 1) if value % n == 0 and n <= 16]
            raise UserError(
                f"{where}: llm_config.{name} is {value}, which {size} ranks cannot split evenly "
                f"({_SPLIT[name] if mt != 'gpt_oss' else _SPLIT_GPT_OSS[name]} are divided among the ranks); "
                f"launch a group whose size divides {value} (e.g. {', '.join(map(str, ok[:4])) or 'none'})."
            )
    if config.quantization:
        _check_groups(config.quantization["group_size"], widths, dims, size, where)


_SPLIT = {"num_attention_heads": "the attention heads", "num_key_value_heads": "the key/value heads",
          "intermediate_size": "the MLP's hidden units", "moe_intermediate_size": "each expert's hidden units"}
_SPLIT_GPT_OSS = dict(_SPLIT, num_attention_heads="the attention heads and their sinks",
                      intermediate_size="each expert's hidden units")


def _split_dims(llm: dict):
    """({config key: value} that tensor parallel divides by the rank count, {name: full width} of the layers cut
    by input columns, whose per-rank width must hold whole quantization groups)."""
    heads = llm["num_attention_heads"]
    head_dim = llm.get("head_dim") or llm["hidden_size"] // heads
    dims = {"num_attention_heads": heads, "num_key_value_heads": llm.get("num_key_value_heads") or heads}
    widths = {"o_proj input (heads x head_dim)": heads * head_dim}
    mlps = ["intermediate_size"]
    if llm["model_type"] == "qwen3_moe":
        mlps = ["moe_intermediate_size"] + (["intermediate_size"] if llm.get("mlp_only_layers") else [])
    for key in mlps:
        dims[key] = llm[key]
        widths[f"down_proj input ({key})"] = llm[key]
    return dims, widths


def _check_groups(group_size: int, widths: dict, dims: dict, size: int, where: str) -> None:
    """A `UserError` unless every per-rank width of a layer cut by input columns is whole groups of `group_size`;
    it names the group sizes and rank counts that would work for this checkpoint."""
    per_rank = {name: value // size for name, value in widths.items()}
    bad = [(name, value) for name, value in per_rank.items() if value % group_size]
    if not bad:
        return
    name, value = bad[0]
    groups = [g for g in QUANT_GROUPS if all(v % g == 0 for v in per_rank.values())]
    ranks = [n for n in range(2, 17) if all(d % n == 0 for d in dims.values())
             and all((w // n) % group_size == 0 for w in widths.values())]
    fix = (f"convert the original checkpoint with --q-group-size {' or '.join(map(str, groups))}" if groups else
           f"no quantization group size ({', '.join(map(str, QUANT_GROUPS))}) divides it at {size} ranks")
    fewer = (f"launch {' or '.join(map(str, ranks))} ranks instead" if ranks else
             "no rank count from 2 to 16 works at this group size: run it in one process or unquantized")
    raise UserError(f"{where}: quantization group_size {group_size} does not divide the per-rank {name} = "
                    f"{value} ({size} ranks); {fix}, or {fewer}.")


def shard_model(model, group: Group, mode: str = "tensor") -> None:
    """Split `model`'s language model over `group` (mlx-lm's `shard()`, LoRA layers included, or with
    `mode="pipeline"` its `pipeline()`: consecutive layers per rank); on ranks other than 0, drop the vision encoder
    and projector. Nothing is evaluated: call on a lazily loaded model, then `mx.eval`."""
    lm = model.language_model
    if mode == "pipeline":
        lm.model.pipeline(group.world)
    else:
        _shard_tensor(lm, group)
    if not group.is_leader:
        for name in ("vision_model", "mlp1") + (RANK0_FLASH if model.config.is_flash else ()):
            setattr(model, name, nn.Module())
    model.__class__ = ShardedInternVL
    model.group = group


def _shard_tensor(lm, group: Group) -> None:
    adapters = {}
    for name, m in lm.named_modules():
        if isinstance(m, DoRALinear):
            raise UserError(
                f"the adapter puts a {type(m).__name__} on {name}, which cannot be split across ranks; merge it "
                "into the base first (mlx-internvl fuse) and launch the fused model."
            )
        if isinstance(m, (LoRALinear, LoRASwitchLinear)):
            adapters[name] = m
    # mlx-lm's shard() knows only plain and quantized linear and expert layers: shard the base layer, then
    # re-attach the low-rank factors cut the same way.
    _set_modules(lm, {name: lora.linear for name, lora in adapters.items()})
    rows = {name: lora.linear.weight.shape[-2] for name, lora in adapters.items()}
    lm.shard(group.world)
    sharded = dict(lm.named_modules())
    _set_modules(lm, {name: _shard_lora(lora, sharded[name], group, rows[name]) for name, lora in adapters.items()})


def _set_modules(root: nn.Module, modules: Dict[str, nn.Module]) -> None:
    if modules:
        root.update_modules(tree_unflatten(list(modules.items())))


def _shard_lora(lora, base: nn.Module, group: Group, rows: int):
    """A LoRA layer over the sharded `base` (which had `rows` output rows whole): B cut by output rows where the
    base is cut so, or A by input columns where the base's input is split. A linear layer's partial sums get one
    all-reduce of base + low-rank parts together; an expert layer's are summed by its MoE block, which all-reduces
    its output."""
    n, r = group.size, group.rank
    if isinstance(lora, LoRASwitchLinear):  # factors [E, r, in] and [E, out, r], base cut in place
        lora.linear = base
        if base.weight.shape[-2] != rows:
            lora.lora_b = mx.contiguous(mx.split(lora.lora_b, n, axis=1)[r])
        else:
            lora.lora_a = mx.contiguous(mx.split(lora.lora_a, n, axis=2)[r])
        return lora
    if isinstance(base, (nn.Linear, nn.QuantizedLinear)):  # a layer shard() leaves whole (router, head)
        lora.linear = base
        return lora
    if "AllToSharded" in type(base).__name__:
        lora.linear = base
        lora.lora_b = mx.contiguous(mx.split(lora.lora_b, n, axis=1)[r])
        return lora
    return ShardedToAllLoRA(base, mx.contiguous(mx.split(lora.lora_a, n, axis=0)[r]), lora.lora_b, lora.scale,
                            group.world)


class ShardedToAllLoRA(nn.Module):
    """`base(x) + scale * (x @ A) @ B` for a base whose input is split across ranks: each rank adds its part of both
    terms and one all-reduce sums them, as many collectives as the base layer alone."""

    def __init__(self, base: nn.Module, lora_a: mx.array, lora_b: mx.array, scale: float, group):
        super().__init__()
        self.base = base
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scale = scale
        self._group = group

    def __call__(self, x: mx.array) -> mx.array:
        b = self.base
        if "scales" in b:
            y = mx.quantized_matmul(x, b["weight"], b["scales"], b.get("biases"), transpose=True,
                                    group_size=b.group_size, bits=b.bits, mode=getattr(b, "mode", "affine"))
        else:
            y = x @ b["weight"].T
        z = (x @ self.lora_a) @ self.lora_b
        y = mx.distributed.all_sum(y + (self.scale * z).astype(x.dtype), group=self._group)
        return y + b["bias"] if "bias" in b else y


class ShardedInternVL(InternVLChatModel):
    """The model after `shard_model`: image features (and a Flash model's routed rows and decisions) come from rank
    0, whose vision encoder, router and projectors alone compute them."""

    def extract_feature(self, pixel_values: mx.array) -> mx.array:
        return self._from_leader(super().extract_feature(pixel_values) if self.group.is_leader else None)[0]

    def flash_tiles(self, pixel_values: mx.array) -> FlashTiles:
        """Rank 0: both projections and the scores. The others hold no router: an empty stand-in per tile (the
        server's and chat's caches keep one per image all the same), which `route_tiles` replaces by rank 0's."""
        if self.group.is_leader:
            return super().flash_tiles(pixel_values)
        n = pixel_values.shape[0]
        return FlashTiles(np.zeros(n, np.float32), mx.zeros((n, 0, 0)), mx.zeros((n, 0, 0)))

    def route_tiles(self, ids: Sequence[int], tiles: FlashTiles) -> EncodedRequest:
        """Rank 0 routes; every rank gets its decisions, scores and image rows (one all-reduce) and cuts its own
        `ids` by the decisions."""
        if self.group.is_leader:
            enc = super().route_tiles(ids, tiles)
            enc.features, _ = self._from_leader(enc.features, (enc.compress, enc.p0, tiles.low.shape[1]))
            return enc
        features, (compress, p0, kept) = self._from_leader(None)
        new_ids = compress_ids(ids, self.image_token_id, compress, self.config.num_image_token, kept)
        return EncodedRequest(new_ids, features, compress, p0)

    def _from_leader(self, rows: Optional[mx.array], extra: Any = None) -> Tuple[mx.array, Any]:
        """Rank 0's `rows` and plain values `extra` on every rank: shape, dtype and `extra` shared first, then the
        rows by one all-reduce, evaluated here."""
        group = self.group
        settle()
        # The followers' zeros take the shape and dtype of rank 0's (still lazy) rows, never a weight's: a
        # quantized projector's weight is packed uint32, and an all-reduce of mismatched dtypes is wrong or hangs.
        if group.is_leader:
            group.share((list(rows.shape), wire.dtype_name(rows.dtype), extra))
        else:
            shape, dtype, extra = group.share(None)
            rows = mx.zeros(tuple(shape), dtype=wire.dtype_named(dtype))
        rows = mx.distributed.all_sum(rows, group=group.world)
        # Done here, once per request: nothing else on the followers depends on this all-reduce, and a pipeline
        # stage's receive (which depends on nothing either) must not be scheduled before it.
        mx.eval(rows)
        return rows, extra


def load(group: Group, path_or_repo, dtype=None, adapter_path=None, revision=None, template=None,
         mode: Optional[str] = None):
    """`(model, processor)` with the language model split over `group`: loaded lazily, sharded, then evaluated, so
    each rank holds its share of the decoder layers (and rank 0 the vision encoder), never the whole model.
    `mode`: "tensor" (default) or "pipeline" (default from `MLX_INTERNVL_PARALLEL`)."""
    mode = mode or os.environ.get(PARALLEL_ENV, "tensor")
    # Rank 0 downloads and converts a hub model first, so ranks that share a machine find it in the cache; a rank
    # on another machine fetches its own copy (or reads the same local path there).
    group.on_leader(lambda: str(resolve_model_path(path_or_repo, revision)))
    model, processor = load_whole(path_or_repo, dtype=dtype, adapter_path=adapter_path, lazy=True,
                                  revision=revision, template=template)
    check_shardable(model.config, group.size, str(Path(model.source_path) / "config.json"), mode)
    shard_model(model, group, mode)
    mx.eval(model.parameters())
    group.barrier()
    summary = split_summary(model, group, mode)  # every rank takes part; rank 0 alone logs
    if group.is_leader:
        logger.info("\n".join(summary))
    return model, processor


_FIELDS = ("first layer", "end layer", "heads", "kv heads", "weight bytes", "active bytes", "vision")


def split_summary(model, group: Group, mode: str) -> List[str]:
    """How `model` is split, one line per rank as each rank reports it itself (one all-reduce): the decoder
    layers, attention and KV heads it runs, the bytes of weights it holds and MLX's active memory."""
    lm = model.language_model.model
    layers = [(i, layer) for i, layer in enumerate(lm.layers) if layer is not None]
    attn = layers[0][1].self_attn  # mlx-lm's GPT-OSS names its head counts as the config does
    heads = getattr(attn, "n_heads", None) or getattr(attn, "num_attention_heads", 0)
    kv_heads = getattr(attn, "n_kv_heads", None) or getattr(attn, "num_key_value_heads", 0)
    mine = [layers[0][0], layers[-1][0] + 1, heads, kv_heads,
            sum(v.nbytes for _, v in tree_flatten(model.parameters())), mx.get_active_memory(),
            int(any(True for _ in tree_flatten(model.vision_model.parameters())))]
    table = mx.zeros((group.size, len(_FIELDS)), dtype=mx.int64)
    table[group.rank] = mx.array(mine, dtype=mx.int64)
    rows = mx.distributed.all_sum(table, group=group.world).tolist()
    llm = model.config.llm_config
    heads = llm["num_attention_heads"]
    how = ("tensor parallel (mlx-lm shard(): every layer's heads and MLP split across the ranks)" if mode == "tensor"
           else "pipeline (mlx-lm pipeline(): consecutive decoder layers per rank)")
    lines = [f"Model split over {group.size} ranks, {how}; {heads} attention heads, "
             f"{llm.get('num_key_value_heads') or heads} KV heads, {llm['num_hidden_layers']} decoder layers in all."]
    for rank, (first, end, h, kv, weights, active, vision) in enumerate(rows):
        lines.append(f"  rank {rank}: layers {first}-{end - 1}, {h} heads, {kv} KV heads per layer, "
                     f"{human_size(weights)} of weights{' (vision tower and projector too)' if vision else ''}, "
                     f"{human_size(active)} active")
    return lines
