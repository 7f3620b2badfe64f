"""A multi-turn conversation with images, kept the way upstream `chat(..., history=...)` keeps it.

The history is a list of (question, answer) pairs; a question keeps the `<image>` placeholders it was asked with,
and every turn renders the whole conversation again with the template, so the prompt of turn k is exactly
upstream's. Images may be added in any turn: an image added in turn 1 is prefixed `<image>\\n` (several:
`Image-1: <image>\\n...`), one added later is prefixed `Image-k: <image>\\n` in that turn's question, k counting
all images of the conversation. Tiles are concatenated in prompt order.

What is not upstream's is only the work saved: the KV cache of the previous turn is kept, trimmed to the longest
token prefix it shares with the new prompt, and each image is encoded once. A `prompt_cache_file` (see
`prompt_cache.py`) starts the first turn (and the first turn after `clear()`) from a cached prompt, which that turn
must extend; a `draft` (see `speculative.py`) decodes every turn speculatively, its KV cache kept beside the
target's.

With the Flash router on, each turn routes all the conversation's tiles again (an image added later can change an
earlier image's decisions), so the kept KV cache is compared with the new prompt tile by tile *and* decision by
decision: it is reused up to the first tile decided otherwise. A prompt-cache file made with the router on gives
the router its cached tiles' scores (their ViT is not run) and is used only when the router, over the first turn's
tiles, decides the cached tiles as the file says, as `generate` uses it.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from . import validate
from .errors import UserError
from .flash import FlashTiles, describe, select_features
from .generate import DEFAULT_MAX_TOKENS, GenerationResponse, json_rule, stream_tokens
from .images import ImageInput
from .processing import (
    add_image_placeholders,
    add_video_placeholders,
    as_image_list,
    image_to_tiles,
    load_image,
)
from .prompt_cache import as_prompt_cache, image_hashes
from .sampling import KVOptions, SamplingOptions, split_options
from .templates import chat_messages
from .thinking import budget_processors, check_budget, thinking_options


class ChatSession:
    """`session.ask("...", images=[...])` -> reply; history, images and the KV cache carry over between turns."""

    def __init__(self, model, processor, system_message: Optional[str] = None, max_tiles=None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, sampling: Optional[SamplingOptions] = None,
                 kv: Optional[KVOptions] = None, num_frames: int = 8, exif_transpose: bool = False, draft=None,
                 prompt_cache_file=None, stop_on_eos: bool = False, extra_stop_tokens: Sequence = (),
                 thinking: Optional[bool] = None, thinking_budget: Optional[int] = None,
                 flash: Optional[bool] = None, **options):
        """`sampling` and `kv` (or their fields as keywords, e.g. `temperature=0.7`, `kv_bits=8`) apply to every
        turn; a seed seeds once, here. `draft`: a `speculative.Draft`; `prompt_cache_file`: a path or a loaded
        `prompt_cache.PromptCacheFile`. Replies end at the template's end token (`stop_on_eos` adds the tokenizer's
        eos, `extra_stop_tokens` more). `thinking` (see `thinking.py`): True, the card's thinking system prompt (in
        place of the default) and temperature; False, each reply starts after an empty think block; None, neither.
        `thinking_budget`: at most that many reasoning tokens per reply, then `</think>` is forced. The history
        keeps each whole reply, think block included, as upstream `chat(history=...)` does. `flash`: the Flash
        router on/off (None: the checkpoint's `flash_mode`); each turn routes all the conversation's tiles again, as
        upstream `chat(history=...)` does."""
        self.model, self.processor = model, processor
        self.flash = model.use_flash(flash)
        if self.flash and draft is not None and not draft.shares_vision:
            raise UserError("with the Flash router on, a draft model must share the target's vision tower (e.g. "
                            "--draft-quantize): compressed tiles have no features of the draft's own; pass "
                            "--no-flash (flash=False)")
        max_tokens = validate.integer("max_tokens", max_tokens, minimum=1)
        max_tiles, num_frames = validate.max_tiles(max_tiles), validate.num_frames(num_frames)
        validate.conversation("", None, system_message)
        self.stop_ids = processor.stop_token_ids(stop_on_eos, extra_stop_tokens)
        self.draft = draft
        self.prompt_cache_file = None
        if prompt_cache_file is not None:
            self.prompt_cache_file = as_prompt_cache(prompt_cache_file, model)
            self.prompt_cache_file.check_router(self.flash)
        self.system_message = system_message
        self.max_tiles = max_tiles
        self.max_tokens = max_tokens
        self.num_frames = num_frames
        self.exif_transpose = exif_transpose
        self.thinking, self.thinking_budget = thinking, check_budget(thinking_budget)
        budget_processors(self.thinking_budget, processor.tokenizer, draft)  # refuse a bad combination now
        self.sampling, self.kv = split_options(sampling, kv, thinking_options(thinking, sampling, options))
        self.kv.check(model)
        self.sampling.check(model)
        self.sampler, self.logits_processors = self.sampling.make(processor.tokenizer.eos_token_ids)
        self.clear()

    def clear(self) -> None:
        """Forget the conversation: history, images, and the KV cache."""
        self.history: List[Tuple[str, str]] = []
        self._tiles: List = []  # per image (or frame), [T, S, S, 3] numpy tiles, in prompt order
        self._features: List[Optional[mx.array]] = []  # per image, [T*n, D], computed on first use
        self._draft_features: List[Optional[mx.array]] = []  # the same for a draft with its own ViT
        self._flash_tiles: List = []  # per image, `FlashTiles` (both projections and p0), computed on first use
        self._scores: List[Optional[np.ndarray]] = []  # per image, the router's p0 per tile (the file's or computed)
        self._compress: Optional[np.ndarray] = None  # this turn's decision per tile (Flash router on)
        self._flash_rows: Optional[mx.array] = None  # this turn's routed image rows (None: made per image on use)
        self.router: Optional[str] = None  # this turn's router decisions, one line
        self._cache = None
        self._cache_ids: List[int] = []  # the token ids whose keys/values the cache holds
        self._prompt_len = 0  # how many of them were prompt (the rest were generated)

    @property
    def num_images(self) -> int:
        return len(self._tiles)

    def _add_media(self, question: str, images: Sequence[ImageInput], video) -> str:
        """Tile the new images (and video frames) and put their placeholders into this turn's question."""
        new = [image_to_tiles(load_image(im, self.exif_transpose), self.processor.config, self.max_tiles)
               for im in images]
        if new:
            question = add_image_placeholders(question, len(new), first_turn=True, start=self.num_images + 1)
        if video is not None:
            frames = self.processor.frame_tiles(video, self.num_frames)
            question = add_video_placeholders(question, len(frames))
            new += frames
        self._tiles += new
        self._features += [None] * len(new)
        self._draft_features += [None] * len(new)
        self._flash_tiles += [None] * len(new)
        self._scores += [None] * len(new)
        return question

    def _image_rows(self, start: int, stop: int, draft: bool = False) -> Optional[mx.array]:
        """Image-token rows [start, stop) of the conversation, encoding (once) only the images that overlap them;
        `draft=True`: the draft's features. With the Flash router on, each tile gives its mlp2 or mlp1 rows as this
        turn's decisions say."""
        if stop <= start:
            return None
        if self.flash and self._flash_rows is not None:
            return self._flash_rows[start:stop]
        own = draft and not self.draft.shares_vision
        cfg = self.model.config
        row, tile, parts = 0, 0, []
        for i, tiles in enumerate(self._tiles):
            decided = self._compress[tile: tile + tiles.shape[0]] if self._compress is not None else None
            tile += tiles.shape[0]
            n = (tiles.shape[0] * cfg.num_image_token if decided is None else
                 sum(cfg.flash_image_token if c else cfg.num_image_token for c in decided))
            if row + n > start and row < stop:
                parts.append(self._rows_of(i, own, decided)[max(start - row, 0): stop - row])
            row += n
        return mx.concatenate(parts)

    def _rows_of(self, i: int, own: bool, decided) -> mx.array:
        """All image-token rows of image i: the routed ones for the decisions `decided`, else mlp1's (the draft's
        own when `own`)."""
        if decided is not None:
            if self._flash_tiles[i] is None:
                self._flash_tiles[i] = self.model.flash_tiles(mx.array(self._tiles[i]))
            return select_features(self._flash_tiles[i], decided)
        model, store = (self.draft.model, self._draft_features) if own else (self.model, self._features)
        if store[i] is None:
            feats = model.extract_feature(mx.array(self._tiles[i]))
            store[i] = feats.reshape(-1, feats.shape[-1])
        return store[i]

    def _route(self, ids: List[int], from_file: bool) -> Tuple[List[int], List[int]]:
        """(`ids`, the cache key of `ids`). With the Flash router on, `ids` lose the compressed tiles' surplus image
        tokens (the router decides over every tile of the conversation, `from_file`: the prompt-cache file's tiles
        by its scores, and as it says, or a `UserError`) and the key marks each tile's tokens with its index and
        decision, so that a kept cache is reused only up to the first tile decided otherwise."""
        if not self.flash or not self._tiles:
            return ids, ids
        pcf = self.prompt_cache_file if from_file and self.prompt_cache_file.router else None
        if pcf is not None:
            pcf.check_images(image_hashes(self._tiles, []))
            for i, p0 in enumerate(pcf.cached_scores()):
                self._scores[i] = p0 if self._scores[i] is None else self._scores[i]
        for i, tiles in enumerate(self._tiles):
            if self._scores[i] is None:
                self._flash_tiles[i] = self.model.flash_tiles(mx.array(tiles))
                self._scores[i] = self._flash_tiles[i].p0
        p0 = np.concatenate(self._scores)
        if all(t is not None for t in self._flash_tiles):  # the model's own routing (rank 0's under mlx.launch)
            enc = self.model.route_tiles(ids, FlashTiles.concat(self._flash_tiles))
            self._compress, ids, self._flash_rows, p0 = enc.compress, enc.ids, enc.features, enc.p0
        else:  # some tiles scored by the prompt-cache file (one process): their rows are made when needed
            (self._compress, ids), self._flash_rows = self.model.route_ids(ids, p0), None
        if pcf is not None:
            pcf.check_decisions(self._compress)
        self.router = describe(self._compress, p0)
        image, keyed, tile, pos = self.processor.image_token_id, [], 0, 0
        cfg = self.model.config
        for t in ids:
            if t != image:
                keyed.append(t)
                continue
            keyed.append(-1 - 2 * tile - int(self._compress[tile]))
            pos += 1
            if pos == (cfg.flash_image_token if self._compress[tile] else cfg.num_image_token):
                tile, pos = tile + 1, 0
        return ids, keyed

    def _new_cache(self, ids: List[int]) -> Tuple[list, int]:
        """A cache for a first turn: empty, or the prompt-cache file's (which `ids` must extend); with a draft,
        the draft's cache follows the target's, filled to the same length."""
        if self.prompt_cache_file is None:
            cache, common = self.kv.make_cache(self.model), 0
        else:
            common = self.prompt_cache_file.prefix_length(ids, image_hashes(self._tiles, []))
            cache = self.prompt_cache_file.fresh_cache()
        if self.draft is not None:
            d_cache = self.draft.model.make_cache()
            n_rows = sum(1 for t in ids[:common] if t == self.processor.image_token_id)
            self.draft.prefill_draft(ids[:common], self._image_rows(0, n_rows, draft=True), d_cache,
                                     self.kv.prefill_step_size)
            cache = cache + d_cache
        return cache, common

    def _reuse(self, ids: List[int], keyed: List[int]) -> int:
        """The kept cache trimmed to the longest prefix its ids share with this turn's `keyed` ids (see `_route`);
        returns its length."""
        common, limit = 0, min(len(self._cache_ids), len(ids) - 1)  # at least one new token must be run
        while common < limit and self._cache_ids[common] == keyed[common]:
            # An image token the model itself generated must not pass for a new image's token.
            if common >= self._prompt_len and ids[common] == self.processor.image_token_id:
                break
            common += 1
        trim_prompt_cache(self._cache, len(self._cache_ids) - common)
        return common

    def _processors(self, response_format) -> list:
        """This turn's logits processors: the session's sampling, the thinking budget, the JSON constraint."""
        rule = json_rule(self.model, self.processor, response_format, self.stop_ids, self.draft)
        return (self.logits_processors + budget_processors(self.thinking_budget, self.processor.tokenizer)
                + ([rule] if rule is not None else []))

    def stream(self, question: str, images: Optional[Sequence[ImageInput]] = None, video=None,
               max_tokens: Optional[int] = None, response_format=None) -> Iterator[GenerationResponse]:
        """Stream the reply to `question`; the turn is added to the history when the reply is complete.
        `response_format` (a `structured.ResponseFormat` or an OpenAI `response_format` dict) constrains this
        turn's reply to JSON."""
        proc = self.processor
        n_before = len(self._tiles)
        done = False
        try:
            validate.conversation(question)
            processors = self._processors(response_format)
            question = self._add_media(question, as_image_list(images), video)
            num_tiles = [t.shape[0] for t in self._tiles]
            ids = proc.renderer.render(chat_messages(question, self.history), num_tiles, self.system_message,
                                       thinking=self.thinking).ids
            kept = self._cache is not None and can_trim_prompt_cache(self._cache)
            ids, keyed = self._route(ids, from_file=not kept and self.prompt_cache_file is not None)
            max_tokens = proc.clamp_max_tokens(len(ids), max_tokens or self.max_tokens)
            if kept:
                common = self._reuse(ids, keyed)
            else:
                self._cache, common = self._new_cache(ids)
            self._cache_ids, self._prompt_len = keyed[:common], len(ids)
            suffix = ids[common:]
            n_rows = sum(1 for t in ids if t == proc.image_token_id)
            first = n_rows - sum(1 for t in suffix if t == proc.image_token_id)
            feats = self._image_rows(first, n_rows)
            draft_feats = self._image_rows(first, n_rows, draft=True) if self.draft is not None else None
            generated: List[int] = []
            text = ""
            try:
                for r in stream_tokens(self.model, proc, suffix, feats, max_tokens=max_tokens, sampler=self.sampler,
                                       logits_processors=processors,
                                       prompt_cache=self._cache,
                                       kv=self.kv, num_tiles=num_tiles, on_token=generated.append,
                                       draft=self.draft, draft_features=draft_feats,
                                       extra_stop_tokens=self.stop_ids):
                    text += r.text
                    yield r
            finally:
                # Keep the ids in step with what the cache now holds (prompt + tokens fed back), even if stopped.
                held = self._cache[0].offset if self.draft is None else self.draft.align(self.model, self._cache)
                self._cache_ids = (keyed + generated)[:held]
            self.history.append((question, text.strip()))
            done = True
        finally:
            if not done:  # an interrupted or failed turn leaves the conversation as it was (and the cache unused)
                del self._tiles[n_before:], self._features[n_before:], self._draft_features[n_before:]
                del self._flash_tiles[n_before:], self._scores[n_before:]
                self._cache, self._cache_ids = None, []

    def ask(self, question: str, images: Optional[Sequence[ImageInput]] = None, video=None,
            max_tokens: Optional[int] = None, response_format=None) -> str:
        """The whole reply to `question` (stripped, as upstream)."""
        return "".join(r.text for r in self.stream(question, images, video, max_tokens, response_format)).strip()
