"""The generation thread: every MLX array of every request is made and evaluated here.

MLX streams belong to the thread that made them, so request threads only parse, fetch, tile (numpy) and tokenize;
this one thread takes jobs from a queue, encodes their images, prefills and decodes. A job's prompt is looked up in
mlx-lm's `LRUPromptCache` by its keyed token ids (see `render`), so a resent conversation prefills only its new
tokens; image features come from an LRU keyed by the image's content hash, so an image is encoded once per server.
Both caches are bounded by a count and by bytes (`caches`: by default a share of the machine's memory).
The new tokens are prefilled one chunk per loop turn, between decode steps of the running batch; then the job
joins mlx-lm's `BatchGenerator` (continuous batching: decode steps run all active jobs together). A cancelled job
(client gone, stream aborted) leaves the batch at the next step and frees its slot.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import trim_prompt_cache

from ..distributed import agree
from ..errors import UserError
from ..generate import reply_skip_ids, stream_prefill
from ..sampling import SamplingOptions, seeded_sampler
from ..structured import JsonConstraint, constraint, ll_tokenizer
from ..thinking import budget_processors
from . import caches, spmd
from .flash_route import route_prompt
from .protocol import APIError, usage
from .render import Prompt

logger = logging.getLogger("mlx_internvl.server")
MODEL_KEY = "model"


@dataclass
class Job:
    prompt: Prompt
    sampling: SamplingOptions
    emit: Callable[[tuple], None]  # thread-safe: ("delta", text, logprobs) / ("done", reason, usage) / ("error", e)
    stop: List[str] = field(default_factory=list)
    top_logprobs: Optional[int] = None  # None: no logprobs
    thinking_budget: Optional[int] = None  # at most this many reasoning tokens, then </think> is forced
    response_format: Optional[object] = None  # a structured.ResponseFormat or Grammar the reply is constrained to
    keep_tokens: frozenset = frozenset()  # special tokens that stay in the text (tool-call markers)
    rule: Optional[JsonConstraint] = None  # response_format compiled on the request's thread (start.py)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)  # when its request came in (for the time to first token)
    id: int = 0  # set by the generation thread; the same on every rank of a group
    dropped: bool = False  # cancellation as the generation loop sees it (on every rank at the same step)
    # filled in on the generation thread
    cached_tokens: int = 0
    generated: int = 0
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    lead: Optional[int] = None  # where the reply starts after leading whitespace
    logprobs: list = field(default_factory=list)


class Engine:
    """`submit(job)` from any thread; results come back through `job.emit`."""

    def __init__(self, load: Callable[[], tuple], decode_concurrency: int = 8, max_queue: int = 32,
                 prompt_cache_size: int = 16, vision_cache_size: int = 32, prefill_step_size: int = 512,
                 group=None, prompt_cache_bytes: Optional[int] = None, vision_cache_bytes: Optional[int] = None,
                 flash: Optional[bool] = None):
        self._load = load
        self.flash_option = flash  # the Flash router: None follows the checkpoint's flash_mode
        self.group = group  # a `distributed.Group`: every rank runs this loop; rank 0's jobs are shared (spmd.py)
        self._jobs: dict = {}  # id -> job, from its arrival to its end
        self._ids = 0
        self.decode_concurrency, self.max_queue = decode_concurrency, max_queue
        self.prompt_cache_size, self.vision_cache_size = prompt_cache_size, vision_cache_size
        self.prompt_cache_bytes, self.vision_cache_bytes = prompt_cache_bytes, vision_cache_bytes  # None: default
        self.prefill_step_size = prefill_step_size
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._inflight = 0
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.load_error: Optional[BaseException] = None
        self.stats = {"requests": 0, "cached_tokens": 0, "prompt_tokens": 0, "generated_tokens": 0,
                      "prompt_cache_hits": 0, "vision_hits": 0, "vision_misses": 0, "max_batch": 0}
        self.on_first_token: Callable[[float], None] = lambda seconds: None  # a job's time to first token (metrics)
        self._active: dict = {}  # uid -> (job, detokenizer): the decoding batch
        self._thread = threading.Thread(target=self._run, name="mlx-generation", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def wait(self) -> None:
        """Until the loop ends (on a follower rank: when rank 0 stops)."""
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def queue_depth(self) -> int:
        """Requests handed to the generation thread and not yet decoding (queued or prefilling)."""
        return self._inbox.qsize() + max(0, len(self._jobs) - len(self._active))

    def try_reserve(self) -> bool:
        """Take a slot (active or queued); False when the server is full."""
        with self._lock:
            if self._inflight >= self.decode_concurrency + self.max_queue:
                return False
            self._inflight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    # --- everything below runs on the generation thread ---

    def _run(self) -> None:
        try:
            self.model, self.processor = self._load()
            self._stream = mx.default_stream(mx.default_device())
            # Special tokens and ids past the tokenizer (padded embedding rows) have no text, as upstream decodes.
            self._skip = reply_skip_ids(self.processor) | (set(range(self.model.config.llm_config["vocab_size"]))
                                                   - self.processor.vocab_ids)
            self._eos = sorted(self.processor.stop_token_ids())  # the template's end token, as upstream chat()
            self._stop_tokens = StopSequences([(t,) for t in self._eos])
            # llguidance's view of the tokenizer, built now: it holds the GIL for seconds, which would stall a batch.
            ll_tokenizer(self.processor.tokenizer, self.model.config.llm_config["vocab_size"], self._eos)
            self._prompts = caches.prompt_cache(self.prompt_cache_size, self.prompt_cache_bytes)
            self._features = caches.FeatureCache(self.vision_cache_size, self.vision_cache_bytes)
            self._flash = self.model.use_flash(self.flash_option)
            self._new_batch = lambda: BatchGenerator(self.model, completion_batch_size=self.decode_concurrency,
                                                     prefill_batch_size=self.decode_concurrency,
                                                     stream=self._stream)
            self._batch = self._new_batch()
        except BaseException as e:  # reported by start()
            self.load_error = e
            self.ready.set()
            return
        self.ready.set()
        active = self._active
        waiting: List[Job] = []
        prefilling = None  # (job, prefill chunks, join)
        while True:
            new = self._sync(idle=not active and prefilling is None and not waiting)
            if new is None:
                break
            waiting.extend(new)
            for job in [j for j in waiting if j.dropped]:
                waiting.remove(job)
                self._finish(job, "cancelled")
            if prefilling is None and waiting and len(active) < self.decode_concurrency:
                job = waiting.pop(0)
                try:
                    prefilling = self._start_prefill(job)
                except Exception as e:
                    self._fail(job, e)
            if prefilling is not None:
                prefilling = self._prefill_chunk(prefilling, active)
            if active:
                self._decode_or_fail(active)
        self._batch.close()

    def _sync(self, idle: bool) -> Optional[List[Job]]:
        """The jobs that arrived, and cancellations marked as `dropped`; None when the loop should end. Under a
        group, rank 0 shares both (and its stop) so every rank changes its batch at the same step."""
        stop, new = self._stop.is_set(), []
        if not stop and (self.group is None or self.group.is_leader):
            try:
                new.append(self._inbox.get(timeout=0.05) if idle else self._inbox.get_nowait())
            except queue.Empty:
                pass
        for job in new:
            self._ids += 1
            job.id = self._ids
        dropped = [i for i, j in self._jobs.items() if j.cancelled.is_set()]
        if self.group is not None:
            stop, new, dropped = spmd.exchange(self.group, stop, new, dropped, self._fail, Job)
        for job in new:
            self._jobs[job.id] = job
        for i in dropped:
            self._jobs[i].dropped = True
        return None if stop else new

    def _prefill_chunk(self, prefilling, active: dict):
        """Run one prefill chunk; a job whose prompt is done joins the batch. Returns what is still prefilling."""
        job, steps, join = prefilling
        try:
            if job.dropped:
                self._finish(job, "cancelled")
                return None
            if next(steps, None) is not None:
                return prefilling
            uid, detok = join()
            active[uid] = (job, detok)
            self.stats["max_batch"] = max(self.stats["max_batch"], len(active))
        except Exception as e:
            self._fail(job, e)
        return None

    def _decode_or_fail(self, active: dict) -> None:
        try:
            self._decode_step(active)
        except Exception as e:  # a broken batch fails its jobs, never the server
            logger.error("decode step failed: %s", traceback.format_exc())
            for job, _ in active.values():
                self._fail(job, e)
            active.clear()
            self._batch.close()
            self._batch = self._new_batch()

    def _fail(self, job: Job, e: Exception) -> None:
        self._jobs.pop(job.id, None)
        if isinstance(e, UserError):
            e = APIError(400, str(e))
        elif not isinstance(e, APIError):
            logger.error("request failed: %s", traceback.format_exc())
            e = APIError(500, f"internal error: {type(e).__name__}: {e}")
        job.emit(("error", e))

    def _finish(self, job: Job, reason: str) -> None:
        self._jobs.pop(job.id, None)
        if reason != "cancelled":
            end = len(job.text.rstrip())
            if job.lead is None:
                job.lead = len(job.text) - len(job.text.lstrip())
            if end > max(job.sent, job.lead) or job.logprobs:
                job.emit(("delta", job.text[max(job.sent, job.lead):end], job.logprobs))
            job.logprobs = []
        job.emit(("done", reason, usage(len(job.prompt.ids), job.generated, job.cached_tokens)))

    def _image_rows(self, prompt: Prompt, n_rows: int) -> Optional[mx.array]:
        """The last `n_rows` image-token rows of the prompt (those not in the prompt cache), encoding as needed."""
        if n_rows == 0:
            return None
        per_tile = self.processor.config.num_image_token
        rows, parts = 0, []
        for spec in reversed(prompt.images):
            feats = self._features.get(spec.key)
            if feats is None:
                self.stats["vision_misses"] += 1
                feats = self.model.extract_feature(mx.array(spec.pixel_values()))  # uint8 until here
                feats = feats.reshape(-1, feats.shape[-1])
                mx.eval(feats)
                self._features.put(spec.key, feats)
            else:
                self.stats["vision_hits"] += 1
            parts.insert(0, feats)
            rows += spec.num_tiles * per_tile
            if rows >= n_rows:
                break
        return mx.concatenate(parts)[-n_rows:] if len(parts) > 1 else parts[0][-n_rows:]

    def _make_sampling(self, opts: SamplingOptions):
        """mlx-lm's sampler and logits processors for a request (made here: they hold MLX arrays)."""
        sampler, processors = dataclasses.replace(opts, seed=None).make(special_tokens=self._eos)
        if opts.seed is not None and opts.temperature > 0:
            sampler = agree(seeded_sampler(opts.temperature, opts.top_p, opts.seed))
        return sampler, processors

    def _start_prefill(self, job: Job):
        """(job, iterator of prefill chunks, join) for a job; `join()` puts it into the decode batch."""
        p, flash_rows = job.prompt, None
        if self._flash and p.images:
            p, flash_rows, _ = route_prompt(self.model, self.processor, p, self._features, self.stats)
            job.prompt = p
        cache, rest = self._prompts.fetch_nearest_cache(MODEL_KEY, p.keyed)
        if cache is None:
            cache = self.model.make_cache()
        elif not rest:  # the whole prompt is cached: run its last token again for the first logits
            trim_prompt_cache(cache, 1)
            rest = p.keyed[-1:]
        job.cached_tokens = len(p.ids) - len(rest)
        self.stats["requests"] += 1
        self.stats["cached_tokens"] += job.cached_tokens
        self.stats["prompt_cache_hits"] += job.cached_tokens > 0
        self.stats["prompt_tokens"] += len(p.ids)
        suffix = p.ids[job.cached_tokens:]
        sampler, processors = self._make_sampling(job.sampling)
        processors = processors + budget_processors(job.thinking_budget, self.processor.tokenizer)
        rule = job.rule or constraint(self.model, self.processor, job.response_format, self._eos)  # followers
        processors = processors + ([rule] if rule is not None else [])
        if len(suffix) > 1:
            n_image = sum(1 for t in suffix[:-1] if t == self.processor.image_token_id)
            rows = self._image_rows(p, n_image) if flash_rows is None else (
                flash_rows[flash_rows.shape[0] - n_image:] if n_image else None)
            steps = stream_prefill(self.model, suffix[:-1], rows, cache, self.prefill_step_size)
        else:
            steps = iter(())

        def join():
            (uid,) = self._batch.insert([[suffix[-1]]], max_tokens=[p.max_tokens], caches=[cache],
                                        all_tokens=[list(p.ids[:-1])], samplers=[sampler],
                                        logits_processors=[processors], stop_sequences=[self._stop_tokens])
            # As mlx-lm's server: the caches of running jobs count against the prompt cache's budget too.
            self._prompts.trim_to(n_bytes=self._prompts.max_bytes - self._batch.prompt_cache_nbytes)
            detok = self.processor.tokenizer.detokenizer
            detok.reset()
            return uid, detok

        return job, steps, join

    def _store(self, job: Job, cache, tokens: List[int]) -> None:
        """Keep a finished (or stopped) job's KV cache for the next turn of its conversation."""
        n = len(job.prompt.ids)
        self._prompts.insert_cache(MODEL_KEY, job.prompt.keyed + list(tokens[n:]), cache)

    def _decode_step(self, active: dict) -> None:
        _, responses = self._batch.next()
        tok = self.processor.tokenizer
        done = []
        for r in responses:
            job, detok = active[r.uid]
            job.generated += 1
            self.stats["generated_tokens"] += 1
            if job.generated == 1:
                self.on_first_token(time.monotonic() - job.arrived)
            finish = r.finish_reason
            if finish != "stop":  # the end token itself is not part of the reply
                if r.token not in self._skip or r.token in job.keep_tokens:
                    detok.add_token(r.token)
                if job.top_logprobs is not None:
                    job.logprobs.append(self._logprob(r, job.top_logprobs, tok))
            if finish is not None:
                detok.finalize()
            job.text += detok.last_segment
            if job.stop and finish != "stop":
                cut = min((i for i in (job.text.find(s, max(0, job.sent - max(map(len, job.stop))))
                                       for s in job.stop) if i >= 0), default=-1)
                if cut >= 0:
                    job.text, finish = job.text[:cut], "stop"
                    if r.finish_reason is None:
                        cache, tokens = self._batch.remove([r.uid], return_prompt_caches=True)[r.uid]
                        self._store(job, cache, tokens)
            if finish is not None:
                if r.finish_reason is not None:
                    self._store(job, r.prompt_cache, r.all_tokens)
                done.append(r.uid)
                self._finish(job, finish)
            elif job.dropped:
                cache, tokens = self._batch.remove([r.uid], return_prompt_caches=True)[r.uid]
                self._store(job, cache, tokens)
                done.append(r.uid)
                self._finish(job, "cancelled")
            else:
                self._emit_ready(job)
        for uid in done:
            active.pop(uid, None)

    def _emit_ready(self, job: Job) -> None:
        """Send the text that can no longer change: not leading or trailing whitespace (the reply is stripped, as
        upstream strips it) and not a possible start of a stop string."""
        if job.lead is None:
            stripped = job.text.lstrip()
            if not stripped:
                return
            job.lead = len(job.text) - len(stripped)
        end = len(job.text.rstrip())
        if job.stop:
            end = min(end, len(job.text) - max(map(len, job.stop)) + 1)
        start = max(job.sent, job.lead)
        if end > start or job.logprobs:
            job.emit(("delta", job.text[start:max(end, start)], job.logprobs))
            job.logprobs = []
            job.sent = max(end, start)

    @staticmethod
    def _logprob(r, top_n: int, tok):
        lp = r.logprobs
        top = []
        if top_n > 0:
            idx = mx.argpartition(-lp, kth=top_n - 1)[:top_n]
            vals = lp[idx]
            order = mx.argsort(-vals)
            top = [(tok.decode([i]), v) for i, v in zip(idx[order].tolist(), vals[order].tolist())]
        return (tok.decode([r.token]), lp[r.token].item(), top)
