"""compress(): base + fine-tuned checkpoint -> one delta file, reading one tensor pair at a time.

Every input problem is found before anything is written and reported as one ValueError line naming the
tensor or option; the output appears only complete (format.write_delta writes a temp file and renames).
"""

import os
from pathlib import Path
from typing import Callable

import torch

from .allocation import AdaptivePlan, TierPlan
from .calibration import Hessians
from .checkpoint import ARCHITECTURE_FIELDS, Checkpoint, open_checkpoint
from .deltacome import DEFAULT_PLAN
from .format import WeightDelta, write_delta
from .methods import MethodOptions, compress_weight

# progress(done, total, weight_name) after each weight.
Progress = Callable[[int, int, str], None]


def _check_output(out: Path) -> None:
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder, expected a file path")
    folder = out.parent
    if not folder.is_dir():
        raise ValueError(f"--out {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: folder {folder} is not writable")


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device {device!r}: expected cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")


def _check_pair(base: Checkpoint, finetuned: Checkpoint) -> list[str]:
    """Names to compress, after checking that the two checkpoints have one architecture."""
    for field in ARCHITECTURE_FIELDS:
        ours, theirs = getattr(base.config, field, None), getattr(finetuned.config, field, None)
        if ours != theirs:
            raise ValueError(f"base and fine-tune differ in config field {field!r}: {ours!r} vs {theirs!r}")
    names, tuned = base.names(), set(finetuned.names())
    for name in names:
        if name not in tuned:
            raise ValueError(f"tensor {name!r} of the base is missing from the fine-tune")
        if base.shape(name) != finetuned.shape(name):
            raise ValueError(f"tensor {name!r}: base shape {list(base.shape(name))} != "
                             f"fine-tune shape {list(finetuned.shape(name))}")
    extra = sorted(tuned - set(names))
    if extra:
        raise ValueError(f"tensor {extra[0]!r} of the fine-tune is not in the base")
    return names


def _read(checkpoint: Checkpoint, name: str, role: str, device: str) -> torch.Tensor:
    tensor = checkpoint.get(name, torch.float32).to(device)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"tensor {name!r} of the {role} contains NaN or Inf")
    return tensor


def compress(
    base: str | Path,
    finetuned: str | Path,
    out: str | Path,
    method: str = "deltacome",
    bits_per_param: float = 1.0,
    group_size: int = 128,
    calibration: str | Path | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    tiers: TierPlan | AdaptivePlan = DEFAULT_PLAN,
) -> Path:
    """Write the delta finetuned - base to `out`; returns `out`."""
    options = MethodOptions(method, bits_per_param, group_size, tiers)
    out = Path(out)
    _check_output(out)
    _check_device(device)
    base_ckpt, tuned_ckpt = open_checkpoint(base), open_checkpoint(finetuned)
    names = _check_pair(base_ckpt, tuned_ckpt)
    if calibration is not None and method != "deltacome":
        raise ValueError(f"--calibration is used only by the deltacome method, not {method!r}")
    hessians = None
    if calibration is not None:
        hessians = Hessians(base_ckpt, Path(calibration), names, device)

    weights: dict[str, WeightDelta] = {}
    for done, name in enumerate(names, start=1):
        delta = _read(tuned_ckpt, name, "fine-tune", device) - _read(base_ckpt, name, "base", device)
        hessian = hessians.get(name) if hessians is not None and delta.dim() == 2 else None
        try:
            compressed = compress_weight(delta, options, hessian)
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from None
        if compressed is not None:
            weights[name] = compressed
        if progress is not None:
            progress(done, len(names), name)

    header = {
        "method": method,
        "base_fingerprint": base_ckpt.fingerprint(),
        "source": {"base": str(base), "finetuned": str(finetuned),
                   "calibration": None if calibration is None else str(calibration)},
        "group_size": group_size,
        "bits_per_param_budget": bits_per_param,
        "method_config": options.config() | {"calibrated": hessians is not None},
    }
    try:
        return write_delta(out, weights, header)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
