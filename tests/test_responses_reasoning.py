"""A thinking model through `/v1/responses`: the think block is a `reasoning` output item ahead of the message,
created and streamed (`response.reasoning_text.delta`) as the `openai` client reads them, `reasoning.effort`
switches thinking as `reasoning_effort` does for chat completions, and only the answer is carried into the next
turn by `previous_response_id`. The model's tokens are scripted (test_thinking.scripted) on random weights."""

import pytest
from test_thinking import CASE, scripted, tiny  # noqa: F401  (tiny is a fixture)

from mlx_internvl.sampling import SamplingOptions

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


def test_reasoning_item_created_and_streamed(tiny, build_case, monkeypatch):  # noqa: F811
    from server_util import serving

    _, processor, hf, t = tiny
    think, end, a, b, c, stop = t["<think>"], t["</think>"], t["a"], t["b"], t["c"], t["<|im_end|>"]
    script = [think, a, a, end] + t["nl"] + [b, c, stop]
    with serving(build_case(CASE).original_dir, thinking=False) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        monkeypatch.setattr(SamplingOptions, "make", scripted(script))
        r = client.responses.create(model="tiny", input="Q", reasoning={"effort": "high"}, max_output_tokens=20)
        assert [o.type for o in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == "aa" and r.output_text == "bc" and r.status == "completed"
        assert r.usage.input_tokens == len(processor.render("Q", thinking=True).ids)  # the card's thinking prompt
        assert r.usage.output_tokens_details.reasoning_tokens == 4  # <think> a a </think>
        monkeypatch.setattr(SamplingOptions, "make", scripted(script))
        with client.responses.stream(model="tiny", input="Q", reasoning={"effort": "high"},
                                     max_output_tokens=20) as s:
            events = list(s)
            final = s.get_final_response()
        kinds = [e.type for e in events]
        assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
        assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "aa"
        assert [e.item.type for e in events if e.type == "response.output_item.done"] == ["reasoning", "message"]
        assert final.output_text == "bc" and final.output[0].content[0].text == "aa"
        # the next turn sees the answer only, as a chat client that keeps answers sends it
        monkeypatch.setattr(SamplingOptions, "make", scripted([b, stop]))
        nxt = client.responses.create(model="tiny", input="Why?", previous_response_id=r.id,
                                      reasoning={"effort": "none"})
        chat = client.chat.completions.create(model="tiny", reasoning_effort="none", messages=[
            {"role": "user", "content": "Q"}, {"role": "assistant", "content": "bc"},
            {"role": "user", "content": "Why?"}])
        assert nxt.usage.input_tokens == chat.usage.prompt_tokens
        assert [o.type for o in nxt.output] == ["message"]
