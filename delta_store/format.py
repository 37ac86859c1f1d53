"""The delta file: one .safetensors holding packed tensors plus JSON metadata; written atomically,
validated completely on load, never unpickled.

Metadata key "deltaserve" holds JSON:
    format_version, method, base_fingerprint, source {base, finetuned, calibration}, created (ISO UTC),
    group_size, bits_per_param_budget, bits_per_param (achieved over the 2-D weights), total_bytes,
    method_config (method parameters such as the tier allocation), weights {name: entry}
    entry = {kind: "lowrank" | "sign" | "dense", shape: [..], tiers: [{rank, bits}] (lowrank), bytes}
`bytes` counts every stored byte of the weight (planes, scales, singular values, signs, scale).

Tensors of one Hugging Face weight W [d_out, d_in] (see packing.py for the bit-plane layout):
- lowrank (deltacome, svd): delta = sum over tiers t of u_t^T @ diag(s_t) @ v_t, u_t [r, d_out], v_t [r, d_in]
  - quantized tier (bits 1..8): W/t{t}/u_planes int32 [b, r, ceil(d_out/32)], W/t{t}/u_scales fp16
    [r, ceil(d_out/G)], W/t{t}/v_planes, W/t{t}/v_scales (same with d_in), W/t{t}/s fp32 [r]
  - float tier (bits 16, the svd method): W/t{t}/u fp16 [r, d_out], W/t{t}/v fp16 [r, d_in], W/t{t}/s fp32 [r]
- sign (bitdelta): W/signs int32 [d_out, ceil(d_in/32)] (bit 1 = positive), W/scale fp32 [1];
  delta = scale * (2 * bit - 1)
- dense (the dense method and every 1-D tensor): W/delta fp16
Weights whose delta is exactly zero are absent.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .packing import MAX_BITS, dequantize, num_groups, num_words, unpack_bitplanes

FORMAT_VERSION = 1
METADATA_KEY = "deltaserve"
FLOAT_BITS = 16
# Which weight kinds each method may store; "dense" here means dense 2-D weights (1-D ones are always dense).
METHOD_KINDS = {"deltacome": "lowrank", "svd": "lowrank", "bitdelta": "sign", "dense": "dense"}


class DeltaFormatError(ValueError):
    """A delta file (or a delta about to be written) that breaks the format; the message names the field."""


@dataclass
class QuantTier:
    bits: int
    rank: int
    u_planes: torch.Tensor  # int32 [bits, rank, ceil(d_out/32)]
    u_scales: torch.Tensor  # fp16 [rank, ceil(d_out/G)]
    v_planes: torch.Tensor  # int32 [bits, rank, ceil(d_in/32)]
    v_scales: torch.Tensor  # fp16 [rank, ceil(d_in/G)]
    s: torch.Tensor  # fp32 [rank]

    def factors(self, d_out: int, d_in: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized (u fp32 [r, d_out], v fp32 [r, d_in])."""
        return (dequantize(self.u_planes, self.u_scales, d_out, group_size),
                dequantize(self.v_planes, self.v_scales, d_in, group_size))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"u_planes": self.u_planes, "u_scales": self.u_scales,
                "v_planes": self.v_planes, "v_scales": self.v_scales, "s": self.s}


@dataclass
class FloatTier:
    u: torch.Tensor  # fp16 [rank, d_out]
    v: torch.Tensor  # fp16 [rank, d_in]
    s: torch.Tensor  # fp32 [rank]
    bits: int = field(default=FLOAT_BITS, init=False)

    @property
    def rank(self) -> int:
        return self.s.shape[0]

    def factors(self, d_out: int, d_in: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.u.float(), self.v.float()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"u": self.u, "v": self.v, "s": self.s}


@dataclass
class LowRankDelta:
    shape: tuple[int, int]
    tiers: list[QuantTier | FloatTier]
    kind = "lowrank"

    def to_dense(self, group_size: int) -> torch.Tensor:
        d_out, d_in = self.shape
        out = torch.zeros(d_out, d_in)
        for tier in self.tiers:
            u, v = tier.factors(d_out, d_in, group_size)
            out += (u.T * tier.s) @ v
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"t{t}/{key}": value for t, tier in enumerate(self.tiers) for key, value in tier.tensors().items()}


