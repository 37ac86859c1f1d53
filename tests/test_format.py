"""Delta file format: write/load round trip per weight kind, and every validation failure on load."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltaserve.delta_store import DeltaFormatError, load_delta
from deltaserve.delta_store.format import (
    METADATA_KEY,
    DeltaFile,
    DenseDelta,
    FloatTier,
    LowRankDelta,
    QuantTier,
    SignDelta,
    load_delta_buffer,
    write_delta,
)
from deltaserve.delta_store.packing import pack_bitplanes, quantize_groups

GROUP = 32
FINGERPRINT = "sha256:test"


def quant_tier(gen: torch.Generator, bits: int, rank: int, d_out: int, d_in: int) -> QuantTier:
    u_codes, u_scales = quantize_groups(torch.randn(rank, d_out, generator=gen), bits, GROUP)
    v_codes, v_scales = quantize_groups(torch.randn(rank, d_in, generator=gen), bits, GROUP)
    return QuantTier(bits, rank, pack_bitplanes(u_codes, bits), u_scales, pack_bitplanes(v_codes, bits), v_scales,
                     torch.rand(rank, generator=gen))


def header(method: str) -> dict:
    return {"method": method, "base_fingerprint": FINGERPRINT, "source": {"base": "b", "finetuned": "f"},
            "group_size": GROUP, "bits_per_param_budget": 1.0, "method_config": {}}


def sample_weights(method: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    weights = {"model.norm.weight": DenseDelta(torch.randn(40, generator=gen).half())}
    if method == "deltacome":
        tiers = [quant_tier(gen, 8, 2, 48, 40), quant_tier(gen, 2, 5, 48, 40)]
        weights["a.weight"] = LowRankDelta((48, 40), tiers)
    elif method == "svd":
        tier = FloatTier(torch.randn(3, 48, generator=gen).half(), torch.randn(3, 40, generator=gen).half(),
                         torch.rand(3, generator=gen))
        weights["a.weight"] = LowRankDelta((48, 40), [tier])
    elif method == "bitdelta":
        signs = pack_bitplanes(torch.randint(0, 2, (48, 40), generator=gen).to(torch.uint8), 1)[0]
        weights["a.weight"] = SignDelta(signs, torch.tensor([0.01]), (48, 40))
    else:
        weights["a.weight"] = DenseDelta(torch.randn(48, 40, generator=gen).half())
    return weights


@pytest.mark.parametrize("method", ["deltacome", "svd", "bitdelta", "dense"])
def test_round_trip(tmp_path: Path, method: str) -> None:
    weights = sample_weights(method)
    expected = {name: w.to_dense(GROUP) for name, w in weights.items()}
    path = write_delta(tmp_path / "d.safetensors", weights, header(method))
    loaded = load_delta(path, expected_fingerprint=FINGERPRINT, base_shapes={"a.weight": (48, 40), "model.norm.weight": (40,)})
    assert loaded.method == method and loaded.metadata["format_version"] == 1
    got = loaded.dense_deltas()
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], expected[name])
    assert loaded.metadata["weights"]["a.weight"]["bytes"] > 0
    assert loaded.metadata["total_bytes"] == sum(e["bytes"] for e in loaded.metadata["weights"].values())
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_sign_delta_values(tmp_path: Path) -> None:
    signs = pack_bitplanes(torch.tensor([[1, 0, 1]], dtype=torch.uint8), 1)[0]
    assert SignDelta(signs, torch.tensor([0.5]), (1, 3)).to_dense().tolist() == [[0.5, -0.5, 0.5]]


def rewrite(src: Path, dst: Path, meta_edit=None, tensor_edit=None) -> Path:
    with safe_open(src, framework="pt") as f:
        metadata = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta_edit:
        meta_edit(metadata)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, dst, metadata={METADATA_KEY: json.dumps(metadata)})
    return dst


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


BAD_FILES = [
    (_set("format_version", 99), None, "format_version 99"),
    (_set("method", "zip"), None, "unknown method 'zip'"),
    (_set("group_size", 100), None, "group_size 100"),
    (_set("base_fingerprint", ""), None, "base_fingerprint"),
    (lambda m: m["weights"]["a.weight"].__setitem__("shape", [48, 80]), None, "'a.weight/t0/v_planes' has shape"),
    (lambda m: m["weights"]["a.weight"]["tiers"][0].__setitem__("bits", 9), None, "tier 0: bits 9"),
    (lambda m: m["weights"]["a.weight"]["tiers"][1].__setitem__("rank", 4), None, "'a.weight/t1/s' has shape \\[5\\], expected \\[4\\]"),
    (lambda m: m["weights"]["a.weight"].__setitem__("bytes", 1), None, "metadata bytes 1"),
    (lambda m: m["weights"]["a.weight"].__setitem__("kind", "sign"), None, "kind 'sign' is not valid"),
    (None, lambda t: t.pop("a.weight/t1/s"), "'a.weight/t1/s' is missing"),
    (None, lambda t: t.__setitem__("a.weight/t0/s", t["a.weight/t0/s"].double()), "dtype torch.float64"),
    (None, lambda t: t["a.weight/t0/u_scales"].__setitem__((0, 0), float("inf")), "u_scales' contains NaN"),
    (None, lambda t: t["a.weight/t1/s"].__setitem__(0, float("nan")), "t1/s' contains NaN"),
    (None, lambda t: t.__setitem__("b.weight/delta", torch.zeros(2)), "'b.weight/delta' is not described"),
]


def load_from_bytes(path: Path, **checks) -> DeltaFile:
    """The upload path's loader: the bytes already read (and hashed) by the store, tensors as views."""
    return load_delta_buffer(path, bytearray(path.read_bytes()), **checks)


