"""The Flash router with prompt-cache files and the context-length check, on a tiny Flash model built in memory
(the test suite's 448 px Qwen2 case plus seeded router and mlp2 weights; no upstream code needed).

A file made with the router on caches the compressed prompt and the router's decisions; it serves router-on requests
with the tokens of a run without the file, and is refused for a full-resolution request (and the other way round),
although the image and the full-resolution text are the same: the KV cache of the compressed prompt is not the
full-resolution one, so a key blind to the router would reuse it wrongly.
"""

import mlx.core as mx
import numpy as np
import pytest
from flash_models import CASE, FLASH_PREFIXES, IMG1, LATER, flash_model, spy_vit
from flash_models import with_context as context_processor
from mlx.utils import tree_flatten

import mlx_internvl
from mlx_internvl.chat import ChatSession
from mlx_internvl.errors import UserError
from mlx_internvl.flash import route
from mlx_internvl.generate import stream_generate
from mlx_internvl.prompt_cache import PromptCacheFile, cached_prefix, image_hashes, save_prompt_cache_file
from mlx_internvl.speculative import Draft


@pytest.fixture(scope="module")
def flash(build_case):
    base, processor = mlx_internvl.load(build_case(CASE).original_dir, dtype="float32")
    return flash_model(base, 0.5, 0.0), processor  # the tiles above the request's median score are compressed


def tokens(model, processor, prompt, images, **kw):
    pieces = list(stream_generate(model, processor, prompt, images, max_tokens=6, max_tiles=4, **kw))
    return [p.token for p in pieces], pieces[-1]


def test_file_made_with_the_router_serves_router_requests_only(flash, tmp_path):
    model, processor = flash
    f = tmp_path / "routed.safetensors"
    pcf = save_prompt_cache_file(model, processor, f, "", [IMG1], max_tiles=4)
    assert pcf.router and any(pcf.router["compress"]) and not all(pcf.router["compress"])
    full_opening = cached_prefix(processor, "", pcf.num_tiles)
    image = processor.image_token_id
    assert pcf.token_ids.count(image) == full_opening.count(image) - 192 * sum(pcf.router["compress"])

    q = "What is in the picture?"
    plain, last_plain = tokens(model, processor, q, [IMG1])
    cached, last = tokens(model, processor, q, [IMG1], prompt_cache_file=f)
    assert cached == plain and last.router == last_plain.router
    assert last.prompt_tokens == last_plain.prompt_tokens - len(pcf.token_ids)  # only the text after the file ran

    # The same image and the same full-resolution text: only the router tells the two apart, and the file's KV
    # (the compressed opening) is not the full-resolution one, so reusing it would be wrong.
    inputs = processor(q, images=[IMG1], max_tiles=4)
    ids = inputs["input_ids"][0].tolist()
    assert image_hashes(inputs["pixel_values"], inputs["num_tiles"]) == pcf.image_hashes
    assert ids[:len(full_opening)] == full_opening
    full_kv = model.make_cache()
    for _ in model.prefill(full_opening, model.extract_feature(inputs["pixel_values"]), full_kv):
        pass
    assert full_kv[0].offset != pcf.fresh_cache()[0].offset
    with pytest.raises(UserError, match="made with the Flash router on.*--flash"):
        tokens(model, processor, q, [IMG1], prompt_cache_file=f, flash=False)


def test_file_made_at_full_resolution_is_refused_with_the_router_on(flash, tmp_path):
    model, processor = flash
    f = tmp_path / "full.safetensors"
    pcf = save_prompt_cache_file(model, processor, f, "", [IMG1], max_tiles=4, flash=False)
    assert pcf.router is None and PromptCacheFile.load(f, model).router is None
    q = "Describe it."
    assert tokens(model, processor, q, [IMG1], prompt_cache_file=f, flash=False)[0] == tokens(
        model, processor, q, [IMG1], flash=False)[0]
    with pytest.raises(UserError, match="made at full resolution.*--no-flash"):
        tokens(model, processor, q, [IMG1], prompt_cache_file=f)


