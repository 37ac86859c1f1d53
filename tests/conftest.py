"""Shared fixtures: tiny random checkpoints made once per test session (see tiny_models.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import make_finetune, make_tiny_model


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """Tiny Llama (MHA, tied embeddings) saved as a Hugging Face folder with a tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="session")
def tiny_finetunes(tmp_path_factory, tiny_base) -> list[Path]:
    """Three different fine-tunes of ``tiny_base``."""
    return [make_finetune(tiny_base, tmp_path_factory.mktemp(f"tiny_ft{i}"), seed=10 + i) for i in range(3)]
