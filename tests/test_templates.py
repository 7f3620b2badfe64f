"""Prompts and token ids for every released template, with real tokenizers (tests/fixtures/tokenizers).

Expected strings are written from the spec's template table (upstream `conversation.py`, section 5.4), not from
our output; expected ids come from the tokenizer libraries directly (transformers' tokenizer, sentencepiece) and
from ids known from released checkpoints (spec 5.1). transformers' own `InternVLProcessor` is the oracle for the
`<img><IMG_CONTEXT>*256n</img>` expansion together with the pixels.
"""

import numpy as np
import pytest
from conftest import ASSETS
from PIL import Image

from mlx_internvl.config import ModelConfig, VisionConfig
from mlx_internvl.errors import UserError
from mlx_internvl.processing import Processor
from mlx_internvl.templates import INTERNVL2_5_SYSTEM, INTERNVL_SYSTEM, get_template, template_from_chat_template
from mlx_internvl.tokenizer import load_tokenizer

TOK = ASSETS / "tokenizers"
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
IMG = ASSETS / "images" / "image3.jpg"  # a real 600x500 photo

# The exact default system messages (spec 5.4).
SYS_25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SYS_V2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


def config(template, model_type="qwen2", source_format="original"):
    return ModelConfig(vision_config=VisionConfig(), llm_config={"model_type": model_type,
                       "max_position_embeddings": 32768}, template=template, source_format=source_format)