def test_cached_tiles_must_be_decided_as_the_file_says(flash, build_case, tmp_path):
    """The same weights with other thresholds (an edited config.json) route the cached tiles otherwise: the file's
    KV holds the other decisions, so it is refused, though the weights identity matches."""
    model, processor = flash
    f = tmp_path / "one.safetensors"
    pcf = save_prompt_cache_file(model, processor, f, "", [IMG1], max_tiles=4)
    base, _ = mlx_internvl.load(build_case(CASE).original_dir, dtype="float32")
    other = flash_model(base, 0.0, 0.0)  # every tile above the lowest score compressed
    assert route(np.array(pcf.router["p0"], np.float32), 0.0, 0.0).tolist() != pcf.router["compress"]
    with pytest.raises(UserError, match=r"decides the cached tiles as \[(low|full)"):
        tokens(other, processor, "Describe it.", [IMG1], prompt_cache_file=f)


def test_context_check_counts_the_routed_prompt(flash, build_case):
    """A prompt too long at full resolution but not once routed runs with the router on (its reply limit counted
    from the routed length) and is refused at full resolution; one too long even routed is refused after routing."""
    model, processor = flash
    q = "What is it?"
    full = len(processor(q, images=[IMG1], max_tiles=4)["input_ids"][0])
    routed = next(stream_generate(model, processor, q, [IMG1], max_tokens=1, max_tiles=4)).prompt_tokens
    assert routed < full - 300

    def with_context(n):
        return context_processor(build_case(CASE).original_dir, model, n)

    short = with_context(routed + 3)
    pieces = list(stream_generate(model, short, q, [IMG1], max_tokens=50, max_tiles=4))
    assert pieces[-1].prompt_tokens == routed and len(pieces) == 3 and pieces[-1].finish_reason == "length"
    with pytest.raises(UserError, match=f"the prompt is {full} tokens but the model's context is {routed + 3}"):
        next(stream_generate(model, short, q, [IMG1], max_tiles=4, flash=False))
    with pytest.raises(UserError, match=f"the prompt is {routed} tokens but the model's context is {routed}"):
        next(stream_generate(model, with_context(routed), q, [IMG1], max_tiles=4))
    least = full - 4 * 192  # five tiles: all but the lowest-scored one could be compressed
    with pytest.raises(UserError, match=f"at least {least} even if the Flash router compresses"):
        with_context(least)(q, images=[IMG1], max_tiles=4, routed=True)


@pytest.fixture
def vit_calls(monkeypatch):
    return spy_vit(monkeypatch)


def test_chat_session_uses_a_router_file_as_generate_does(flash, build_case, tmp_path, vit_calls):
    """`ChatSession` with a file made with the router on gives, over two turns, the tokens of a session without it
    and of `stream_generate` over the whole conversation. Its first turn runs only what follows the cached prompt
    and no ViT (the cached tiles' scores come from the file). The second turn adds an image next to which the router
    decides a cached tile otherwise: the kept cache is reused only up to that tile, whose rows are then computed."""
    model, processor = flash
    f = tmp_path / "chat.safetensors"
    pcf = save_prompt_cache_file(model, processor, f, "", [IMG1], max_tiles=4)
    turns = (("What is it?", [IMG1]), ("And this one?", [LATER]))
    n1, n2 = (processor.image_tiles(ims, 4)[0].shape[0] for _, ims in turns)

    def two_turns(**kw):
        session, out = ChatSession(model, processor, max_tokens=6, max_tiles=4, **kw), []
        for q, ims in turns:
            before = len(vit_calls)
            pieces = list(session.stream(q, images=ims))
            out.append(([p.token for p in pieces], pieces[-1].prompt_tokens, vit_calls[before:], session.router))
        return out, session

    (plain, p2), (cached, _) = two_turns(), two_turns(prompt_cache_file=f)
    decided = [[m.startswith("low") for m in t[3].split(": ")[-1].split()] for t in plain]
    assert decided[0] != decided[1][:n1] and decided[0] == pcf.router["compress"]  # the case in point
    assert [t[0] for t in cached] == [t[0] for t in plain] and [t[3] for t in cached] == [t[3] for t in plain]
    (q1, a1), (q2, _) = p2.history
    whole = list(stream_generate(model, processor, q2, [IMG1, LATER], history=[(q1, a1)], max_tokens=6, max_tiles=4))
    assert [p.token for p in whole] == plain[1][0]
    assert cached[0][1] == plain[0][1] - len(pcf.token_ids)  # only the text after the cached prompt ran
    assert (plain[0][2], cached[0][2]) == ([n1], [])  # the cached image's ViT did not run
    assert (plain[1][2], cached[1][2]) == ([n2], [n2, n1])  # its rows from the re-decided tile on are needed now
    assert cached[1][1] == plain[1][1] < whole[-1].prompt_tokens
    drafted, _ = two_turns(prompt_cache_file=f, draft=Draft.self_draft(model, 8, num_draft_tokens=2))
    assert [t[0] for t in drafted] == [t[0] for t in plain]  # a draft sharing the ViT takes the routed rows too


