"""Text generation: one request streamed, and several requests batched (multi-turn chat is `chat.py`).

Everything after the prompt is mlx-lm's: `generate_step` (chunked prefill, KV cache, `mx.async_eval` of the next
token before the current one is read) runs from the merged text+image embeddings, then decodes text-only;
samplers and logits processors come from `mlx_lm.sample_utils` (through `SamplingOptions`); batches run through
mlx-lm's `BatchGenerator`, whose `BatchKVCache.merge` left-pads the per-request caches and masks the padding. Each
batch member is prefilled on its own (its image embeddings differ in length), so batching changes only the decode
steps.

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
from mlx_lm.generate import BatchGenerator, generate_step, generation_stream, wired_limit

from .errors import UserError
from .flash import describe
from .images import ImageInput
from .prompt_cache import prepare_request, prepare_routed_request
from .sampling import KVOptions, SamplingOptions, split_options
from .structured import constraint
from .thinking import budget_processors, thinking_options
from .validate import integer

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
    router: Optional[str] = None  # the Flash router's decisions, one line (see `flash.describe`)


@dataclass
class BatchResult:
    texts: List[str]
    token_ids: List[List[int]]
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory: float
    finish_reasons: List[str] = field(default_factory=list)  # per request: "stop" or "length"


def stream_tokens(model, processor, input_ids: List[int], image_features: Optional[mx.array], *,
                  max_tokens: int, sampler=None, logits_processors=None, prompt_cache=None,
                  kv: Optional[KVOptions] = None, num_tiles: Sequence[int] = (),
                  on_token: Optional[Callable[[int], None]] = None, draft=None,
                  draft_features: Optional[mx.array] = None, stop_on_eos: bool = False,
                  extra_stop_tokens: Sequence = ()) -> Iterator[GenerationResponse]:
    """Stream a reply to `input_ids` (1-D list) whose `<IMG_CONTEXT>` positions take `image_features` rows.

    `prompt_cache` (mlx-lm KV caches) may already hold a prefix of the conversation; then `input_ids` is only the
    part after it. `on_token` sees every token that entered the cache. `kv` holds the cache settings.
    `draft` (a `speculative.Draft`) decodes speculatively; then `prompt_cache` is the combined cache of both models
    (`draft.make_cache`) and `draft_features` the draft's image features.
    Generation stops on the template's end token only, as upstream `chat()`; `stop_on_eos` adds the tokenizer's
    eos, `extra_stop_tokens` more tokens (strings or ids)."""
    max_tokens = integer("max_tokens", max_tokens, minimum=1)
    stop = processor.stop_token_ids(stop_on_eos, extra_stop_tokens)
    kv = kv or KVOptions()
    kv.check(model)
    tic = time.perf_counter()
    if draft is not None:
        if kv.kv_bits is not None or kv.max_kv_size is not None:
            raise UserError("speculative decoding keeps a plain KV cache; drop kv_bits/max_kv_size (--kv-bits, "
                            "--max-kv-size) or the draft model")
        steps = draft.generate_step(model, input_ids, image_features, draft_features, prompt_cache,
                                    max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
                                    prefill_step_size=kv.prefill_step_size)
    else:
        if prompt_cache is None and kv.max_kv_size is not None:
            prompt_cache = kv.make_cache(model)
        ids = mx.array(input_ids, dtype=mx.int32)
        embeds = model.get_input_embeddings(ids[None], image_features=image_features)[0]
        steps = generate_step(ids, model, max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
                              prompt_cache=prompt_cache, input_embeddings=embeds, **kv.step_kwargs())
    # On Apple silicon, mlx-lm's wired limit keeps the weights resident while generating.
    with wired_limit(model, [generation_stream]):
        yield from _responses(steps, processor.tokenizer, len(input_ids), max_tokens, tic, list(num_tiles), on_token,
                              stop, processor.vocab_ids, reply_skip_ids(processor))


def _responses(steps, tokenizer, n_prompt: int, max_tokens: int, tic: float, num_tiles: List[int],
               on_token, stop: set, vocab, skip: set) -> Iterator[GenerationResponse]:
    """The text pieces of mlx-lm's token stream `steps`: stop on an end token, leave `skip` (and ids the
    tokenizer has no token for) out."""
    detok = tokenizer.detokenizer
    detok.reset()
    prompt_tps, n, token, finish = 0.0, 0, None, "length"

    def response(reason=None):
        return GenerationResponse(detok.last_segment, token, n_prompt, prompt_tps, n,
                                  n / max(time.perf_counter() - tic, 1e-9), mx.get_peak_memory() / 1e9, reason,
                                  list(num_tiles))

    for n, (token, *_) in enumerate(steps, start=1):
        if n == 1:
            prompt_tps = n_prompt / (time.perf_counter() - tic)
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
        yield response()
    detok.finalize()
    yield response(finish)


def reply_skip_ids(processor) -> set:
    """Ids left out of reply text: the special tokens, as upstream decodes, or none where upstream keeps them
    (GPT-OSS's harmony channel markers, `Template.decode_special`)."""
    return set() if processor.template.decode_special else special_token_ids(processor.tokenizer)


def special_token_ids(tokenizer) -> set:
    """Ids that upstream's `decode(..., skip_special_tokens=True)` leaves out of the reply text."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", 0)}
    return ids


def _features(model, pixel_values: Optional[mx.array]) -> Optional[mx.array]:
    return None if pixel_values is None else model.extract_feature(pixel_values)


def _router_line(enc) -> Optional[str]:
    return None if enc.compress is None else describe(enc.compress, enc.p0)


def _encode(model, processor, ids: List[int], inputs: dict, flash: Optional[bool], draft, prompt_cache_file,
            prefill_step_size: int):
    """(ids, features, draft features, cache, router line) of one request: the Flash router when it is on,
    else the prompt-cache file / draft preparation."""
    if model.use_flash(flash) and inputs["pixel_values"] is not None:
        if draft is not None and (prompt_cache_file is not None or not draft.shares_vision):
            raise UserError("with the Flash router on, a draft model must share the target's vision tower and "
                            "cannot be combined with a prompt-cache file (compressed tiles have no features of the "
                            "draft's own, and the file holds no features); pass --no-flash")
        if prompt_cache_file is not None:
            rest, features, cache, compress, p0 = prepare_routed_request(
                model, ids, inputs["pixel_values"], inputs["num_tiles"], prompt_cache_file)
            processor.check_length(len(rest) + cache[0].offset)
            return rest, features, None, cache, describe(compress, p0)
        enc = model.encode_request(ids, inputs["pixel_values"], flash)
        processor.check_length(len(enc.ids))
        return enc.ids, enc.features, enc.features if draft is not None else None, None, _router_line(enc)
    if draft is None and prompt_cache_file is None:
        return ids, _features(model, inputs["pixel_values"]), None, None, None
    ids, features, draft_features, cache = prepare_request(
        model, processor, ids, inputs["pixel_values"], inputs["num_tiles"], draft=draft,
        prompt_cache_file=prompt_cache_file, prefill_step_size=prefill_step_size)
    return ids, features, draft_features, cache, None


def json_rule(model, processor, response_format, stop_ids, draft=None):
    """The JSON constraint of `response_format` (None: plain text), refused together with a speculative `draft`."""
    rule = constraint(model, processor, response_format, stop_ids)
    if rule is not None and draft is not None:
        raise UserError("a response format (JSON constraint) cannot be combined with speculative decoding; drop one")
    return rule


def stream_generate(model, processor, prompt: str, images: Optional[Sequence[ImageInput]] = None, *,
                    video=None, num_frames: int = 8, max_tokens: int = DEFAULT_MAX_TOKENS,
                    sampling: Optional[SamplingOptions] = None, kv: Optional[KVOptions] = None, max_tiles=None,
                    system_message: Optional[str] = None, history=None, exif_transpose: bool = False,
                    inputs: Optional[dict] = None, draft=None, prompt_cache_file=None, stop_on_eos: bool = False,
                    extra_stop_tokens: Sequence = (), thinking: Optional[bool] = None,
                    thinking_budget: Optional[int] = None, response_format=None,
                    flash: Optional[bool] = None,
                    **options) -> Iterator[GenerationResponse]:
    """Stream the reply to `prompt` with `images` (paths, URLs, bytes or PIL images) and/or a `video`, as the
    official `chat()` builds it. Yields `GenerationResponse` pieces; the last has `finish_reason` set.
    `sampling` and `kv` (or their fields as keywords, e.g. `temperature=0.7`) say how to sample and cache.
    `inputs` may be the processor's output for this request, computed beforehand. `draft` (a
    `speculative.Draft`) decodes speculatively; `prompt_cache_file` (a path or a loaded
    `prompt_cache.PromptCacheFile`) starts from a cached prompt that this request extends. Generation stops on the
    template's end token (`stop_on_eos` adds the tokenizer's eos, `extra_stop_tokens` more). `thinking` and
    `thinking_budget`: see `thinking.py` (on: the card's system prompt and temperature; off: an empty think block;
    a budget forces `</think>` after that many reasoning tokens). `response_format` (a `structured.ResponseFormat`
    or an OpenAI `response_format` dict) constrains the reply to JSON; a reply cut off by `max_tokens` before its
    JSON is complete ends with finish_reason "length". `flash`: run an InternVL3.5-Flash checkpoint's
    resolution router (None: as its config's `flash_mode` says; False: every tile at full resolution, upstream's
    `generate_normal`)."""
    sampling, kv = split_options(sampling, kv, thinking_options(thinking, sampling, options))
    sampling.check(model)
    max_tokens = integer("max_tokens", max_tokens, minimum=1)
    budget = budget_processors(thinking_budget, processor.tokenizer, draft)
    rule = json_rule(model, processor, response_format, processor.stop_token_ids(stop_on_eos, extra_stop_tokens),
                     draft)
    if inputs is None:
        inputs = processor(prompt, images=images, max_tiles=max_tiles, history=history,
                           system_message=system_message, video=video, num_frames=num_frames,
                           exif_transpose=exif_transpose, thinking=thinking, routed=model.use_flash(flash))
    sampler, processors = sampling.make(processor.tokenizer.eos_token_ids)
    processors = processors + budget + ([rule] if rule is not None else [])
    ids, features, draft_features, cache, router = _encode(model, processor, inputs["input_ids"][0].tolist(),
                                                           inputs, flash, draft, prompt_cache_file,
                                                           kv.prefill_step_size)
    max_tokens = processor.clamp_max_tokens(len(ids) + (cache[0].offset if cache else 0), max_tokens)
    for r in stream_tokens(model, processor, ids, features, max_tokens=max_tokens, sampler=sampler,
                           logits_processors=processors, prompt_cache=cache, kv=kv, num_tiles=inputs["num_tiles"],
                           draft=draft, draft_features=draft_features, stop_on_eos=stop_on_eos,
                           extra_stop_tokens=extra_stop_tokens):
        r.router = router
        yield r


def generate(model, processor, prompt: str, images: Optional[Sequence[ImageInput]] = None, *,
             verbose: bool = False, **kwargs) -> str:
    """The whole reply to `prompt` (see `stream_generate` for the options), stripped as upstream strips it."""
    text, last, shown = "", None, False
    for last in stream_generate(model, processor, prompt, images, **kwargs):
        if verbose and last.router and not shown:
            print(last.router)
        shown = True
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
                   max_tokens: int = DEFAULT_MAX_TOKENS, sampling: Optional[SamplingOptions] = None,
                   kv: Optional[KVOptions] = None, max_tiles=None, system_message: Optional[str] = None,
                   stop_on_eos: bool = False, extra_stop_tokens: Sequence = (), thinking: Optional[bool] = None,
                   thinking_budget: Optional[int] = None, response_formats: Optional[Sequence] = None,
                   flash: Optional[bool] = None,
                   **options) -> BatchResult:
    """Replies to several independent requests at once (upstream `batch_chat`): `images[i]` is the list of
    images of `prompts[i]` (or one image, or None). Decoding runs batched with left-padded KV caches; `kv` gives
    the prefill chunk (the batch keeps plain caches). `thinking`, `thinking_budget`: as `stream_generate` (the
    budget counts per row). `response_formats[i]` (None: plain text) constrains reply i to JSON, each row with its
    own grammar."""
    sampling, kv = split_options(sampling, kv, thinking_options(thinking, sampling, options))
    sampling.check(model)
    max_tokens = integer("max_tokens", max_tokens, minimum=1)
    images = list(images) if images is not None else [None] * len(prompts)
    formats = list(response_formats) if response_formats is not None else [None] * len(prompts)
    if len(images) != len(prompts) or len(formats) != len(prompts):
        raise UserError(f"batch_generate got {len(prompts)} prompts but {len(images)} image lists and "
                        f"{len(formats)} response formats")
    eos = sorted(processor.stop_token_ids(stop_on_eos, extra_stop_tokens))
    rules = [constraint(model, processor, f, eos) for f in formats]
    sampler, processors = sampling.make(processor.tokenizer.eos_token_ids)
    tic = time.perf_counter()
    prompt_ids, caches, limits = _prefill_rows(model, processor, prompts, images, max_tokens, kv, flash,
                                               max_tiles=max_tiles, system_message=system_message,
                                               thinking=thinking)
    prompt_time = time.perf_counter() - tic
    n_prompt = sum(len(p) for p in prompt_ids)

    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in eos], sampler=sampler,
                         logits_processors=processors, completion_batch_size=len(prompts),
                         prefill_batch_size=len(prompts), prefill_step_size=kv.prefill_step_size)
    tic = time.perf_counter()
    try:
        per_row = [processors + budget_processors(thinking_budget, processor.tokenizer) + ([r] if r is not None else [])
                   for r in rules]
        uids = gen.insert([[p[-1]] for p in prompt_ids], max_tokens=limits, caches=caches,
                          all_tokens=[p[:-1] for p in prompt_ids], logits_processors=per_row)
        tokens, finish = {u: [] for u in uids}, {}
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":
                    tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    finish[r.uid] = r.finish_reason
    finally:
        gen.close()
    gen_time = time.perf_counter() - tic
    out = [tokens[u] for u in uids]
    n_gen = sum(len(t) for t in out)
    skip = not processor.template.decode_special
    texts = [processor.tokenizer.decode(t, skip_special_tokens=skip).strip() for t in out]
    return BatchResult(texts, out, n_prompt, n_gen, n_prompt / max(prompt_time, 1e-9),
                       n_gen / max(gen_time, 1e-9), mx.get_peak_memory() / 1e9, [finish.get(u, "length") for u in uids])


def _prefill_rows(model, processor, prompts, images, max_tokens, kv, flash, **render):
    """Each request rendered, routed on its own tiles (as upstream's single-request Flash path does) and prefilled
    alone, all but its last token (the batch's first decode step feeds it): the rows' prompt ids, KV caches and
    reply limits."""
    prompt_ids, caches, limits = [], [], []
    for text, ims in zip(prompts, images):
        ims = [] if ims is None else ([ims] if not isinstance(ims, (list, tuple)) else list(ims))
        inputs = processor(text, images=ims, routed=model.use_flash(flash), **render)
        enc = model.encode_request(inputs["input_ids"][0].tolist(), inputs["pixel_values"], flash)
        ids = enc.ids
        limits.append(processor.clamp_max_tokens(len(ids), max_tokens))
        cache = model.make_cache()
        if len(ids) > 1:
            for _ in stream_prefill(model, ids[:-1], enc.features, cache, kv.prefill_step_size):
                pass
        prompt_ids.append(ids)
        caches.append(cache)
    return prompt_ids, caches, limits


def stream_prefill(model, input_ids: List[int], image_features: Optional[mx.array], cache, step: int = 2048):
    """Run `input_ids` through the model into `cache` in chunks of `step` tokens; yields tokens done so far."""
    yield from model.prefill(input_ids, image_features, cache, step)
