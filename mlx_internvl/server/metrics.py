"""`GET /metrics`: the server's counters in Prometheus' text format, by `prometheus_client` (the Prometheus
project's own library: pure Python, no dependencies).

Tokens and cache hits are the engine's own counters (`Engine.stats`, kept on the generation thread), read when
Prometheus scrapes, so nothing is counted twice. The time to first token is observed by the engine when a job's
first token comes (from its request's arrival: queueing, media, prefill included); requests are counted by route
and status as they are answered; queue depth and requests in flight are read at scrape time. Each app has its own
registry, so several servers in one process do not mix their figures.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response

PREFIX = "mlx_internvl"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# engine.stats key -> (metric name, help)
_COUNTERS = {
    "requests": ("generations", "Requests that reached the generation thread"),
    "prompt_tokens": ("prompt_tokens", "Prompt tokens of those requests, cached ones included"),
    "cached_tokens": ("prompt_cached_tokens", "Prompt tokens taken from the prompt cache instead of prefilled"),
    "prompt_cache_hits": ("prompt_cache_hits", "Requests whose prompt began with a cached prefix"),
    "generated_tokens": ("generated_tokens", "Tokens generated (end tokens included)"),
    "vision_hits": ("vision_cache_hits", "Images whose features came from the vision cache"),
    "vision_misses": ("vision_cache_misses", "Images encoded by the vision model"),
}


class _EngineCollector:
    """The engine's counters and queue, as Prometheus reads them at each scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        for key, (name, doc) in _COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=stats.get(key, 0))
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests handed to the generation thread and not yet "
                                "decoding (waiting for a slot or prefilling)", value=self.engine.queue_depth)
        yield GaugeMetricFamily(f"{PREFIX}_requests_inflight", "Generation slots held (requests being read, "
                                "rendered, queued or decoded)", value=self.engine.inflight)


class Metrics:
    """One app's registry: its request counter, time-to-first-token histogram and engine collector."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered, by route and status",
                                ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "From a request's arrival to its first "
                              "generated token", buckets=TTFT_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        engine.on_first_token = self.ttft.observe

    def text(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: counts each HTTP request by its route's path template (not the raw path, so ids and
    scanners' paths do not make new series) and the status it was answered with (500 if it raised)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()


async def metrics_route(request: Request):
    return Response(request.app.state.metrics.text(), media_type=CONTENT_TYPE_LATEST)
