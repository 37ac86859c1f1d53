"""`deltaserve compress` / `deltaserve inspect` through the real console script, and every bad input:
one-line error naming the tensor or option, non-zero exit, no output file (or temp file) left behind."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_finetune, make_tiny_model

from deltaserve.delta_store import compress

DELTASERVE = str(Path(sys.executable).parent / "deltaserve")
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([DELTASERVE, *args], capture_output=True, text=True, env=env, timeout=300)


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """Copy a model folder, letting `edit` change its tensor dict."""
    dst.mkdir()
    for file in src.iterdir():
        if file.suffix == ".safetensors":
            tensors = load_file(file)
            edit(tensors)
            save_file(tensors, dst / file.name, metadata={"format": "pt"})
        else:
            (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _set_nan(tensors: dict) -> None:
    tensors[Q_PROJ][3, 5] = float("nan")


def _reshape(tensors: dict) -> None:
    tensors[Q_PROJ] = tensors[Q_PROJ][:, :32].contiguous()


def _drop(tensors: dict) -> None:
    del tensors[Q_PROJ]


def _extra(tensors: dict) -> None:
    tensors["model.extra.weight"] = torch.zeros(4, 4)


@pytest.fixture(scope="module")
def finetune(tiny_finetunes: list[Path]) -> Path:
    return tiny_finetunes[0]


@pytest.mark.parametrize("edit, message", [
    (_set_nan, f"tensor '{Q_PROJ}' of the fine-tune contains NaN or Inf"),
    (_reshape, f"tensor '{Q_PROJ}': base shape [64, 64] != fine-tune shape [64, 32]"),
    (_drop, f"tensor '{Q_PROJ}' of the base is missing from the fine-tune"),
    (_extra, "tensor 'model.extra.weight' of the fine-tune is not in the base"),
])
def test_bad_finetune_tensors(tiny_base: Path, finetune: Path, tmp_path: Path, edit, message: str) -> None:
    bad = edited_copy(finetune, tmp_path / "bad_ft", edit)
    out = tmp_path / "out" / "d.safetensors"
    out.parent.mkdir()
    with pytest.raises(ValueError, match=re.escape(message)):
        compress(tiny_base, bad, out)
    assert list(out.parent.iterdir()) == []


def test_architecture_mismatch(tiny_base: Path, tmp_path: Path) -> None:
    other = make_finetune(make_tiny_model(tmp_path / "qwen", arch="qwen2"), tmp_path / "qwen_ft")
    with pytest.raises(ValueError, match="base and fine-tune differ in config field 'model_type': 'llama' vs 'qwen2'"):
        compress(tiny_base, other, tmp_path / "d.safetensors")
    wider = make_tiny_model(tmp_path / "wide", intermediate_size=96)
    with pytest.raises(ValueError, match="config field 'intermediate_size': 128 vs 96"):
        compress(tiny_base, wider, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "zip"}, "unknown method 'zip'"),
    ({"bits_per_param": 0}, "--bits-per-param must be in (0, 16]"),
    ({"bits_per_param": float("nan")}, "--bits-per-param"),
    ({"group_size": 100}, "--group-size: group_size must be a positive multiple of 32"),
    ({"method": "bitdelta", "bits_per_param": 0.5}, "bitdelta stores 1 sign bit per parameter"),
    ({"method": "svd", "calibration": "x.txt"}, "--calibration is used only by the deltacome method"),
    ({"calibration": "/nonexistent/calibration.txt"}, "--calibration /nonexistent/calibration.txt: cannot read"),
    ({"device": "tpu"}, "--device 'tpu'"),
    ({"bits_per_param": 0.01}, "cannot hold one rank"),
    *([] if torch.cuda.is_available() else [({"device": "cuda"}, "--device cuda: CUDA is not available")]),
])
def test_bad_options(tiny_base: Path, finetune: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        compress(tiny_base, finetune, tmp_path / "d.safetensors", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_or_missing_output(tiny_base: Path, finetune: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--out .*does not exist"):
        compress(tiny_base, finetune, tmp_path / "missing" / "d.safetensors")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="--out .*does not exist"):
        compress(tiny_base, finetune, tmp_path / "a_file" / "d.safetensors")
    with pytest.raises(ValueError, match="--out .*is a folder"):
        compress(tiny_base, finetune, tmp_path)
    with pytest.raises(ValueError, match="no such file or folder"):
        compress(tmp_path / "no_base", finetune, tmp_path / "d.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_cli_errors_are_one_line(tiny_base: Path, finetune: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.safetensors"
    result = run_cli("compress", "--base", str(tiny_base), "--finetuned", str(finetune), "--out", str(out),
                     "--method", "zip")
    assert result.returncode != 0
    assert result.stderr.strip() == ("deltaserve compress: error: unknown method 'zip' "
                                     "(choose from deltacome, bitdelta, svd, dense)")
    assert not out.exists()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    result = run_cli("inspect", str(junk))
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "not a readable safetensors" in result.stderr


def test_cli_compress_and_inspect_default_deltacome_at_512(tmp_path: Path) -> None:
    base = make_tiny_model(tmp_path / "base", hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                           num_attention_heads=8, num_key_value_heads=8)
    tuned = make_finetune(base, tmp_path / "ft", scale=0.5)
    out = tmp_path / "delta.safetensors"
    result = run_cli("compress", "--base", str(base), "--finetuned", str(tuned), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "compress: 100%" in result.stderr  # the progress bar ran over every weight
    assert f"wrote {out}" in result.stdout
    result = run_cli("inspect", str(out))
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    assert "method: deltacome" in result.stdout and "base fingerprint: sha256:" in result.stdout
    assert re.search(r"model\.layers\.0\.mlp\.down_proj\.weight +512x1024 +lowrank +\d+ +[\d.]+ +\d+@8", result.stdout)
    large = float(re.search(r"bits/param, matrices >= 512x512: ([\d.]+)", result.stdout).group(1))
    assert 0.9 < large <= 1.05