def test_chat_session_refuses_a_file_it_cannot_use(flash, build_case, tmp_path):
    model, processor = flash
    routed, full = tmp_path / "routed.safetensors", tmp_path / "full.safetensors"
    save_prompt_cache_file(model, processor, routed, "", [IMG1], max_tiles=4)
    save_prompt_cache_file(model, processor, full, "", [IMG1], max_tiles=4, flash=False)
    with pytest.raises(UserError, match="made with the Flash router on.*--flash"):
        ChatSession(model, processor, prompt_cache_file=routed, flash=False)
    with pytest.raises(UserError, match="made at full resolution.*--no-flash"):
        ChatSession(model, processor, prompt_cache_file=full)
    base, _ = mlx_internvl.load(build_case(CASE).original_dir, dtype="float32")
    session = ChatSession(flash_model(base, 0.0, 0.0), processor, max_tokens=2, max_tiles=4, prompt_cache_file=routed)
    with pytest.raises(UserError, match=r"decides the cached tiles as \[(low|full)"):
        session.ask("Describe it.", images=[IMG1])
    assert session.num_images == 0 and not session.history  # the failed turn left nothing behind


def test_lora_trains_at_full_resolution_with_the_router_frozen(build_case):
    """As upstream's Flash `forward`: the training loss sees every tile through mlp1 (256 tokens each), and a step
    that trains the LLM adapters and mlp1 leaves the router and mlp2 as they were."""
    import mlx.nn as nn

    from mlx_internvl.adapters import LoraConfig, apply_lora, trainable_weights
    from mlx_internvl.lora.batching import collate
    from mlx_internvl.lora.render import Encoded
    from mlx_internvl.lora.trainer import TrainingArgs, make_optimizer, make_step

    base, processor = mlx_internvl.load(build_case(CASE).original_dir, dtype="float32")
    model = flash_model(base, 0.5, 0.0)
    apply_lora(model, LoraConfig(rank=4, train_projector="full"))
    assert not [k for k in trainable_weights(model) if k.startswith(FLASH_PREFIXES)]
    inputs = processor("What is it?", images=[IMG1], max_tiles=4)
    ids = np.array(inputs["input_ids"][0].tolist() + processor.tokenizer.encode("A photo."), dtype=np.int32)
    mask = np.zeros(len(ids), dtype=bool)
    mask[-3:] = True
    batch, _ = collate([Encoded(ids, mask, [str(IMG1)], inputs["num_tiles"], 4, "t")], model.config, 0,
                       processor.image_token_id)
    assert int(batch["image_mask"].sum()) == model.config.num_image_token * sum(inputs["num_tiles"])

    logits = model(batch["ids"], image_features=model.extract_feature(batch["pixel_values"]))[:, :-1]
    expected = (nn.losses.cross_entropy(logits, batch["ids"][:, 1:]) * batch["mask"][:, 1:]).sum()
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if k.startswith(FLASH_PREFIXES + ("mlp1.",))}
    step, state = make_step(model, make_optimizer(TrainingArgs(lr=1e-2), 2), frozen_features=False, compile=False)
    ce, n, _ = step(batch, None, True, mx.array(1.0))
    mx.eval(state, ce)
    assert abs(float(ce) - float(expected)) < 1e-3 * max(1.0, abs(float(expected)))
    after = dict(tree_flatten(model.parameters()))
    assert all(np.array_equal(before[k], np.array(after[k])) for k in before if k.startswith(FLASH_PREFIXES))
    assert any(not np.array_equal(before[k], np.array(after[k])) for k in before if k.startswith("mlp1."))
