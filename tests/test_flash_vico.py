"""ViCO's two training stages on a tiny Flash model (the suite's 448 px Qwen2 case plus seeded router and mlp2):
`--train-flash mlp2` (consistency) and `--train-flash router`.

The training views are checked against the inference path (`compress_ids`, `flash_tiles`, `select_features` and the
model's own forward, which tests/test_flash.py holds to the Flash repo's code): the compressed prompt a training row
sees is the one routing builds, its logits are inference's logits, the KL and the loss ratios are recomputed here
from those logits. Then each stage trains what it should and nothing else, and the router stage resumes exactly.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from flash_models import CASE, IMG1, IMG2, flash_model
from mlx.utils import tree_flatten

import mlx_internvl
from mlx_internvl.adapters import LoraConfig, apply_lora
from mlx_internvl.errors import UserError
from mlx_internvl.flash import compress_ids, select_features
from mlx_internvl.lora import TrainingArgs, finetune, fuse
from mlx_internvl.lora.batching import collate
from mlx_internvl.lora.fuse import save_mlx_model
from mlx_internvl.lora.render import Encoded
from mlx_internvl.lora.trainer import make_optimizer, make_step
from mlx_internvl.lora.vico import (
    WINDOW_KEY,
    FlashBatcher,
    RouterLabeler,
    _pad,
    consistency_loss_sum,
    feature_table,
    patch_features,
    routed_logits,
    router_loss_sum,
    view_rows,
)

ANSWER = " A photo of a street."
ROUTER = ("gating.", "pooling_before_gating.")


@pytest.fixture(scope="module")
def flash(build_case, tmp_path_factory):
    built = build_case(CASE)
    base, processor = mlx_internvl.load(built.original_dir, dtype="float32")
    model = flash_model(base, 0.5, 0.0)
    root = tmp_path_factory.mktemp("vico")
    path = save_mlx_model(model, built.original_dir, root / "ckpt")
    lines = [{"image": str(img), "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                   {"from": "gpt", "value": answer}]}
             for img, answer in ((IMG1, "A street."), (IMG2, "A cat."))]
    (root / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path, processor, root / "train.jsonl"


def fresh(flash):
    return mlx_internvl.load(flash[0], dtype="float32")[0]


def sample(processor, image=IMG1, max_tiles=4):
    inputs = processor("What is it?", images=[image], max_tiles=max_tiles)
    answer = processor.tokenizer.encode(ANSWER)
    ids = np.array(inputs["input_ids"][0].tolist() + answer, dtype=np.int32)
    mask = np.zeros(len(ids), dtype=bool)
    mask[-len(answer):] = True
    return Encoded(ids, mask, [str(image)], inputs["num_tiles"], max_tiles, "t"), inputs, len(answer)


def inference_logits(model, ids, pixel_values, compress):
    """Logits of the routed prompt as generation builds it (ids cut by `compress_ids`, rows by `select_features`)."""
    cfg = model.config
    routed = compress_ids(ids.tolist(), model.image_token_id, compress, cfg.num_image_token, cfg.flash_image_token)
    feats = select_features(model.flash_tiles(pixel_values), np.array(compress))
    return model(mx.array([routed]), image_features=feats)[0].astype(mx.float32), len(routed)


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_consistency_loss_is_kl_to_the_full_resolution_model_on_the_routed_prompt(flash):
    """The training row is inference's routed prompt (ids and logits), and the loss is KL(checkpoint at full
    resolution || adapted model on that prompt), summed over answer tokens."""
    _, processor, _ = flash
    model = fresh(flash)
    enc, inputs, n_answer = sample(processor)
    tiles = sum(enc.num_tiles)
    compress = [i % 2 == 0 for i in range(tiles)]
    pv = inputs["pixel_values"]
    full_ids = enc.ids
    reference = model(mx.array(full_ids[None]), image_features=model.extract_feature(pv))[0].astype(mx.float32)

    apply_lora(model, LoraConfig(rank=4, train_flash="mlp2"))
    mx.random.seed(0)
    bumped = [(k, v + 0.05 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.trainable_parameters())]
    model.load_weights(bumped, strict=False)  # adapters and mlp2 away from their start

    batch = routed_batch(model, processor, enc, compress)
    ours = routed_logits(model, batch, feature_table(model, patch_features(model, batch["pixel_values"])))[0]
    theirs, routed_len = inference_logits(model, full_ids, pv, compress)
    assert np.array(batch["view_ids"][0, :routed_len]).tolist() == compress_ids(
        full_ids.tolist(), model.image_token_id, compress, 256, 64)
    assert float(mx.abs(ours[:routed_len] - theirs).max()) < 1e-4

    kl, count = consistency_loss_sum(model, batch)
    ref_lp = log_softmax(np.array(reference[len(full_ids) - n_answer - 1: len(full_ids) - 1]))
    pol_lp = log_softmax(np.array(theirs[routed_len - n_answer - 1: routed_len - 1]))
    expected = float((np.exp(ref_lp) * (ref_lp - pol_lp)).sum())
    assert int(count.item()) == n_answer and expected > 1e-3
    assert abs(float(kl.item()) - expected) < 1e-3 * expected


def test_consistency_draws_are_a_function_of_the_microbatch(flash):
    _, processor, _ = flash
    encs = [sample(processor, img)[0] for img in (IMG1, IMG2)]
    cfg = fresh(flash).config

    def make(seed):
        return FlashBatcher(encs, 1, cfg, 0, processor.image_token_id, seed=seed, mode="mlp2")

    def kept(batch):
        return int((np.array(batch["view_ids"]) == processor.image_token_id).sum())

    a, b = make(3), make(3)
    draws = [kept(a.batch(k)[0]) for k in range(8)]
    assert draws == [kept(b.batch(k)[0]) for k in range(8)]  # the same stream, the same draws
    full = [int(sum(a.samples[a.indices(k)[0]].num_tiles)) * 256 for k in range(8)]
    assert any(d < f for d, f in zip(draws, full)) and any(d > f // 4 for d, f in zip(draws, full))
    assert draws != [kept(make(4).batch(k)[0]) for k in range(8)]


def routed_batch(model, processor, enc, compress):
    """A consistency microbatch of `enc` with the given tiles compressed (what FlashBatcher adds to SFT's)."""
    batch, _ = collate([enc], model.config, 0, processor.image_token_id)
    batch.update(view_rows([(enc.ids, enc.mask, 0, compress)], model.config, len(compress), 0,
                           processor.image_token_id))
    batch["answer_full"], _ = _pad([np.flatnonzero(enc.mask[1:])])
    return batch


def test_consistency_steps_bring_the_routed_model_to_the_full_resolution_one(flash):
    _, processor, _ = flash
    model = fresh(flash)
    enc = sample(processor)[0]
    batch = routed_batch(model, processor, enc, [i % 2 == 0 for i in range(sum(enc.num_tiles))])
    apply_lora(model, LoraConfig(rank=4, train_flash="mlp2"))
    start = float(consistency_loss_sum(model, batch)[0].item())
    step, state = make_step(model, make_optimizer(TrainingArgs(lr=3e-3), 100), compile=False,
                            loss=consistency_loss_sum)
    for _ in range(4):
        kl, _, _ = step(batch, None, True, mx.array(1.0))
        mx.eval(state, kl)
    assert float(consistency_loss_sum(model, batch)[0].item()) < 0.5 * start


def test_consistency_stage_trains_mlp2_beside_the_adapters(flash, tmp_path):
    path, _, data = flash
    args = TrainingArgs(iters=2, lr=3e-3, max_tiles=4, save_every=2, compile=False)
    finetune(path, data, tmp_path / "ad", lora=LoraConfig(rank=4, train_flash="mlp2"), args=args, dtype="float32",
             log=lambda *_: None)
    before = dict(tree_flatten(fresh(flash).parameters()))
    tuned = mlx_internvl.load(path, dtype="float32", adapter_path=tmp_path / "ad")[0]
    after = {k.replace(".linear.", "."): v for k, v in tree_flatten(tuned.parameters())}  # LoRA's base layers
    assert set(before) <= set(after)
    changed = {k.split(".")[0] for k in before if not np.array_equal(np.array(before[k]), np.array(after[k]))}
    assert changed == {"mlp2"}  # of the base weights only mlp2 (the LLM moves through its adapters)
    saved = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
    assert any(k.startswith("mlp2.") for k in saved) and not any(k.startswith(ROUTER) for k in saved)
    assert max(float(mx.abs(v).max()) for k, v in saved.items() if k.endswith("lora_b")) > 0
    fused = mlx_internvl.load(fuse(path, tmp_path / "ad", tmp_path / "fused")["mlx"], dtype="float32")[0]
    assert all(np.array_equal(np.array(v), np.array(after[k])) for k, v in tree_flatten(fused.parameters())
               if k.startswith(("mlp2.",) + ROUTER))


def test_router_labels_come_from_what_compressing_each_tile_costs(flash):
    """r_i from inference's routed logits; a tile below the window's median is labelled compress (class 0)."""
    _, processor, _ = flash
    model = fresh(flash)
    enc, inputs, n_answer = sample(processor, IMG2)
    tiles = sum(enc.num_tiles)
    assert tiles == 3
    pv = inputs["pixel_values"]
    answer = mx.array(enc.ids[-n_answer:])

    def nll(compress):
        logits, length = inference_logits(model, enc.ids, pv, compress)
        lp = log_softmax(np.array(logits[length - n_answer - 1: length - 1]))
        return -float(lp[np.arange(n_answer), np.array(answer)].sum())

    base = nll([False] * tiles)
    expected = np.array([nll([j == i for j in range(tiles)]) / base for i in range(tiles)])
    batcher = FlashBatcher([enc], 1, model.config, 0, processor.image_token_id, mode="router")
    opt = type("Opt", (), {"state": {}})()
    labeler = RouterLabeler(model, opt, 50.0, window=2)
    ratios, _ = labeler.ratios(batcher, [enc], collate([enc], model.config, 0, processor.image_token_id)[0])
    np.testing.assert_allclose(ratios, expected, rtol=1e-4)
    assert len(set(np.round(expected, 6))) == tiles  # distinct ratios: the median splits them

    batch, _ = collate([enc], model.config, 0, processor.image_token_id)
    labels = np.array(labeler(batcher, [enc], batch)["router_labels"])
    assert labels.tolist() == [0 if r < np.percentile(ratios, 50) else 1 for r in ratios]
    window = np.array(opt.state[WINDOW_KEY])
    assert window[-1] == tiles and np.array_equal(np.sort(window[:2]), np.sort(ratios[-2:]))
    # The next microbatch is labelled against the window (the last 2 ratios) and its own ratios together.
    again = np.array(labeler(batcher, [enc], batch, update=False)["router_labels"])
    tau = np.percentile(np.concatenate([ratios[-2:], ratios]), 50)
    assert again.tolist() == [0 if r < tau else 1 for r in ratios]


class Stop(Exception):
    pass


@pytest.mark.slow
def test_router_stage_trains_the_router_alone_and_resumes_exactly(flash, tmp_path):
    path, processor, data = flash
    args = TrainingArgs(iters=4, lr=1e-2, max_tiles=4, save_every=2, compile=False, flash_window=6)
    lora = LoraConfig(rank=4, train_flash="router")
    whole = tmp_path / "whole"
    finetune(path, data, whole, lora=lora, args=args, dtype="float32", log=lambda *_: None)

    def stop(step, _):
        if step == 2:
            raise Stop
    with pytest.raises(Stop):
        finetune(path, data, tmp_path / "cut", lora=lora, args=args, dtype="float32", log=lambda *_: None,
                 on_step=stop)
    finetune(path, data, tmp_path / "cut", lora=lora, args=args, dtype="float32", log=lambda *_: None, resume=True)
    a = mx.load(str(whole / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "cut" / "adapters.safetensors"))
    assert sorted(a) == sorted(b) and all(k.startswith(ROUTER) for k in a)
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) == 0.0

    before = dict(tree_flatten(fresh(flash).parameters()))
    tuned = mlx_internvl.load(path, dtype="float32", adapter_path=whole)[0]
    after = dict(tree_flatten(tuned.parameters()))
    changed = {k for k in before if not np.array_equal(np.array(before[k]), np.array(after[k]))}
    assert changed and all(k.startswith(ROUTER) for k in changed)
    # The router moved towards the labels of a microbatch (labelled against an empty window, as at step 1).
    enc = sample(processor)[0]
    batch, _ = collate([enc], tuned.config, 0, processor.image_token_id)
    batcher = FlashBatcher([enc], 1, tuned.config, 0, processor.image_token_id, mode="router")
    labelled = RouterLabeler(tuned, type("Opt", (), {"state": {}})(), 50.0, 6)(batcher, [enc], batch)
    batch.update(labelled)
    assert float(router_loss_sum(tuned, batch)[0].item()) < float(router_loss_sum(fresh(flash), batch)[0].item())


