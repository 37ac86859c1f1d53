"""Compression methods: round trips, byte budgets, quality at equal bytes, logits of a tiny Llama.

Synthetic spectra: real fine-tune deltas have singular values that fall off like a power law with a long
tail (Delta-CoMe, Fig. 1). The deltas here are D = U diag(s) V^T with random orthonormal U, V and
s_k = (k+1)^-decay for decay in {0.5, 0.75, 1.0}: 0.5 is a slow, heavy tail (most energy outside any
small rank), 1.0 a fast one (the top ranks hold most of the energy).
"""

from pathlib import Path

import pytest
import torch
from tiny_models import long_tailed_delta, make_finetune
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltaserve.delta_store import compress, load_delta
from deltaserve.delta_store.allocation import AdaptivePlan, TierPlan, parse_plan, rank_bytes
from deltaserve.delta_store.calibration import CalibrationConfig, Hessians
from deltaserve.delta_store.checkpoint import open_checkpoint
from deltaserve.delta_store.format import LowRankDelta, SignDelta, weight_bytes
from deltaserve.delta_store.methods import MethodOptions, compress_weight
from deltaserve.delta_store.quantize import dequantize_rows, gptq_rows, rtn_quantize

METHODS = ["deltacome", "svd", "bitdelta", "dense"]
CALIBRATION_TEXT = "the quick brown fox jumps over the lazy dog. hello world, 12 * 7 = 84. " * 40


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


@pytest.fixture(scope="module")
def finetune(tiny_base: Path, tmp_path_factory) -> Path:
    """A fine-tune of tiny_base whose layer-1 down projection is unchanged (a zero delta)."""
    return make_finetune(tiny_base, tmp_path_factory.mktemp("ft_skip"), seed=5, skip=("layers.1.mlp.down_proj",))


