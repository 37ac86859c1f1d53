"""A `deltaserve serve` subprocess for benchmarks: a real uvicorn on a loopback port, stopped like Ctrl-C.

It runs in its own process (not a thread of the benchmark) so the load generator's event loop and the
server's never compete for one GIL, as with a real client and server.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

# Names of the server's tier metrics as /metrics exposes them (prometheus-client adds _total, _sum, _count).
TIER_EVENTS = "deltaserve_delta_tier_events_total"
LOAD_SECONDS = "deltaserve_delta_load_seconds"


@dataclass(slots=True)
class ServerSpec:
    model: str                 # HF folder or .gguf
    device: str
    dtype: str
    max_slots: int
    host_bytes: str            # host tier limit, e.g. "2GiB"
    store: Path
    admin_key: str
    max_model_len: int
    max_num_seqs: int
    served_model_name: str = "base"
    exact_graph_after: int = 1    # EngineConfig's (and its default): when a tenant mix gets a graph of its own


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the benchmark dies, even by SIGKILL (a device time limit),
    so no server outlives its run holding the GPU and the store's lock."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(spec, log) as server:`` serves until the block ends; ``server.url`` is its base."""

    def __init__(self, spec: ServerSpec, log_path: Path, start_timeout_s: float = 600):
        self.spec = spec
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None

    def _config(self) -> dict:
        s = self.spec
        return {
            "engine": {"model": s.model, "device": s.device, "dtype": s.dtype, "max_slots": s.max_slots,
                       "max_model_len": s.max_model_len, "max_num_seqs": s.max_num_seqs,
                       "exact_graph_after": s.exact_graph_after},
            "server": {"host": "127.0.0.1", "port": self.port, "served_model_name": s.served_model_name,
                       "admin_key": s.admin_key, "require_api_key": False, "max_upload_bytes": "16GiB"},
            # The host tier size is a config-file setting only (no CLI flag), hence the file.
            "store": {"root": str(s.store), "host_bytes_limit": s.host_bytes},
        }

    def __enter__(self) -> "ServerProcess":
        self.spec.store.mkdir(parents=True, exist_ok=True)
        config = self.log_path.with_suffix(".yaml")
        config.write_text(yaml.safe_dump(self._config()))
        self._log = self.log_path.open("w")
        # `python -m` rather than the `deltaserve` script: the GPU machine runs the checkout uninstalled.
        # PYTHONSAFEPATH: no cwd on sys.path, where the checkout's kernels/ would shadow transformers' `kernels`.
        self.proc = subprocess.Popen([sys.executable, "-m", "deltaserve.server.cli", "serve", "--config", str(config),
                                      "--log-level", "warning"], env={**os.environ, "PYTHONSAFEPATH": "1"},
                                     stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        try:
            self._wait_ready()
        except BaseException:  # a failed or interrupted start-up: `with` will not call __exit__ for us
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"deltaserve exited with {self.proc.returncode} at start-up; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"deltaserve was not ready within {self.start_timeout_s:.0f} s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown: the engine stops, the store closes
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode if self.proc is not None else None
        self._log.close()

    def admin(self, timeout_s: float = 600) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.spec.admin_key}"},
                            timeout=timeout_s)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {"name{label=value,...}": value}, for before/after differences."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}"] = sample.value
        return out


def metrics_diff(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}
