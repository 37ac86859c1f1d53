"""Input Hessians (sum of x x^T) of the base model's linear layers on calibration text, for GPTQ.

A 7B model's Hessians together take ~20 GB (one d_in x d_in matrix per linear), so they are collected in
chunks of layers that fit `max_hessian_bytes`, following the order in which compression asks for them:
one forward pass over the calibration text per chunk, and only one chunk held at a time.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint


@dataclass(frozen=True)
class CalibrationConfig:
    seq_len: int = 512  # tokens per calibration sequence
    max_sequences: int = 64  # more text than this is ignored
    max_hessian_bytes: int = 2 << 30  # Hessians held at once (fp32)


def _load_model(checkpoint: Checkpoint, device: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    path = checkpoint.path
    if path.is_file():  # GGUF
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


class Hessians:
    """Hessian of the input of the linear layer owning a weight; None for weights of other modules."""

    def __init__(self, checkpoint: Checkpoint, text_file: Path, order: list[str], device: str,
                 config: CalibrationConfig = CalibrationConfig()):
        try:
            text = Path(text_file).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ValueError(f"--calibration {text_file}: cannot read ({exc.strerror})") from None
        tokenizer = checkpoint.tokenizer()
        # Read no more characters than the token budget can use (a token is rarely under one character).
        ids = tokenizer(text[: config.seq_len * config.max_sequences * 8], return_tensors="pt").input_ids[0]
        if ids.numel() < 2:
            raise ValueError(f"--calibration {text_file}: the file holds no text")
        self._sequences = [ids[i : i + config.seq_len] for i in range(0, ids.numel(), config.seq_len)]
        self._sequences = self._sequences[: config.max_sequences]
        self._device = device
        self._config = config
        self._model = _load_model(checkpoint, device)
        self._linears = {f"{name}.weight": m for name, m in self._model.named_modules() if isinstance(m, nn.Linear)}
        self._order = [name for name in order if name in self._linears]
        self._held: dict[str, torch.Tensor] = {}

    def get(self, weight_name: str) -> torch.Tensor | None:
        if weight_name not in self._linears:
            return None
        if weight_name not in self._held:
            self._held = {}  # release the previous chunk before collecting the next
            self._held = self._collect(self._chunk_from(weight_name))
        return self._held[weight_name]

    def _chunk_from(self, weight_name: str) -> list[str]:
        start = self._order.index(weight_name) if weight_name in self._order else 0
        chunk, used = [], 0
        for name in [weight_name] + [n for n in self._order[start:] if n != weight_name]:
            size = 4 * self._linears[name].in_features ** 2
            if chunk and used + size > self._config.max_hessian_bytes:
                break
            chunk.append(name)
            used += size
        return chunk

    @torch.no_grad()
    def _collect(self, names: list[str]) -> dict[str, torch.Tensor]:
        sums = {n: torch.zeros(self._linears[n].in_features, self._linears[n].in_features, device=self._device)
                for n in names}
        tokens = 0

        def hook(name: str):
            def accumulate(module: nn.Module, inputs: tuple) -> None:
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                sums[name].addmm_(x.T, x)
            return accumulate

        handles = [self._linears[n].register_forward_pre_hook(hook(n)) for n in names]
        try:
            for seq in self._sequences:
                self._model(seq.unsqueeze(0).to(self._device))
                tokens += seq.numel()
        finally:
            for handle in handles:
                handle.remove()
        return {n: h / tokens for n, h in sums.items()}
