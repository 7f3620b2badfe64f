"""Text generation: one request streamed, several requests batched, and a multi-turn chat session.

Everything after the prompt is mlx-lm's: `generate_step` (chunked prefill, KV cache, `mx.async_eval` of the next
token before the current one is read) runs from the merged text+image embeddings, then decodes text-only;
samplers and logits processors come from `mlx_lm.sample_utils`; batches run through mlx-lm's `BatchGenerator`,
whose `BatchKVCache.merge` left-pads the per-request caches and masks the padding. Each batch member is
prefilled on its own (its image embeddings differ in length), so batching changes only the decode steps.

Generation stops on the template's end token (`<|im_end|>`, `<|end|>`) only, as upstream `chat()`/`batch_chat()`
do; stopping on the tokenizer's eos too is an option (`stop_on_eos`). Special tokens, and ids past the tokenizer's
vocabulary (padded embedding rows), are left out of the text, and the returned text is stripped, as upstream
`chat()` decodes (`skip_special_tokens=True`) and strips its answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx

from .errors import UserError
from .images import ImageInput
from .validate import check_generation, check_sampling, integer

DEFAULT_MAX_TOKENS = 256


@dataclass
class GenerationResponse:
    """One streamed piece of text, with the running statistics (mlx-lm's field names). `prompt_tps` counts the
    time to the first token, image encoding included; `prompt_tokens` are the tokens run in this call."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: Optional[str] = None  # "stop", "length", or None while generating
    num_tiles: List[int] = field(default_factory=list)


@dataclass
class BatchResult:
    texts: List[str]
    token_ids: List[List[int]]
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory: float


def make_sampling(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                  repetition_penalty: Optional[float] = None, repetition_context_size: int = 20,
                  seed: Optional[int] = None):
    """(sampler, logits_processors) from mlx-lm; temperature 0 is greedy. Seeds MLX's generator when `seed` is set."""
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    check_sampling(temperature, top_p, top_k, min_p, repetition_penalty, repetition_context_size, seed)
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0, min_p=min_p, top_k=top_k)
    return sampler, make_logits_processors(repetition_penalty=repetition_penalty,
                                           repetition_context_size=repetition_context_size)


def _clamp_max_tokens(processor, prompt_len: int, max_tokens: int) -> int:
    max_tokens = integer("max_tokens", max_tokens, minimum=1)
    processor.check_length(prompt_len)
    ctx = processor.context_length
    return min(max_tokens, ctx - prompt_len) if ctx else max_tokens


