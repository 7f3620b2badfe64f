"""One server over a group of ranks (`mlx.launch ... -- mlx-internvl serve`): rank 0 listens on HTTP, every rank
runs the same generation loop. Each loop turn rank 0 shares what changed — the jobs that arrived (token ids, image
tiles, sampling settings) and the ids of the jobs whose client went away — so every rank inserts into and removes
from its batch at the same step and the prompt and image-feature caches stay alike. Followers' jobs emit nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List

import numpy as np

from ..sampling import SamplingOptions
from ..structured import Grammar, ResponseFormat
from .render import ImageSpec, Prompt


def _load_tiles(job) -> None:
    """Rank 0 decodes every image before sharing, so a broken image fails there alone, before any rank uses it."""
    for spec in job.prompt.images:
        if spec.tiles is None:
            spec.tiles = spec.load()


def _payload(job) -> tuple:
    p = job.prompt
    images = [(spec.key, spec.num_tiles, spec.tiles) for spec in p.images]
    # Plain values only (the group sends JSON and raw buffers, no pickle): the sampling options as a dict.
    fmt = job.response_format
    fmt = None if fmt is None else {"kind": type(fmt).__name__, **dataclasses.asdict(fmt)}
    return (job.id, p.ids, p.keyed, images, p.max_tokens, dataclasses.asdict(job.sampling), job.stop,
            job.top_logprobs, fmt, job.thinking_budget, sorted(job.keep_tokens))


_FORMATS = {"ResponseFormat": ResponseFormat, "Grammar": Grammar}


def _format(fmt):
    if fmt is None:
        return None
    fmt = dict(fmt)
    return _FORMATS[fmt.pop("kind")](**fmt)


def _unavailable():
    raise RuntimeError("a follower rank has the image tiles already")


def exchange(group, stop: bool, new: list, dropped: List[int], fail: Callable, job_type) -> tuple:
    """(stop, new jobs, dropped ids) as rank 0 has them, on every rank."""
    if group.is_leader:
        ready = []
        for job in new:
            try:
                _load_tiles(job)
            except Exception as e:  # the job ends here, on rank 0 only: the others never heard of it
                fail(job, e)
                continue
            ready.append(job)
        group.share((stop, [_payload(j) for j in ready], dropped))
        return stop, ready, dropped
    stop, payloads, dropped = group.share(None)
    jobs = []
    for (job_id, ids, keyed, images, max_tokens, sampling, stops, top, fmt, budget, keep) in payloads:
        specs = [ImageSpec(key, n, np.asarray(tiles), _unavailable) for key, n, tiles in images]
        # A constraint (JSON or forced tool calls) and a thinking budget change rank 0's logits; every rank must
        # change them alike or their sampled tokens differ.
        jobs.append(job_type(prompt=Prompt(ids, keyed, specs, max_tokens), sampling=SamplingOptions(**sampling),
                             emit=lambda ev: None, stop=stops, top_logprobs=top, id=job_id,
                             response_format=_format(fmt), thinking_budget=budget, keep_tokens=frozenset(keep)))
    return stop, jobs, dropped