def test_flash_stages_refuse_what_they_cannot_do(flash, build_case, tmp_path):
    path, _, data = flash
    plain = mlx_internvl.load(build_case(CASE).original_dir, dtype="float32")[0]
    with pytest.raises(UserError, match="needs an InternVL3.5-Flash checkpoint"):
        apply_lora(plain, LoraConfig(train_flash="mlp2"))
    with pytest.raises(UserError, match="trains the router alone"):
        LoraConfig(train_flash="router", train_projector="lora").validate()
    args = TrainingArgs(iters=1, max_tiles=4, compile=False)
    with pytest.raises(UserError, match="--train-projector full would change that reference"):
        finetune(path, data, tmp_path / "a", lora=LoraConfig(train_flash="mlp2", train_projector="full"), args=args,
                 dtype="float32", log=lambda *_: None)
    with pytest.raises(UserError, match="--flash-percentile"):
        finetune(path, data, tmp_path / "b", lora=LoraConfig(train_flash="router"),
                 args=TrainingArgs(flash_percentile=120.0), dtype="float32", log=lambda *_: None)
    import mlx.nn as nn

    quantized = fresh(flash)
    nn.quantize(quantized.mlp2, group_size=32, bits=8)
    with pytest.raises(UserError, match="mlp2 is quantized in this checkpoint"):
        apply_lora(quantized, LoraConfig(train_flash="mlp2"))
    from mlx_internvl.lora.peft import peft_tensors
    with pytest.raises(UserError, match="no PEFT form"):
        peft_tensors({"mlp2.linear_1.weight": mx.zeros((2, 2))})


