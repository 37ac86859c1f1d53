"""Configuration of the engine and of one request's sampling, validated when made."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class EngineConfig:
    """One engine: a backbone, its delta slots and its KV cache."""

    model: str                          # HF folder or .gguf file (see delta_store.checkpoint.open_checkpoint)
    device: str = "cpu"
    dtype: str = "float32"              # backbone and activations; deltas keep their stored precision
    max_slots: int = 8                  # tenants resident at once (global slots 0..max_slots-1; -1 = base)
    slot_bits_per_param: float = 1.0    # capacity of one slot, in bits per backbone weight-matrix parameter
    block_size: int = 16                # tokens per KV block
    num_kv_blocks: int | None = None    # None: as many as fit in free memory (device) or 1 GiB (CPU)
    max_num_seqs: int = 64              # rows of one decode step
    max_num_batched_tokens: int = 2048  # tokens of one step (prefill chunks + decodes)
    max_model_len: int = 2048           # prompt + completion
    seed: int = 0                       # seeds requests that bring no seed of their own
    delta_kernels: bool = True          # False: the PyTorch delta path on CUDA too (the benchmarks' baseline)
    cuda_graphs: bool | None = None     # decode steps replayed from CUDA graphs; None: on CUDA. True off CUDA
    #                                     runs the same padded static-shaped step without capturing (tests)
    exact_graph_after: int = 1          # a tenant mix's own decode graph once the mix has come this often; until
    #                                     then its batch size's covering graph (engine/decode_graphs.py). 1: at once,
    #                                     no covering graphs: measured on the H100 without a clear gain (README,
    #                                     7B load section; bench/results/tenant_mix_steps.md)
    kernel_warmup: bool | None = None   # compile the Triton kernels before taking requests (engine/kernel_warmup.py);
    #                                     None: on CUDA with delta_kernels. True off CUDA needs TRITON_INTERPRET=1

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        positive = ("max_slots", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                    "exact_graph_after")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.slot_bits_per_param <= 0:
            raise ValueError(f"slot_bits_per_param must be > 0, got {self.slot_bits_per_param}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1 or None, got {self.num_kv_blocks}")
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device {self.device!r} is not a torch device: {exc}") from exc

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass(slots=True)
class SamplingParams:
    """How to pick the tokens of one request (the OpenAI parameters the server passes through)."""

    max_tokens: int = 16
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    seed: int | None = None             # same seed, prompt and tenant -> same tokens
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None         # None: no logprobs; n: the chosen token's and the top n alternatives'
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (OpenAI's echo); such a
                                        # request computes its whole prompt (no prefix cache), and with
                                        # max_tokens 0 ends there (scoring only)
    ignore_eos: bool = False
    # OpenAI's penalties on tokens already generated (subtracted from their logits: presence once, frequency per
    # occurrence) and vLLM's repetition penalty on tokens of the prompt or output (positive logits divided by it,
    # negative ones multiplied); sampler.process_logits applies them, logit_bias and min_tokens.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0     # 1 = off
    logit_bias: dict[int, float] = field(default_factory=dict)   # OpenAI's: token id -> added to its logit
    min_tokens: int = 0                 # vLLM's: EOS and stop_token_ids masked until this many tokens (stop strings
                                        # still end a request)

    def __post_init__(self) -> None:
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be >= 1 (0 only to score the prompt, with prompt_logprobs), got "
                             f"{self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 20:
                raise ValueError(f"{name} must be in [0, 20], got {getattr(self, name)}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if any(t < 0 or not -100 <= b <= 100 for t, b in self.logit_bias.items()):
            raise ValueError("logit_bias maps token ids >= 0 to biases in [-100, 100]")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens = {self.max_tokens}], got {self.min_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def adjusts_logits(self) -> bool:
        """Whether sampler.process_logits changes this request's logits (penalties, logit_bias, min_tokens)."""
        return self.penalized or bool(self.logit_bias) or self.min_tokens > 0