@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory):
    """The Qwen2.5 tokenizer with InternVL's 9 tokens added as InternVL's training code adds them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOK / "qwen2_5"))
    assert tok.add_tokens(INTERNVL_TOKENS, special_tokens=True) == 9
    out = tmp_path_factory.mktemp("qwen25_internvl")
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def qwen25_internvl(qwen25_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen25_dir))


def processor(tok_dir, template, model_type="qwen2"):
    return Processor(load_tokenizer(tok_dir), config(template, model_type))


def test_default_system_messages_are_upstreams():
    assert INTERNVL2_5_SYSTEM == SYS_25 and INTERNVL_SYSTEM == SYS_V2
    assert get_template("internvl2_5").system_message == SYS_25
    for name in ("Hermes-2", "internlm2-chat", "phi3-chat"):
        assert get_template(name).system_message == SYS_V2


def test_internvl_token_ids_qwen25(qwen25_dir, qwen25_internvl):
    # Spec 5.1: <img> 151665, </img> 151666, <IMG_CONTEXT> 151667 ... </box> 151673; ChatML tokens 151644/151645.
    assert qwen25_internvl.convert_tokens_to_ids(INTERNVL_TOKENS) == list(range(151665, 151674))
    p = processor(qwen25_dir, None)
    assert (p.template.name, p.image_token_id, p.eos_token_id) == ("internvl2_5", 151667, 151645)


# --- the four templates, as strings ---------------------------------------------------------------------------

Q1, A1, Q2 = "What is shown?", "Two cats.", "What colour are they?"
EXPECTED = {  # spec 5.4: generation prompt for (system, [(q1, a1)], q2); only internvl2_5 has "\n" after the sep
    "internvl2_5": ("<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n"
                    "{A1}<|im_end|>\n<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n"),
    "Hermes-2": ("<|im_start|>system\n{S}<|im_end|><|im_start|>user\n{Q1}<|im_end|><|im_start|>assistant\n"
                 "{A1}<|im_end|><|im_start|>user\n{Q2}<|im_end|><|im_start|>assistant\n"),
    "phi3-chat": ("<|system|>\n{S}<|end|><|user|>\n{Q1}<|end|><|assistant|>\n{A1}<|end|><|user|>\n{Q2}<|end|>"
                  "<|assistant|>\n"),
}
EXPECTED["internlm2-chat"] = EXPECTED["Hermes-2"]
STOP = {"internvl2_5": "<|im_end|>", "Hermes-2": "<|im_end|>", "internlm2-chat": "<|im_end|>", "phi3-chat": "<|end|>"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("system", [None, "You are a careful assistant.", ""])
def test_render_with_history_and_system(name, system):
    from mlx_internvl.templates import build_query

    t = get_template(name)
    s = t.system_message if system is None else system
    assert build_query(t, Q2, [(Q1, A1)], system) == EXPECTED[name].format(S=s, Q1=Q1, A1=A1, Q2=Q2)
    assert t.stop_str == STOP[name]


# --- token-exact prompts with real tokenizers ------------------------------------------------------------------

def expanded(text, tiles):
    for n in tiles:
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (256 * n) + "</img>", 1)
    return text


def one_turn(name, q, s=None):
    t = get_template(name)
    return EXPECTED[name].split("{A1}")[0].replace("{Q1}", q).format(S=t.system_message if s is None else s)


def test_qwen25_internvl2_5_single_image(qwen25_dir, qwen25_internvl):
    p = processor(qwen25_dir, "internvl2_5")
    out = p("Describe it.", images=[IMG], max_tiles=6)
    n = out["num_tiles"]
    expect = expanded(one_turn("internvl2_5", "<image>\nDescribe it."), n)
    assert out["prompt"] == expect
    ids = out["input_ids"][0].tolist()
    assert ids == qwen25_internvl.encode(expect)
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> "system" "\n": no BOS for Qwen
    user = ids.index(151665) - 3
    # The known InternVL2_5-1B id sequence for a user turn with an image (spec 5.1).
    assert ids[user:user + 5] == [151644, 872, 198, 151665, 151667]
    assert ids.count(151667) == 256 * sum(n)


def test_qwen25_multi_image_history_and_custom_system(qwen25_dir, qwen25_internvl):
    p = processor(qwen25_dir, "internvl2_5")
    images = [IMG, ASSETS / "images" / "chelsea.png"]
    q1 = "Image-1: <image>\nImage-2: <image>\nCompare the two pictures."
    out = p("And their colours?", images=images, history=[(q1, "Both show cats.")], system_message="Be brief.",
            max_tiles=[2, 4])
    expect = EXPECTED["internvl2_5"].format(S="Be brief.", Q1=q1, A1="Both show cats.", Q2="And their colours?")
    assert out["prompt"] == expanded(expect, out["num_tiles"])
    assert out["input_ids"][0].tolist() == qwen25_internvl.encode(out["prompt"])
    # The model-card prefix is added when the question has no placeholders.
    auto = p("Compare the two pictures.", images=images, max_tiles=[2, 4])
    assert auto["prompt"] == expanded(one_turn("internvl2_5", q1), auto["num_tiles"])


def test_video_frames_prompt(qwen25_dir, qwen25_internvl):
    p = processor(qwen25_dir, "internvl2_5")
    frames = [Image.open(IMG).convert("RGB").rotate(k) for k in range(3)]
    out = p("What happens?", video=frames)
    q = "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nWhat happens?"
    assert out["num_tiles"] == [1, 1, 1]
    assert out["prompt"] == expanded(one_turn("internvl2_5", q), [1, 1, 1])
    assert out["input_ids"][0].tolist() == qwen25_internvl.encode(out["prompt"])
    assert out["pixel_values"].shape == (3, 448, 448, 3)
    # Training's `<video>` placeholder is replaced in place; the old model-card spelling is configurable.
    inplace = p("Look: <video>\nWhat happens?", video=frames, frame_label="Frame{k}: ")
    assert "Look: Frame1: <img>" in inplace["prompt"] and inplace["prompt"].count("<img>") == 3


def test_hermes2_internvl2_1b_tokenizer():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(TOK / "internvl2_1b"))
    p = processor(TOK / "internvl2_1b", "Hermes-2")
    assert (p.image_token_id, p.eos_token_id) == (151648, 151645)  # Qwen2 numbering (spec 5.1)
    out = p("<image>\nWhat is this?", images=[IMG], history=[("Hello", "Hi!")], max_tiles=2)
    assert out["prompt"].startswith("<|im_start|>system\n" + SYS_V2 + "<|im_end|><|im_start|>user\nHello<|im_end|>")
    ids = out["input_ids"][0].tolist()
    assert ids == hf.encode(out["prompt"])
    assert ids.count(151648) == 256 * sum(out["num_tiles"]) and 151646 in ids


def test_internlm2_chat_with_bos_and_sentencepiece_pieces():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOK / "internlm2" / "tokenizer.model"))
    p = processor(TOK / "internlm2", "internlm2-chat", "llama")
    assert (p.image_token_id, p.eos_token_id) == (92546, 92542)
    out = p("Describe the picture.", images=[IMG], max_tiles=1)
    expect = expanded(one_turn("internlm2-chat", "<image>\nDescribe the picture."), out["num_tiles"])
    assert out["prompt"] == expect
    # InternLM2's tokenizer: BOS, then text between special tokens encoded piece by piece with sentencepiece.
    specials = {"<|im_start|>": 92543, "<|im_end|>": 92542, "<img>": 92544, "</img>": 92545, "<IMG_CONTEXT>": 92546}
    import re

    want = [1]
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", expect):
        if part:
            want += [specials[part]] if part in specials else sp.encode(part)
    assert out["input_ids"][0].tolist() == want


def test_phi3_chat_prompt_string(build_case):
    from builders import Case

    built = build_case(Case("gen_phi3", text="phi3", template="phi3-chat"))
    p = Processor.from_pretrained(built.original_dir, config("phi3-chat", "phi3"))
    out = p("Hi", images=[IMG], max_tiles=1, system_message="S")
    assert out["prompt"] == expanded("<|system|>\nS<|end|><|user|>\n<image>\nHi<|end|><|assistant|>\n", [1])
    assert out["input_ids"][0, 0].item() == p.tokenizer.convert_tokens_to_ids("<s>")  # BOS, as Phi-3's tokenizer
    assert p.eos_token_id == p.tokenizer.convert_tokens_to_ids("<|end|>")


# --- the -hf expansion, with transformers' InternVLProcessor as the oracle --------------------------------------

@pytest.fixture(scope="module")
def hf_internvl_processor(qwen25_dir):
    from transformers import AutoTokenizer, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    class ImageOnlyInternVLProcessor(InternVLProcessor):
        # transformers' video processor needs torchvision; images alone do not, so let it be absent.
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    tok = AutoTokenizer.from_pretrained(str(qwen25_dir), extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    ip = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, resample=Image.BICUBIC,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return ImageOnlyInternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=None, image_seq_length=256)


@pytest.mark.parametrize("names", [["image3.jpg"], ["image1.jpg", "chelsea.png"]])
def test_expansion_and_pixels_equal_transformers_internvl_processor(qwen25_dir, hf_internvl_processor, names):
    p = processor(qwen25_dir, "internvl2_5")
    images = [Image.open(ASSETS / "images" / n).convert("RGB") for n in names]
    ours = p("Describe.", images=images)
    # The same conversation with transformers' placeholder for an image (<IMG_CONTEXT>) where ours has <image>.
    text = ours["prompt"]
    for _ in names:
        start, end = text.index("<img>"), text.index("</img>") + len("</img>")
        text = text[:start] + "\x00" + text[end:]
    ref = hf_internvl_processor(text=text.replace("\x00", "<IMG_CONTEXT>"), images=images, return_tensors="np")
    assert ours["input_ids"][0].tolist() == ref["input_ids"][0].tolist()
    np.testing.assert_array_equal(np.array(ours["pixel_values"]).transpose(0, 3, 1, 2), ref["pixel_values"])


# --- which template a checkpoint uses ---------------------------------------------------------------------------

def test_template_from_config_field_and_from_chat_template(qwen25_dir):
    tok = load_tokenizer(qwen25_dir)  # carries Qwen2.5's own ChatML chat template
    assert Processor(tok, config("Hermes-2")).template.name == "Hermes-2"  # original layout: the config field
    assert template_from_chat_template(tok.chat_template) == "internvl2_5"
    assert Processor(tok, config("internvl2_5", source_format="hf")).template.name == "internvl2_5"
    assert template_from_chat_template("{{'<|user|>\n' + m + '<|end|>'}}") == "phi3-chat"
    assert Processor(tok, config("internlm2-chat"), template="Hermes-2").template.name == "Hermes-2"
    with pytest.raises(UserError, match="no '<\\|end\\|>' token"):  # a template whose stop token is not there
        Processor(tok, config("phi3-chat"))


def test_unknown_and_unsupported_templates():
    with pytest.raises(UserError, match="unknown template 'chatml'.*internvl2_5"):
        get_template("chatml")
    gpt_oss = "{{'<|start|>' + role + '<|message|>' + content + '<|end|>'}}"
    assert template_from_chat_template(gpt_oss) == "internvl3_5_gpt_oss"


def test_placeholder_count_mismatch_is_a_user_error(qwen25_dir):
    p = processor(qwen25_dir, "internvl2_5")
    with pytest.raises(UserError, match="2 <image> placeholder"):
        p("<image> and <image>?", images=[IMG])
    with pytest.raises(UserError, match="1 <image> placeholder"):
        p("<image> what?")