@pytest.fixture(scope="module")
def delta_files(tiny_base: Path, finetune: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("deltas")
    return {m: compress(tiny_base, finetune, out / f"{m}.safetensors", method=m) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_every_method(method: str, tiny_base: Path, finetune: Path, delta_files: dict) -> None:
    base, tuned = open_checkpoint(tiny_base), open_checkpoint(finetune)
    delta = load_delta(delta_files[method], expected_fingerprint=base.fingerprint(), base_shapes=base.shapes())
    assert delta.metadata["method"] == method
    recon = delta.dense_deltas()
    assert "model.layers.1.mlp.down_proj.weight" not in recon  # exactly-zero delta left out
    assert set(recon) == set(base.names()) - {"model.layers.1.mlp.down_proj.weight"}
    bound = {"dense": 1e-3, "deltacome": 0.6, "svd": 0.8, "bitdelta": 0.8}[method]
    for name, approx in recon.items():
        exact = tuned.get(name) - base.get(name)
        assert approx.shape == exact.shape and approx.dtype == torch.float32
        if exact.dim() == 1:  # norms are kept dense in FP16 by every method
            assert relative_error(approx, exact) < 1e-3, name
        else:
            assert relative_error(approx, exact) < bound, name
        if exact.dim() == 2 and method != "dense":
            budget = MethodOptions(method).budget_bytes(exact.shape)
            slack = 4 if method == "bitdelta" else 0  # bitdelta: 1 sign bit per parameter + one fp32 scale
            assert weight_bytes(delta.weights[name]) <= budget + slack, name


def test_compress_to_any_budget() -> None:
    delta = long_tailed_delta((96, 160), torch.Generator().manual_seed(1), 1.0)
    for method in ("deltacome", "svd"):
        previous = float("inf")
        for bits in (0.5, 1.0, 2.0, 4.0):
            stored = compress_weight(delta, MethodOptions(method, bits, 32), None)
            assert 8 * weight_bytes(stored) <= bits * delta.numel()
            error = relative_error(stored.to_dense(32), delta)
            assert error < previous, (method, bits)  # more bytes, less error
            previous = error


def test_equal_bytes_deltacome_beats_svd_and_bitdelta() -> None:
    gen = torch.Generator().manual_seed(0)
    table = []
    for decay in (0.5, 0.75, 1.0):
        delta = long_tailed_delta((512, 512), gen, 1.0, decay)
        errors, bits = {}, {}
        for method in ("deltacome", "svd", "bitdelta"):
            stored = compress_weight(delta, MethodOptions(method, 1.0), None)
            errors[method] = relative_error(stored.to_dense(128), delta)
            bits[method] = 8 * weight_bytes(stored) / delta.numel()
        table.append((decay, errors, bits))
        print(f"decay {decay}: " + ", ".join(f"{m} {errors[m]:.4f} ({bits[m]:.3f} bits/param)" for m in errors))
        assert errors["deltacome"] < errors["svd"] and errors["deltacome"] < errors["bitdelta"], (decay, errors)
    # Where the baselines fall: plain low rank suffers most on the heavy tail, sign bits on the fast decay.
    assert table[0][1]["svd"] > table[0][1]["bitdelta"]
    assert table[2][1]["bitdelta"] > table[2][1]["svd"]


def test_adaptive_allocation_fits_budget_and_orders_widths() -> None:
    s = torch.arange(1, 513, dtype=torch.float32) ** -0.8
    for budget in (2_000, 32_768, 100_000):
        tiers = AdaptivePlan().ranks(s, 512, 512, budget, 128)
        assert sum(rank * rank_bytes(bits, 512, 512, 128) for bits, rank in tiers) <= budget
        widths = [bits for bits, _ in tiers]
        assert widths == sorted(widths, reverse=True) and len(set(widths)) == len(widths)
    more = AdaptivePlan().ranks(s, 512, 512, 100_000, 128)
    assert more[0][0] == 8 and sum(r for _, r in more) > sum(r for _, r in AdaptivePlan().ranks(s, 512, 512, 32_768, 128))


def test_tier_plan_parsing() -> None:
    assert parse_plan("auto") == AdaptivePlan()
    assert parse_plan("auto:8/3/2") == AdaptivePlan((8, 3, 2))
    assert parse_plan("8:0.25,2:0.75") == TierPlan((8, 2), (0.25, 0.75))
    for bad in ("8:0.5,2:0.4", "2:0.5,8:0.5", "9:1", "eight", "auto:x"):
        with pytest.raises(ValueError, match="--tiers"):
            parse_plan(bad)


def test_fixed_plan_carries_unspent_bytes() -> None:
    tiers = TierPlan((8, 2), (0.01, 0.99)).ranks(None, 512, 512, 32_768, 128)
    assert [bits for bits, _ in tiers] == [2]  # 1% cannot buy an 8-bit rank: it goes to the 2-bit tier
    assert tiers[0][1] == 32_768 // rank_bytes(2, 512, 512, 128)


def test_gptq_beats_round_to_nearest_on_correlated_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=gen) @ torch.randn(64, 256, generator=gen)  # correlated features
    hessian = x.T @ x / x.shape[0]
    w = torch.randn(16, 256, generator=gen) / 16
    bits = torch.full((16,), 3)
    outputs = {}
    for name, quantizer in (("rtn", lambda: rtn_quantize(w, bits, 64)), ("gptq", lambda: gptq_rows(w, bits, 64, hessian))):
        codes, scales = quantizer()
        outputs[name] = relative_error(x @ dequantize_rows(codes, scales, bits, 64).T, x @ w.T)
    assert outputs["gptq"] < 0.8 * outputs["rtn"], outputs


def test_method_kinds(delta_files: dict) -> None:
    weights = {m: load_delta(p).weights["model.layers.0.self_attn.q_proj.weight"] for m, p in delta_files.items()}
    assert isinstance(weights["bitdelta"], SignDelta)
    assert all(tier.bits <= 8 for tier in weights["deltacome"].tiers)
    assert isinstance(weights["svd"], LowRankDelta) and [t.bits for t in weights["svd"].tiers] == [16]


def _logits_with_delta(base_dir: Path, deltas: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    state = model.state_dict()
    for name, delta in deltas.items():
        state[name] += delta
    model.load_state_dict(state)
    with torch.no_grad():
        return model(ids).logits


def test_tiny_llama_logits_close_to_finetune(tiny_base: Path, finetune: Path, delta_files: dict) -> None:
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    base_logits = _logits_with_delta(tiny_base, {}, ids)
    tuned_logits = _logits_with_delta(finetune, {}, ids)
    gap = (tuned_logits - base_logits).norm()
    results = {}
    for method, path in delta_files.items():
        logits = _logits_with_delta(tiny_base, load_delta(path).dense_deltas(), ids)
        agree = (logits.argmax(-1) == tuned_logits.argmax(-1)).float().mean().item()
        results[method] = (float((logits - tuned_logits).norm() / gap), agree)
    print("logits error relative to the fine-tune's shift, top-1 agreement:", results)
    assert results["dense"][0] < 1e-2
    assert results["deltacome"][0] < 0.5 and results["deltacome"][1] >= 0.9
    assert results["deltacome"][0] < min(results["svd"][0], results["bitdelta"][0])


def test_calibration_hessians_chunked_and_used(tiny_base: Path, finetune: Path, tmp_path: Path) -> None:
    text = tmp_path / "calibration.txt"
    text.write_text(CALIBRATION_TEXT)
    base = open_checkpoint(tiny_base)
    names = base.names()
    one_chunk = Hessians(base, text, names, "cpu")
    tiny_chunks = Hessians(base, text, names, "cpu", CalibrationConfig(max_hessian_bytes=1))  # one layer per pass
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(one_chunk.get(q), tiny_chunks.get(q), rtol=1e-4, atol=1e-6)
    assert one_chunk.get("model.embed_tokens.weight") is None  # not a linear layer
    down = "model.layers.1.mlp.down_proj.weight"
    assert one_chunk.get(down).shape == (128, 128) and tiny_chunks.get(down).shape == (128, 128)
    assert set(tiny_chunks._held) == {down}  # memory bound: only the current chunk is held

    plain = load_delta(compress(tiny_base, finetune, tmp_path / "plain.safetensors"))
    calibrated = load_delta(compress(tiny_base, finetune, tmp_path / "cal.safetensors", calibration=text))
    assert calibrated.metadata["method_config"]["calibrated"] is True
    ids = AutoTokenizer.from_pretrained(tiny_base)(CALIBRATION_TEXT, return_tensors="pt").input_ids[:, :96]
    tuned = _logits_with_delta(finetune, {}, ids)
    errors = {name: float((_logits_with_delta(tiny_base, d.dense_deltas(), ids) - tuned).norm())
              for name, d in (("plain", plain), ("calibrated", calibrated))}
    print("logits error on calibration-like text:", errors)
    assert errors["calibrated"] < errors["plain"]