def stream_tokens(model, processor, input_ids: List[int], image_features: Optional[mx.array], *,
                  max_tokens: int, sampler=None, logits_processors=None, prompt_cache=None,
                  prefill_step_size: int = 2048, num_tiles: Sequence[int] = (),
                  on_token: Optional[Callable[[int], None]] = None, kv_bits: Optional[int] = None,
                  kv_group_size: int = 64, quantized_kv_start: int = 0,
                  max_kv_size: Optional[int] = None, stop_on_eos: bool = False,
                  extra_stop_tokens: Sequence = ()) -> Iterator[GenerationResponse]:
    """Stream a reply to `input_ids` (1-D list) whose `<IMG_CONTEXT>` positions take `image_features` rows.

    `prompt_cache` (mlx-lm KV caches) may already hold a prefix of the conversation; then `input_ids` is only the
    part after it. `on_token` sees every token that entered the cache. KV-cache options are mlx-lm's: `kv_bits`
    quantizes the cache once it holds `quantized_kv_start` tokens; `max_kv_size` makes it a rotating cache that
    keeps the first 4 and the last tokens (image tokens in the middle of a long prompt can be evicted).
    Generation stops on the template's end token only, as upstream `chat()`; `stop_on_eos` adds the tokenizer's
    eos, `extra_stop_tokens` more tokens (strings or ids)."""
    from mlx_lm.generate import generate_step, generation_stream, wired_limit
    from mlx_lm.models.cache import make_prompt_cache

    check_generation(max_tokens, prefill_step_size, kv_bits, kv_group_size, max_kv_size)
    if kv_bits is not None:
        llm = model.config.llm_config
        head_dim = llm.get("head_dim") or llm["hidden_size"] // llm["num_attention_heads"]
        if kv_group_size not in (32, 64, 128) or head_dim % kv_group_size:
            raise UserError(f"kv_bits {kv_bits}: the KV cache is quantized in groups of kv_group_size "
                            f"{kv_group_size}, which must be 32, 64 or 128 and divide this model's head size "
                            f"{head_dim}; leave the KV cache unquantized or choose another kv_group_size")
    if max_kv_size is not None and prompt_cache is None:
        prompt_cache = make_prompt_cache(model.language_model, max_kv_size=max_kv_size)

    tokenizer = processor.tokenizer
    stop = processor.stop_token_ids(stop_on_eos, extra_stop_tokens)
    skip = special_token_ids(tokenizer)
    vocab = processor.vocab_ids
    ids = mx.array(input_ids, dtype=mx.int32)
    tic = time.perf_counter()
    embeds = model.get_input_embeddings(ids[None], image_features=image_features)[0]
    steps = generate_step(ids, model, max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
                          prompt_cache=prompt_cache, prefill_step_size=prefill_step_size, input_embeddings=embeds,
                          kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start)
    detok = tokenizer.detokenizer
    detok.reset()
    prompt_tps, n, token = 0.0, 0, None
    finish = "length"
    # On Apple silicon, mlx-lm's wired limit keeps the weights resident while generating.
    with wired_limit(model, [generation_stream]):
        for n, (token, _) in enumerate(steps, start=1):
            if n == 1:
                prompt_tps = len(input_ids) / (time.perf_counter() - tic)
                tic = time.perf_counter()
            if on_token:
                on_token(token)
            if token in stop:
                finish = "stop"
                break
            # An id past the tokenizer (embeddings are often padded) has no text: upstream's decode drops it.
            if token not in skip and token in vocab:
                detok.add_token(token)
            if n == max_tokens:
                break
            yield GenerationResponse(detok.last_segment, token, len(input_ids), prompt_tps, n,
                                     n / (time.perf_counter() - tic), mx.get_peak_memory() / 1e9, None,
                                     list(num_tiles))
    detok.finalize()
    yield GenerationResponse(detok.last_segment, token, len(input_ids), prompt_tps, n,
                             n / max(time.perf_counter() - tic, 1e-9), mx.get_peak_memory() / 1e9, finish,
                             list(num_tiles))


def special_token_ids(tokenizer) -> set:
    """Ids that upstream's `decode(..., skip_special_tokens=True)` leaves out of the reply text."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", 0)}
    return ids


def _features(model, pixel_values: Optional[mx.array]) -> Optional[mx.array]:
    return None if pixel_values is None else model.extract_feature(pixel_values)


def stream_generate(model, processor, prompt: str, images: Optional[Sequence[ImageInput]] = None, *,
                    video=None, num_frames: int = 8, max_tokens: int = DEFAULT_MAX_TOKENS,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    repetition_penalty: Optional[float] = None, seed: Optional[int] = None, max_tiles=None,
                    system_message: Optional[str] = None, history=None, prefill_step_size: int = 2048,
                    exif_transpose: bool = False, inputs: Optional[dict] = None, kv_bits: Optional[int] = None,
                    kv_group_size: int = 64, max_kv_size: Optional[int] = None, stop_on_eos: bool = False,
                    extra_stop_tokens: Sequence = ()) -> Iterator[GenerationResponse]:
    """Stream the reply to `prompt` with `images` (paths, URLs, bytes or PIL images) and/or a `video`, as the
    official `chat()` builds it. Yields `GenerationResponse` pieces; the last has `finish_reason` set.
    `inputs` may be the processor's output for this request, computed beforehand."""
    sampler, processors = make_sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed=seed)
    check_generation(max_tokens, prefill_step_size, kv_bits, kv_group_size, max_kv_size)
    if inputs is None:
        inputs = processor(prompt, images=images, max_tiles=max_tiles, history=history,
                           system_message=system_message, video=video, num_frames=num_frames,
                           exif_transpose=exif_transpose)
    ids = inputs["input_ids"][0].tolist()
    max_tokens = _clamp_max_tokens(processor, len(ids), max_tokens)
    yield from stream_tokens(model, processor, ids, _features(model, inputs["pixel_values"]), max_tokens=max_tokens,
                             sampler=sampler, logits_processors=processors, prefill_step_size=prefill_step_size,
                             num_tiles=inputs["num_tiles"], kv_bits=kv_bits, kv_group_size=kv_group_size,
                             max_kv_size=max_kv_size, stop_on_eos=stop_on_eos,
                             extra_stop_tokens=extra_stop_tokens)