@dataclass
class SignDelta:
    signs: torch.Tensor  # int32 [d_out, ceil(d_in/32)], bit 1 = positive
    scale: torch.Tensor  # fp32 [1]
    shape: tuple[int, int]
    kind = "sign"

    def to_dense(self, group_size: int = 0) -> torch.Tensor:
        bits = unpack_bitplanes(self.signs.unsqueeze(0), self.shape[1]).float()
        return self.scale.float() * (2 * bits - 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"signs": self.signs, "scale": self.scale}


@dataclass
class DenseDelta:
    delta: torch.Tensor  # fp16, the weight's shape
    kind = "dense"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape)

    def to_dense(self, group_size: int = 0) -> torch.Tensor:
        return self.delta.float()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta}


WeightDelta = LowRankDelta | SignDelta | DenseDelta


def weight_bytes(delta: WeightDelta) -> int:
    """Every stored byte of one weight's delta."""
    return sum(t.numel() * t.element_size() for t in delta.tensors().values())


@dataclass
class DeltaFile:
    metadata: dict
    weights: dict[str, WeightDelta]

    @property
    def method(self) -> str:
        return self.metadata["method"]

    @property
    def base_fingerprint(self) -> str:
        return self.metadata["base_fingerprint"]

    @property
    def group_size(self) -> int:
        return self.metadata["group_size"]

    def dense_deltas(self) -> dict[str, torch.Tensor]:
        """HF weight name -> fp32 reconstructed delta (only the weights the file holds)."""
        return {name: delta.to_dense(self.group_size) for name, delta in self.weights.items()}


def build_metadata(weights: Mapping[str, WeightDelta], header: dict) -> dict:
    """Complete the metadata of `weights`; `header` gives method, base_fingerprint, source, group_size,
    bits_per_param_budget and method_config."""
    entries, matrix_bytes, matrix_params = {}, 0, 0
    for name, delta in weights.items():
        nbytes = weight_bytes(delta)
        entry = {"kind": delta.kind, "shape": list(delta.shape), "bytes": nbytes}
        if isinstance(delta, LowRankDelta):
            entry["tiers"] = [{"rank": tier.rank, "bits": tier.bits} for tier in delta.tiers]
        if len(delta.shape) == 2:
            matrix_bytes += nbytes
            matrix_params += delta.shape[0] * delta.shape[1]
        entries[name] = entry
    return {
        "format_version": FORMAT_VERSION,
        **header,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bits_per_param": 8 * matrix_bytes / matrix_params if matrix_params else 0.0,
        "total_bytes": sum(entry["bytes"] for entry in entries.values()),
        "weights": entries,
    }


def write_delta(path: str | Path, weights: Mapping[str, WeightDelta], header: dict) -> Path:
    """Validate and write atomically (temp file in the same folder, then rename); returns the path."""
    path = Path(path)
    metadata = build_metadata(weights, header)
    tensors = {f"{name}/{key}": t.contiguous() for name, d in weights.items() for key, t in d.tensors().items()}
    parse_weights(metadata, tensors)  # never write a file that load_delta would refuse
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(metadata)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_delta(
    path: str | Path, expected_fingerprint: str | None = None, base_shapes: Mapping[str, tuple] | None = None
) -> DeltaFile:
    """Read and validate a delta file; DeltaFormatError naming the field or tensor on any problem."""
    path = Path(path)
    raw, tensors = _read_safetensors(path, lambda f: {name: f.get_tensor(name) for name in f.keys()})
    return _checked_delta(path, raw, tensors, expected_fingerprint, base_shapes)


def load_delta_buffer(
    path: str | Path, data: bytearray, expected_fingerprint: str | None = None,
    base_shapes: Mapping[str, tuple] | None = None,
) -> DeltaFile:
    """load_delta for a file whose exact bytes the caller already holds in ``data`` (a bytearray or another
    writable buffer, such as a pinned tensor's numpy view): the same checks and errors (safetensors still
    validates the header at ``path``), but the tensors are views into ``data``, so a caller that has read the
    file (to hash it, or into pinned memory) does not read and copy every tensor again."""
    path = Path(path)
    raw, tensors = _read_safetensors(path, lambda f: _tensor_views(data))
    return _checked_delta(path, raw, tensors, expected_fingerprint, base_shapes)


