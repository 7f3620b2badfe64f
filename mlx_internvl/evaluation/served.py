"""`eval --server URL`: the same evaluation against a running `mlx-internvl serve`, through the `openai` client.

Each question is one chat-completions request: the question text exactly as the local run builds it (VLMEvalKit's
prompt, with InternVL's `<image>` placeholders where the wrapper puts them), the images as data URLs (each cell's
own bytes; MMMU's upscaled first image as PNG), the benchmark's tile limit as the `max_tiles` extra, greedy
decoding (`temperature` 0) and the same `max_tokens`. Up to `concurrency` requests are in flight (the server
batches them); replies are written in file order, so the predictions file is the one a local run writes, and an
interrupted run resumes the same way.
"""

from __future__ import annotations

import base64
import collections
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

from PIL import Image

from mlx_internvl.errors import UserError
from mlx_internvl.evaluation import benchmarks, prompts, runner
from mlx_internvl.evaluation.benchmarks import Benchmark
from mlx_internvl.validate import integer

try:  # the `eval` extra
    import openai
except ImportError:  # pragma: no cover - depends on the install
    openai = None

DEFAULT_CONCURRENCY = 8


def data_url(file: bytes) -> str:
    """A data URL for an encoded picture, its MIME type read from the picture itself."""
    try:
        mime = Image.MIME.get(Image.open(io.BytesIO(file)).format, "image/png")
    except Exception as e:
        raise UserError(f"an image cell is not a picture Pillow can read ({e})") from e
    return f"data:{mime};base64," + base64.b64encode(file).decode()


def chat_request(bench: Benchmark, row: dict, max_tokens: int) -> dict:
    """The chat-completions arguments for one benchmark row (without `model`)."""
    files = prompts.row_image_files(bench, row)
    content = [{"type": "image_url", "image_url": {"url": data_url(f)}} for f in files]
    content.append({"type": "text", "text": prompts.question_text(bench, row, len(files))})
    return dict(messages=[{"role": "user", "content": content}], temperature=0.0, max_tokens=max_tokens,
                extra_body={"max_tiles": bench.tiles_per_image(len(files))})


def base_url(url: str) -> str:
    """The API root the `openai` client wants: `http://host:port` and `http://host:port/v1` both work."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--server {url!r}: expected an http(s) URL such as http://127.0.0.1:8080")
    return url if url.endswith("/v1") else url + "/v1"


def _client(url: str, api_key: Optional[str], timeout_s: float):
    if openai is None:
        raise UserError("eval --server needs the openai package: pip install 'mlx-internvl[eval]'")
    return openai.OpenAI(base_url=base_url(url), api_key=api_key or "none", timeout=timeout_s, max_retries=5)


def _failure(url: str, e: Exception, where: str) -> UserError:
    if openai is not None and isinstance(e, openai.APIConnectionError):
        return UserError(f"--server {url}: cannot reach the server ({e}); is `mlx-internvl serve` running there?")
    if openai is not None and isinstance(e, openai.APIStatusError):
        return UserError(f"--server {url}: {where}: the server answered {e.status_code}: {e.message}")
    return UserError(f"--server {url}: {where}: {e}")


def served_model(client, url: str) -> str:
    """The id of the (first) model the server serves."""
    try:
        models = client.models.list().data
    except Exception as e:
        raise _failure(url, e, "listing its models") from None
    if not models:
        raise UserError(f"--server {url}: the server lists no model")
    return models[0].id


def server_replies(client, url: str, model: str, concurrency: int = DEFAULT_CONCURRENCY) -> runner.Replies:
    """`runner.Replies` from the server: `concurrency` requests in flight, replies yielded in file order."""
    concurrency = integer("concurrency", concurrency, minimum=1)

    def ask(bench, row, max_tokens) -> str:
        try:
            reply = client.chat.completions.create(model=model, **chat_request(bench, row, max_tokens))
        except Exception as e:
            raise _failure(url, e, f"question {row['index']}") from None
        return reply.choices[0].message.content or ""

    def replies(bench, rows, done, max_tokens):
        pool = ThreadPoolExecutor(concurrency, thread_name_prefix="eval-request")
        window: collections.deque = collections.deque()
        try:
            for row in (r for r in rows if str(r["index"]) not in done):
                window.append((row, pool.submit(ask, bench, row, max_tokens)))
                if len(window) > concurrency:
                    row, future = window.popleft()
                    yield row, future.result()
            while window:
                row, future = window.popleft()
                yield row, future.result()
        finally:  # interrupted: what has not started is dropped, what has is left to finish on its own
            pool.shutdown(wait=False, cancel_futures=True)
    return replies


def evaluate_served(url: str, bench_name: str, data_path, out_dir, *, model: Optional[str] = None,
                    api_key: Optional[str] = None, concurrency: int = DEFAULT_CONCURRENCY, timeout_s: float = 3600.0,
                    **options) -> Tuple[runner.RunInfo, object]:
    """`runner.evaluate` against the server at `url` (its first model unless `model` names one); `options` as
    `runner.evaluate_with` (limit, max_tokens, progress)."""
    benchmarks.resolve(bench_name)  # a bad name fails before the server is asked anything
    client = _client(url, api_key, timeout_s)
    model = model or served_model(client, url)
    name = model.replace("/", "_")
    return runner.evaluate_with(server_replies(client, url, model, concurrency), bench_name, data_path, out_dir,
                                model_name=name, batch_size=concurrency, server=url, **options)