LOADERS = [pytest.param(load_delta, id="file"), pytest.param(load_from_bytes, id="bytes")]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("meta_edit, tensor_edit, message", BAD_FILES + [
    (None, lambda t: t.__setitem__("a.weight/t0/s", t["a.weight/t0/s"].to(torch.uint16)), "dtype"),
])
def test_invalid_files_are_refused(tmp_path: Path, meta_edit, tensor_edit, message: str, loader) -> None:
    good = write_delta(tmp_path / "good.safetensors", sample_weights("deltacome"), header("deltacome"))
    bad = rewrite(good, tmp_path / "bad.safetensors", meta_edit, tensor_edit)
    with pytest.raises(DeltaFormatError, match=message.replace("(", r"\(")):
        loader(bad)


@pytest.mark.parametrize("method", ["deltacome", "svd", "bitdelta", "dense"])
def test_loading_from_bytes_equals_loading_the_file(tmp_path: Path, method: str) -> None:
    path = write_delta(tmp_path / "d.safetensors", sample_weights(method), header(method))
    from_file, from_bytes = load_delta(path).dense_deltas(), load_from_bytes(path).dense_deltas()
    assert set(from_file) == set(from_bytes)
    assert all(torch.equal(from_file[name], from_bytes[name]) for name in from_file)


def test_fingerprint_and_base_shape_mismatch(tmp_path: Path) -> None:
    path = write_delta(tmp_path / "d.safetensors", sample_weights("svd"), header("svd"))
    with pytest.raises(DeltaFormatError, match="base fingerprint mismatch"):
        load_delta(path, expected_fingerprint="sha256:other")
    with pytest.raises(DeltaFormatError, match=r"'a.weight': delta shape \[48, 40\] != base shape \[40, 48\]"):
        load_delta(path, base_shapes={"a.weight": (40, 48), "model.norm.weight": (40,)})
    with pytest.raises(DeltaFormatError, match="'a.weight' of the delta is not in the base"):
        load_delta(path, base_shapes={"model.norm.weight": (40,)})


def test_not_a_delta_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(DeltaFormatError, match="not a readable safetensors file"):
        load_delta(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(DeltaFormatError, match="no 'deltaserve' metadata"):
        load_delta(plain)
    with pytest.raises(DeltaFormatError, match="not a readable"):
        load_delta(tmp_path / "missing.safetensors")


def test_invalid_delta_is_never_written(tmp_path: Path) -> None:
    weights = sample_weights("deltacome")
    weights["a.weight"].tiers[0].s[0] = float("nan")
    with pytest.raises(DeltaFormatError, match="contains NaN"):
        write_delta(tmp_path / "d.safetensors", weights, header("deltacome"))
    assert list(tmp_path.iterdir()) == []
