"""Load on the server for every rope kind: 8 concurrent `openai` clients, two requests each (text and images, some
streamed), on a tiny checkpoint per kind whose rope limit sits among the requests' lengths. Every reply equals,
token for token, the reply the same request gets alone; the engine decoded at least 4 rows at once (its own
`max_batch` statistic); nothing errors.

Where a kind has an original length below the context (longrope, yarn, llama3), the requests sit around it (some
end below it, some cross it while decoding, some start above it), so longrope, whose factors depend on the length,
would differ under load unless each row gets those of its own length. Dynamic NTK scales only past
`max_position_embeddings`, which is also the context the server accepts, so here its rows all sit below the limit
(the batch must not fail on them); `test_rope_batch.py` decodes past it.
"""

import concurrent.futures as cf
import json
import time
import urllib.request

import pytest

from builders import rope_case
from server_util import IMG1, IMG2, serving, user

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

MAX_TOKENS = 20
LIMIT = 200  # the prompts below are 55 and 189-254 tokens long
REQUESTS = [[user("Hi.")], [user("What is in the image?", IMG1)],
            [user("Describe both of them in detail.", IMG1, IMG2)],
            [user("Count to ten, slowly and carefully, please, in words.")], [user("Name it.", IMG2)],
            [user("What is it?", IMG1), {"role": "assistant", "content": "A photo."}, user("Which colours?")],
            [{"role": "system", "content": "Be brief."}, user("Why is the sky blue?")], [user("A city.")]]
# One checkpoint per rope kind, over the backbones whose configs carry it.
KINDS = [("qwen2", "dynamic"), ("internlm2", "dynamic"), ("phi3", "longrope"), ("llama", "llama3"), ("qwen3", "yarn"),
         ("internlm2", "linear"), ("qwen3_moe", "default")]


def ask(client, msgs, stream: bool):
    """([(token text, log-probability)], prompt tokens) of a greedy reply, read from its logprobs."""
    kw = dict(model="tiny", messages=msgs, max_tokens=MAX_TOKENS, logprobs=True)
    if not stream:
        r = client.chat.completions.create(**kw)
        return [(t.token, t.logprob) for t in r.choices[0].logprobs.content], r.usage.prompt_tokens
    tokens, prompt = [], None
    for c in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if c.choices and c.choices[0].logprobs:
            tokens += [(t.token, t.logprob) for t in c.choices[0].logprobs.content]
        if c.usage:
            prompt = c.usage.prompt_tokens
    return tokens, prompt


def same_tokens(a, b) -> bool:
    """The same tokens, each chosen with the same log-probability (within float32 noise of a batched matmul): two
    token ids that print alike (byte pieces) still differ in the probability they were chosen with."""
    return [t for t, _ in a] == [t for t, _ in b] and all(abs(x - y) < 1e-3 for (_, x), (_, y) in zip(a, b))


@pytest.mark.parametrize("text,kind", KINDS, ids=[f"{t}-{k}" for t, k in KINDS])
def test_8_clients_reply_as_alone(build_case, text, kind):
    limit = 512 if kind == "dynamic" else LIMIT  # dynamic: max_position_embeddings, the server's context
    built = build_case(rope_case(f"load_{text}_{kind}", text, kind, limit))
    with serving(built.original_dir, max_tokens=MAX_TOKENS, max_tiles=2, decode_concurrency=8) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        alone = [ask(client, m, stream=False) for m in REQUESTS]
        if kind in ("longrope", "yarn", "llama3"):
            ends = [(p, p + len(t)) for t, p in alone]
            assert any(e <= LIMIT for _, e in ends) and any(p > LIMIT for p, _ in ends), ends
            assert any(p <= LIMIT < e for p, e in ends), ends

        def client_run(c):
            return [(i, ask(client, REQUESTS[i], stream=(i + c) % 3 == 0)[0])
                    for i in ((c + k * 3) % len(REQUESTS) for k in range(2))]

        t = time.monotonic()
        with cf.ThreadPoolExecutor(8) as pool:
            results = [r for rs in pool.map(client_run, range(8), timeout=240) for r in rs]
        assert time.monotonic() - t < 240
        assert len(results) == 16
        for i, tokens in results:
            assert same_tokens(tokens, alone[i][0]), f"request {i}: reply under load differs from the reply alone"
        with urllib.request.urlopen(url + "/health") as r:
            health = json.load(r)
        assert health["status"] == "ok"
        assert health["stats"]["max_batch"] >= 4, health["stats"]  # requests really decoded together