@pytest.mark.slow
def test_consistency_stage_on_two_processes_equals_one_with_double_accumulation(flash, tmp_path):
    """Under mlx.launch each process takes every other microbatch; the draws depend on the microbatch alone, so two
    processes train what one process does with twice the accumulation."""
    import shutil
    import sys
    from pathlib import Path

    from test_lora_distributed import free_port_pair, run

    bin_dir = Path(sys.executable).parent
    launch = shutil.which("mlx.launch", path=str(bin_dir))
    if launch is None:
        pytest.skip("mlx.launch is not installed next to this Python")
    path, _, data = flash
    exe = shutil.which("mlx-internvl", path=str(bin_dir)) or "mlx-internvl"

    def cli(out, *extra):
        return [exe, "lora", "--model", str(path), "--data", str(data), "--adapter-path", str(tmp_path / out),
                "--train-flash", "mlp2", "--rank", "4", "--iters", "2", "--lr", "3e-3", "--max-tiles", "4",
                "--seed", "3", "--no-compile", *extra]

    run(cli("one", "--grad-accum", "2"))
    run([launch, "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()), *cli("two")])
    one, two = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("one", "two"))
    assert sorted(one) == sorted(two) and any(k.startswith("mlp2.") for k in one)
    start = dict(tree_flatten(fresh(flash).parameters()))
    moved = max(float(mx.abs(one[k] - start[k]).max()) for k in one if k.startswith("mlp2."))
    same = max(float(mx.abs(one[k] - two[k]).max()) for k in one)
    assert same < 1e-5 and moved > 100 * max(same, 1e-7), (same, moved)