def generate(model, processor, prompt: str, images: Optional[Sequence[ImageInput]] = None, *,
             verbose: bool = False, **kwargs) -> str:
    """The whole reply to `prompt` (see `stream_generate` for the options), stripped as upstream strips it."""
    text, last = "", None
    for last in stream_generate(model, processor, prompt, images, **kwargs):
        if verbose:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose and last is not None:
        print()
        print(format_stats(last))
    return text.strip()


def format_stats(r: GenerationResponse) -> str:
    return (f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tokens-per-sec\n"
            f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tokens-per-sec\n"
            f"Peak memory: {r.peak_memory:.3f} GB")


def batch_generate(model, processor, prompts: Sequence[str], images: Optional[Sequence] = None, *,
                   max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0, top_p: float = 1.0,
                   top_k: int = 0, min_p: float = 0.0, repetition_penalty: Optional[float] = None,
                   seed: Optional[int] = None, max_tiles=None, system_message: Optional[str] = None,
                   prefill_step_size: int = 2048, stop_on_eos: bool = False,
                   extra_stop_tokens: Sequence = ()) -> BatchResult:
    """Replies to several independent requests at once (upstream `batch_chat`): `images[i]` is the list of
    images of `prompts[i]` (or one image, or None). Decoding runs batched with left-padded KV caches."""
    from mlx_lm.generate import BatchGenerator

    images = list(images) if images is not None else [None] * len(prompts)
    if len(images) != len(prompts):
        raise UserError(f"batch_generate got {len(prompts)} prompts but {len(images)} image lists")
    sampler, processors = make_sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed=seed)
    check_generation(max_tokens, prefill_step_size)
    tic = time.perf_counter()
    prompt_ids, caches, limits = [], [], []
    for text, ims in zip(prompts, images):
        ims = [] if ims is None else ([ims] if not isinstance(ims, (list, tuple)) else list(ims))
        inputs = processor(text, images=ims, max_tiles=max_tiles, system_message=system_message)
        ids = inputs["input_ids"][0].tolist()
        limits.append(_clamp_max_tokens(processor, len(ids), max_tokens))
        cache = model.make_cache()
        if len(ids) > 1:
            # Prefill all but the last token; the batch's first decode step feeds the last one.
            for _ in stream_prefill(model, ids[:-1], _features(model, inputs["pixel_values"]), cache,
                                    prefill_step_size):
                pass
        prompt_ids.append(ids)
        caches.append(cache)
    prompt_time = time.perf_counter() - tic
    n_prompt = sum(len(p) for p in prompt_ids)

    eos = sorted(processor.stop_token_ids(stop_on_eos, extra_stop_tokens))
    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in eos], sampler=sampler,
                         logits_processors=processors, completion_batch_size=len(prompts),
                         prefill_batch_size=len(prompts), prefill_step_size=prefill_step_size)
    tic = time.perf_counter()
    try:
        uids = gen.insert([[p[-1]] for p in prompt_ids], max_tokens=limits, caches=caches,
                          all_tokens=[p[:-1] for p in prompt_ids])
        tokens = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":
                    tokens[r.uid].append(r.token)
    finally:
        gen.close()
    gen_time = time.perf_counter() - tic
    out = [tokens[u] for u in uids]
    n_gen = sum(len(t) for t in out)
    texts = [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out]
    return BatchResult(texts, out, n_prompt, n_gen, n_prompt / max(prompt_time, 1e-9),
                       n_gen / max(gen_time, 1e-9), mx.get_peak_memory() / 1e9)


def stream_prefill(model, input_ids: List[int], image_features: Optional[mx.array], cache, step: int = 2048):
    """Run `input_ids` through the model into `cache` in chunks of `step` tokens; yields tokens done so far."""
    ids = mx.array(input_ids, dtype=mx.int32)[None]
    embeds = model.get_input_embeddings(ids, image_features=image_features)
    for start in range(0, ids.shape[1], step):
        model(ids[:, start:start + step], cache=cache, input_embeddings=embeds[:, start:start + step])
        mx.eval([c.state for c in cache])
        yield min(start + step, ids.shape[1])
