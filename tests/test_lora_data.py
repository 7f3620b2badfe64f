"""LoRA data: the three input formats, the meta json, the loss mask, truncation and the bad-line report."""

import json

import numpy as np
import pytest
from PIL import Image

import mlx_internvl
from builders import Case
from mlx_internvl.errors import UserError
from mlx_internvl.lora.batching import Batcher, encode_dataset
from mlx_internvl.lora.data import load_dataset
from mlx_internvl.lora.render import encode_sample
from mlx_internvl.lora.trainer import TrainingArgs

CASES = {
    "internvl2_5": Case("lora_data_qwen2"),
    "Hermes-2": Case("lora_data_hermes", template="Hermes-2"),
    "internlm2-chat": Case("lora_data_internlm2", text="internlm2", template="internlm2-chat"),
    "phi3-chat": Case("lora_data_phi3", text="phi3", template="phi3-chat"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_images")
    Image.new("RGB", (56, 56), (200, 10, 10)).save(d / "a.png")
    Image.new("RGB", (112, 56), (10, 10, 200)).save(d / "wide.png")
    return d


def processor_for(build_case, template):
    built = build_case(CASES[template])
    _, proc = mlx_internvl.load(built.original_dir, dtype="float32", lazy=True)
    assert proc.template.name == template
    return proc


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_three_formats_give_the_same_tokens(build_case, images, tmp_path):
    proc = processor_for(build_case, "internvl2_5")
    records = [
        {"image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"query": "Sure?", "response": "Yes.", "history": [["<image>\nWhat is it?", "A red square."]],
         "images": ["a.png"]},
        {"messages": [
            {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]},
        {"messages": [{"role": "user", "content": "<image>\nWhat is it?"},
                      {"role": "assistant", "content": "A red square."},
                      {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}],
         "images": ["a.png"]},
    ]
    ds = load_dataset(write_jsonl(tmp_path / "mixed.jsonl", records), root=images)
    assert ds.problems == []
    encoded = [encode_sample(s, proc) for s in ds.samples]
    for e in encoded[1:]:
        np.testing.assert_array_equal(e.ids, encoded[0].ids)
        np.testing.assert_array_equal(e.mask, encoded[0].mask)
    assert encoded[0].num_tiles == [1]


@pytest.mark.parametrize("template", list(CASES))
def test_mask_is_answers_and_stop_tokens_and_prompts_match_inference(build_case, images, template):
    proc = processor_for(build_case, template)
    tok = proc.tokenizer
    stop = proc.template.stop_str
    q1, a1, q2, a2 = "<image>\nWhat is it?", "A red square.", "Sure?", "Quite sure."
    ds_path = images / f"mask_{template}.jsonl"
    write_jsonl(ds_path, [{"image": "a.png", "conversations": [
        {"from": "human", "value": q1}, {"from": "gpt", "value": a1},
        {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]}])
    enc = encode_sample(load_dataset(ds_path).samples[0], proc)
    # Learned tokens: exactly the two answers, each with the stop token that ends its turn.
    assert tok.decode(enc.ids[enc.mask].tolist()) == a1 + stop + a2 + stop
    runs = np.flatnonzero(np.diff(np.concatenate([[0], enc.mask.astype(int), [0]])))
    assert len(runs) == 4  # two separate spans
    stop_id = tok.convert_tokens_to_ids(stop)
    assert all(enc.ids[end - 1] == stop_id for end in runs[1::2])
    # The prompt before each answer is token for token what generation feeds the model for that turn.
    first = proc(q1, images=[images / "a.png"])["input_ids"][0].tolist()
    assert enc.ids[: runs[0]].tolist() == first
    second = proc(q2, images=[images / "a.png"], history=[(q1, a1)])["input_ids"][0].tolist()
    assert enc.ids[: runs[2]].tolist() == second
    if template == "internlm2-chat":
        assert enc.ids[0] == tok.convert_tokens_to_ids("<s>") and not enc.mask[0]


def test_truncation_cuts_text_after_images_and_never_inside_them(build_case, images, tmp_path):
    proc = processor_for(build_case, "internvl2_5")
    long_answer = "word " * 200
    path = write_jsonl(tmp_path / "long.jsonl", [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                             {"from": "gpt", "value": long_answer}]}])
    sample = load_dataset(path, root=images).samples[0]
    full = encode_sample(sample, proc)
    img_end = int(np.flatnonzero(full.ids == proc.tokenizer.convert_tokens_to_ids("</img>"))[-1])
    cut = encode_sample(sample, proc, max_length=img_end + 40)
    assert cut.truncated and len(cut.ids) == img_end + 40
    np.testing.assert_array_equal(cut.ids, full.ids[: img_end + 40])
    assert cut.mask.any()
    with pytest.raises(Exception, match=r"images end at token .*past --max-length"):
        encode_sample(sample, proc, max_length=img_end)


def test_every_bad_line_is_reported_with_file_line_and_reason(build_case, images, tmp_path):
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Red."}]}
    lines = [
        good,
        "{not json",
        "[1, 2]",
        {"text": "hello"},
        {"image": "missing.png", "conversations": good["conversations"]},
        {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"conversations": [{"from": "human", "value": "only a question"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image><image> two?"},
                                             {"from": "gpt", "value": "no"}]},
        {"video": "v.mp4", "conversations": good["conversations"]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"query": "q", "response": "r", "history": "nope"},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    ds = load_dataset(path, root=images)
    assert len(ds.samples) == 1
    expected = {2: "not valid JSON", 3: "expected a JSON object", 4: "unknown format", 5: "image not found",
                6: "turns must alternate", 7: "ends with a user turn", 8: "2 <image> placeholder(s) for 1 image",
                9: "video samples are not supported", 10: "role is 'robot'", 11: "'history' must be a list"}
    assert len(ds.problems) == len(expected)
    for problem, (line, why) in zip(ds.problems, sorted(expected.items())):
        assert problem.startswith(f"{path}:{line}: ") and why in problem, problem
    proc = processor_for(build_case, "internvl2_5")
    encoded, problems, _ = encode_dataset(ds, proc, TrainingArgs())
    assert len(encoded) == 1 and len(problems) == len(expected)


def test_meta_json_roots_and_repeat_time(build_case, images, tmp_path):
    rec = {"image": "a.png", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    write_jsonl(tmp_path / "ten.jsonl", [rec] * 10)
    meta = {"half": {"root": str(images), "annotation": "ten.jsonl", "repeat_time": 0.5},
            "twice": {"root": str(images), "annotation": "ten.jsonl", "repeat_time": 2, "max_dynamic_patch": 1}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    ds = load_dataset(tmp_path / "meta.json")
    assert ds.problems == [] and len(ds.samples) == 5 + 20
    assert ds.samples[0].where.endswith("ten.jsonl:1") and ds.samples[-1].max_tiles == 1
    (tmp_path / "bad_meta.json").write_text(json.dumps({"x": {"root": ".", "annotation": "t.json", "repeat_time": 1}}))
    with pytest.raises(UserError, match="must be a .jsonl file"):
        load_dataset(tmp_path / "bad_meta.json")


def test_multi_image_budget_and_text_only_batches(build_case, images, tmp_path):
    proc = processor_for(build_case, "internvl2_5")
    path = write_jsonl(tmp_path / "mix.jsonl", [
        {"image": ["a.png", "wide.png"], "conversations": [{"from": "human", "value": "Compare."},
                                                          {"from": "gpt", "value": "Different."}]},
        {"conversations": [{"from": "human", "value": "Just text?"}, {"from": "gpt", "value": "Yes."}]},
    ])
    ds = load_dataset(path, root=images)
    two, text = [encode_sample(s, proc, max_tiles=4) for s in ds.samples]
    # Upstream training gives each of n images max_tiles // n tiles: the 2:1 image gets 2 tiles + thumbnail.
    assert two.tiles_budget == 2 and two.num_tiles == [1, 3]
    prompt = proc.tokenizer.decode(two.ids.tolist())
    assert "Image-1: <img>" in prompt and "Image-2: <img>" in prompt
    assert text.num_tiles == [] and text.mask.any()
    batcher = Batcher([two, text], 2, proc.config, 0, proc.image_token_id)
    batch, n_tokens = batcher.batch(0)
    assert batch["ids"].shape[1] % 32 == 0 and n_tokens == len(two.ids) + len(text.ids)
    assert batch["pixel_values"].shape[0] == 4
    assert int(batch["image_mask"].sum()) == 4 * proc.config.num_image_token
