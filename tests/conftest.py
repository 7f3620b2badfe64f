"""Shared fixtures: tiny checkpoints are built once per session and cached under a temporary directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from builders import Case, build  # noqa: E402

ASSETS = Path(__file__).parent / "fixtures"

_BUILT = {}


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def build_case(checkpoint_root):
    """`build_case(Case(...))` -> Built, cached by case name for the whole session."""

    def _build(case: Case):
        if case.name not in _BUILT:
            _BUILT[case.name] = build(case, checkpoint_root / case.name)
        return _BUILT[case.name]

    return _build