def _read_safetensors(path: Path, read_tensors: Callable[[safe_open], dict[str, torch.Tensor]]
                      ) -> tuple[str, dict[str, torch.Tensor]]:
    """The raw deltaserve metadata and the tensors (from ``read_tensors`` once the header is accepted)."""
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            if raw is None:
                raise DeltaFormatError(f"{path}: no {METADATA_KEY!r} metadata (not a deltaserve delta file)")
            return raw, read_tensors(f)
    except (SafetensorError, OSError) as exc:
        raise DeltaFormatError(f"{path}: not a readable safetensors file ({exc})") from exc


# safetensors dtype names of the tensors a delta file may hold (others are refused by name).
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
                       "I64": torch.int64, "BOOL": torch.bool}


def _tensor_views(data: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file in memory, as views into ``data`` (no copy). Only for bytes whose
    header safetensors has accepted: offsets, sizes and dtypes are trusted here."""
    (header_len,) = struct.unpack_from("<Q", data)
    header = json.loads(bytes(memoryview(data)[8:8 + header_len]))
    start = 8 + header_len
    views = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise DeltaFormatError(f"tensor {name!r} has dtype {info['dtype']}, which no delta tensor has")
        begin, end = info["data_offsets"]
        if begin == end:  # frombuffer refuses an empty range
            views[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        views[name] = flat.view(info["shape"])
    return views


def _checked_delta(path: Path, raw: str, tensors: Mapping[str, torch.Tensor], expected_fingerprint: str | None,
                   base_shapes: Mapping[str, tuple] | None) -> DeltaFile:
    """Parse the metadata and check it, the tensors, the base fingerprint and the base shapes."""
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DeltaFormatError(f"{path}: metadata is not valid JSON ({exc})") from exc
    weights = parse_weights(metadata, tensors)
    if expected_fingerprint is not None and metadata["base_fingerprint"] != expected_fingerprint:
        raise DeltaFormatError(
            f"base fingerprint mismatch: the delta was made for base {metadata['base_fingerprint']}, "
            f"this base is {expected_fingerprint}"
        )
    if base_shapes is not None:
        for name, delta in weights.items():
            if name not in base_shapes:
                raise DeltaFormatError(f"weight {name!r} of the delta is not in the base model")
            if tuple(base_shapes[name]) != tuple(delta.shape):
                raise DeltaFormatError(
                    f"weight {name!r}: delta shape {list(delta.shape)} != base shape {list(base_shapes[name])}"
                )
    return DeltaFile(metadata=metadata, weights=weights)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DeltaFormatError(message)


def _tensor(tensors: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple,
            floats: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The tensor, its dtype and shape checked; a floating one is added to ``floats`` for _require_finite."""
    _require(name in tensors, f"tensor {name!r} is missing")
    t = tensors[name]
    _require(t.dtype == dtype, f"tensor {name!r} has dtype {t.dtype}, expected {dtype}")
    _require(tuple(t.shape) == tuple(shape), f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
    if dtype.is_floating_point:
        floats.append((name, t))
    return t


def _require_finite(floats: list[tuple[str, torch.Tensor]]) -> None:
    """No NaN or Inf in ``floats``; the message names the first offender.

    A delta has thousands of small tensors: one torch call per tensor costs more than the data (and each
    call releases the GIL, so concurrent uploads thrash it). One foreach call over all of them instead:
    a max-abs norm is finite exactly when the tensor is."""
    if not floats:
        return
    norms = torch._foreach_norm([t for _, t in floats], float("inf"))
    bad = torch.nonzero(~torch.isfinite(torch.stack(norms))).flatten()  # stack promotes fp16 and fp32 alike
    if len(bad):
        raise DeltaFormatError(f"tensor {floats[int(bad[0])][0]!r} contains NaN or Inf")


def parse_weights(metadata: dict, tensors: Mapping[str, torch.Tensor]) -> dict[str, WeightDelta]:
    """Check metadata and tensors against each other; build the weight dataclasses."""
    _require(isinstance(metadata, dict), "metadata is not a JSON object")
    version = metadata.get("format_version")
    _require(version == FORMAT_VERSION, f"format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    method = metadata.get("method")
    _require(method in METHOD_KINDS, f"unknown method {method!r} (known: {', '.join(METHOD_KINDS)})")
    fingerprint = metadata.get("base_fingerprint")
    _require(isinstance(fingerprint, str) and bool(fingerprint), "base_fingerprint is missing")
    group_size = metadata.get("group_size")
    _require(isinstance(group_size, int) and group_size > 0 and group_size % 32 == 0,
             f"group_size {group_size!r} is not a positive multiple of 32")
    entries = metadata.get("weights")
    _require(isinstance(entries, dict), "metadata 'weights' is missing")
    floats: list[tuple[str, torch.Tensor]] = []  # checked tensors awaiting one batched finiteness check
    try:
        weights = _parse_entries(entries, method, group_size, tensors, floats)
    except DeltaFormatError:
        _require_finite(floats)  # a non-finite tensor checked before the failure is reported first, as before
        raise
    _require_finite(floats)
    used = {f"{name}/{key}" for name, delta in weights.items() for key in delta.tensors()}
    extra = sorted(set(tensors) - used)
    if extra:
        raise DeltaFormatError(f"tensor {extra[0]!r} is not described by the metadata")
    return weights


def _parse_entries(entries: dict, method: str, group_size: int, tensors: Mapping,
                   floats: list[tuple[str, torch.Tensor]]) -> dict[str, WeightDelta]:
    """Each metadata entry checked against its tensors (finiteness aside: see _tensor)."""
    weights: dict[str, WeightDelta] = {}
    for name, entry in entries.items():
        delta = _parse_weight(name, entry, method, group_size, tensors, floats)
        stored = weight_bytes(delta)
        _require(entry.get("bytes") == stored, f"weight {name!r}: metadata bytes {entry.get('bytes')} != stored {stored}")
        weights[name] = delta
    return weights


def _parse_weight(name: str, entry: dict, method: str, group_size: int, tensors: Mapping,
                  floats: list[tuple[str, torch.Tensor]]) -> WeightDelta:
    _require(isinstance(entry, dict), f"weight {name!r}: metadata entry is not an object")
    shape = entry.get("shape")
    _require(isinstance(shape, list) and len(shape) in (1, 2) and all(isinstance(n, int) and n > 0 for n in shape),
             f"weight {name!r}: bad shape {shape!r}")
    kind = entry.get("kind")
    allowed = {"dense"} if len(shape) == 1 else {METHOD_KINDS[method]}
    _require(kind in allowed, f"weight {name!r}: kind {kind!r} is not valid for method {method!r} and shape {shape}")
    if kind == "dense":
        return DenseDelta(_tensor(tensors, f"{name}/delta", torch.float16, shape, floats))
    d_out, d_in = shape
    if kind == "sign":
        signs = _tensor(tensors, f"{name}/signs", torch.int32, (d_out, num_words(d_in)), floats)
        return SignDelta(signs, _tensor(tensors, f"{name}/scale", torch.float32, (1,), floats), (d_out, d_in))
    specs = entry.get("tiers")
    _require(isinstance(specs, list) and len(specs) > 0, f"weight {name!r}: 'tiers' must be a non-empty list")
    tiers: list[QuantTier | FloatTier] = []
    for t, spec in enumerate(specs):
        rank, bits = (spec.get("rank"), spec.get("bits")) if isinstance(spec, dict) else (None, None)
        _require(isinstance(rank, int) and 0 < rank <= min(d_out, d_in), f"weight {name!r} tier {t}: bad rank {rank!r}")
        want_float = method == "svd"
        _require(bits == FLOAT_BITS if want_float else isinstance(bits, int) and 1 <= bits <= MAX_BITS,
                 f"weight {name!r} tier {t}: bits {bits!r} not valid for method {method!r}")
        key = f"{name}/t{t}"
        s = _tensor(tensors, f"{key}/s", torch.float32, (rank,), floats)
        if want_float:
            tiers.append(FloatTier(_tensor(tensors, f"{key}/u", torch.float16, (rank, d_out), floats),
                                   _tensor(tensors, f"{key}/v", torch.float16, (rank, d_in), floats), s))
            continue
        tiers.append(QuantTier(
            bits, rank,
            _tensor(tensors, f"{key}/u_planes", torch.int32, (bits, rank, num_words(d_out)), floats),
            _tensor(tensors, f"{key}/u_scales", torch.float16, (rank, num_groups(d_out, group_size)), floats),
            _tensor(tensors, f"{key}/v_planes", torch.int32, (bits, rank, num_words(d_in)), floats),
            _tensor(tensors, f"{key}/v_scales", torch.float16, (rank, num_groups(d_in, group_size)), floats),
            s,
        ))
    _require(sum(tier.rank for tier in tiers) <= min(d_out, d_in), f"weight {name!r}: total rank exceeds {min(d_out, d_in)}")
    return LowRankDelta((d_out, d_in), tiers)
