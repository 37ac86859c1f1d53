"""The checkpoint reader: names, lazy tensors, fingerprints, errors."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaserve.delta_store.checkpoint import CheckpointError, default_model_path, open_checkpoint
from tiny_models import make_tiny_model


def test_reads_hf_folder(tiny_base: Path):
    ckpt = open_checkpoint(tiny_base)
    stored = load_file(next(tiny_base.glob("*.safetensors")))
    assert sorted(ckpt.names()) == sorted(stored)
    for name, tensor in stored.items():
        assert ckpt.shape(name) == tuple(tensor.shape)
        assert torch.equal(ckpt.get(name), tensor.float())
    assert ckpt.config.hidden_size == 64
    assert ckpt.tokenizer().apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_fingerprint_tells_bases_apart_and_ignores_dtype(tmp_path: Path, tiny_base: Path):
    fp = open_checkpoint(tiny_base).fingerprint()
    assert fp == open_checkpoint(tiny_base).fingerprint()
    other = make_tiny_model(tmp_path / "other", seed=123)
    assert open_checkpoint(other).fingerprint() != fp
    # The same base stored in BF16 is still the same base.
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    for file in tiny_base.iterdir():
        if file.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, bf16 / file.name)
        else:
            (bf16 / file.name).write_bytes(file.read_bytes())
    assert open_checkpoint(bf16).get("model.norm.weight").dtype == torch.float32
    assert open_checkpoint(bf16).fingerprint() == fp


def test_errors_name_the_problem(tmp_path: Path, tiny_base: Path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        open_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        open_checkpoint(tiny_base).get("nope")


def test_default_model_is_embedded():
    path = default_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
