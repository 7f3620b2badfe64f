"""Tokenizers without remote code.

Qwen, Phi-3, Llama and `-hf` checkpoints load with transformers' own classes. Original-layout InternLM2 checkpoints
name `tokenization_internlm2.InternLM2Tokenizer` in their `auto_map`; that class is a thin layer over
sentencepiece (BOS, then the text split on added tokens, each piece sentencepiece-encoded), which
`SentencePieceTokenizer` reproduces on transformers' Python tokenizer base, so the checkpoint's code never runs.
Everything else is loaded by mlx-lm's own `tokenizer_utils.load`, which also picks the streaming detokenizer.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

import sentencepiece as spm
from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer, TokenizerWrapper
from mlx_lm.tokenizer_utils import load as mlx_lm_load

from .errors import UserError

# The tokens InternVL adds around and for image features: `<img>` + `<IMG_CONTEXT>` * n + `</img>`.
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


def _sentencepiece_class():
    from transformers import PreTrainedTokenizer

    class SentencePieceTokenizer(PreTrainedTokenizer):
        """A sentencepiece model with added tokens and a BOS, as InternLM2's tokenizer behaves."""

        vocab_files_names = {"vocab_file": "tokenizer.model"}
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, vocab_file, add_bos_token=True, add_eos_token=False, **kwargs):
            self.vocab_file = vocab_file
            self.sp_model = spm.SentencePieceProcessor(model_file=str(vocab_file))
            self.add_bos_token = add_bos_token
            self.add_eos_token = add_eos_token
            kwargs.pop("auto_map", None)
            kwargs.pop("tokenizer_class", None)
            super().__init__(**kwargs)

        @property
        def vocab_size(self) -> int:
            return self.sp_model.get_piece_size()

        def get_vocab(self):
            vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
            vocab.update(self.added_tokens_encoder)
            return vocab

        def _tokenize(self, text, **kwargs):
            return self.sp_model.encode(text, out_type=str)

        def _convert_token_to_id(self, token):
            return self.sp_model.piece_to_id(token)

        def _convert_id_to_token(self, index):
            return self.sp_model.id_to_piece(index)

        def convert_tokens_to_string(self, tokens):
            return self.sp_model.decode(tokens)

        def build_inputs_with_special_tokens(self, ids_0, ids_1=None):
            bos = [self.bos_token_id] if self.add_bos_token else []
            eos = [self.eos_token_id] if self.add_eos_token else []
            out = bos + ids_0 + eos
            if ids_1 is not None:
                out += bos + ids_1 + eos
            return out

        def save_vocabulary(self, save_directory, filename_prefix=None):
            target = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
            if Path(self.vocab_file).resolve() != target.resolve():
                shutil.copyfile(self.vocab_file, target)
            return (str(target),)

    return SentencePieceTokenizer


def _tokenizer_config(path: Path) -> dict:
    f = path / "tokenizer_config.json"
    if not f.exists():
        return {}
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def needs_own_tokenizer(path: Path) -> bool:
    """InternLM2's sentencepiece tokenizer exists only as remote code; every other one loads without it."""
    path = Path(path)
    cfg = _tokenizer_config(path)
    cls_name = str(cfg.get("tokenizer_class") or "")
    return (path / "tokenizer.model").exists() and (cls_name.startswith("InternLM2") or (
        bool(cfg.get("auto_map")) and not (path / "tokenizer.json").exists()))


@contextmanager
def _quiet_transformers():
    """AutoTokenizer reads config.json and warns that `internvl_chat` is not a model type it knows: harmless here."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _tokenizer_error(path: Path, e: Exception) -> UserError:
    files = sorted(p.name for p in path.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges")))
    return UserError(f"{path}: cannot load the tokenizer without remote code ({type(e).__name__}: {e}). "
                     f"Tokenizer files present: {', '.join(files) or 'none'}.")


def load_hf_tokenizer(path: Path):
    """A transformers tokenizer for the checkpoint at `path`, never running its remote code."""
    path = Path(path)
    if needs_own_tokenizer(path):
        return _sentencepiece_class().from_pretrained(str(path))
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except Exception as e:  # transformers raises ValueError/OSError/KeyError, depending on what is missing
            raise _tokenizer_error(path, e) from e


def _listed_token_id(path: Path, token: str) -> Optional[int]:
    """The id of an added token as the tokenizer files list it (tokenizer.json, tokenizer_config.json or
    added_tokens.json), without loading the tokenizer; None when none of them lists it."""
    f = path / "tokenizer.json"
    if f.exists():
        with open(f, encoding="utf-8") as fh:
            for t in json.load(fh).get("added_tokens") or []:
                if t.get("content") == token:
                    return int(t["id"])
    for tid, t in (_tokenizer_config(path).get("added_tokens_decoder") or {}).items():
        if t.get("content") == token:
            return int(tid)
    f = path / "added_tokens.json"
    if f.exists():
        with open(f, encoding="utf-8") as fh:
            tid = json.load(fh).get(token)
        return None if tid is None else int(tid)
    return None


def token_id(path: Path, token: str) -> Optional[int]:
    """The id of `token` in the tokenizer at `path` (None when the directory has no tokenizer, or the tokenizer
    does not know the token). Read from the files when they list it; otherwise the tokenizer is loaded."""
    path = Path(path)
    tid = _listed_token_id(path, token)
    if tid is not None or not any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return tid
    tok = load_hf_tokenizer(path)
    tid = tok.convert_tokens_to_ids(token)
    return None if tid is None or tid == getattr(tok, "unk_token_id", None) else int(tid)


def load_tokenizer(path: Path, eos_token_ids: Optional[Iterable[int]] = None):
    """An mlx-lm `TokenizerWrapper`, loaded by mlx-lm's own `tokenizer_utils.load` (so the streaming detokenizer is
    the one mlx-lm picks), except InternLM2's sentencepiece tokenizer, whose class is remote code and which
    `SentencePieceTokenizer` replaces (with mlx-lm's naive streaming detokenizer, what mlx-lm falls back to
    without a tokenizer.json; its sentencepiece one walks ids beyond the sentencepiece vocabulary)."""
    path = Path(path)
    eos = list(eos_token_ids or [])
    if needs_own_tokenizer(path):
        return TokenizerWrapper(load_hf_tokenizer(path), NaiveStreamingDetokenizer, eos_token_ids=eos)
    with _quiet_transformers():
        try:
            return mlx_lm_load(path, tokenizer_config_extra={"trust_remote_code": False}, eos_token_ids=eos)
        except Exception as e:  # transformers raises ValueError/OSError/KeyError, depending on what is missing
            raise _tokenizer_error(path, e) from e
