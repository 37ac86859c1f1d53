"""A real deltaserve server for tests: uvicorn on a free port in a background thread, built from
configs/tiny.yaml with the test's model and store, plus helpers to talk to it over HTTP."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import uvicorn

from deltaserve.server.app import create_app
from deltaserve.server.config import ServerConfig, config_from_dict, read_yaml

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "test-admin-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(model: Path, store: Path, **server_overrides) -> ServerConfig:
    """configs/tiny.yaml (so the shipped file is what the tests run) with this test's model and store."""
    raw = read_yaml(REPO / "configs" / "tiny.yaml")
    raw["engine"]["model"] = str(model)
    raw["store"]["root"] = str(store)
    raw["server"].update(port=free_port(), **server_overrides)
    return config_from_dict(raw)


class LiveServer:
    """``with LiveServer(config) as server:`` serves until the block ends (a clean shutdown, like Ctrl-C)."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.app = create_app(config)
        self.url = f"http://127.0.0.1:{config.server.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=config.server.port,
                                                     log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._serve, name="deltaserve-test-server", daemon=True)
        self.exit_code: int | None = None

    def _serve(self) -> None:
        try:
            self._server.run()
        except SystemExit as exc:  # uvicorn exits 3 when the app's start-up fails
            self.exit_code = exc.code

    @property
    def state(self):
        return self.app.state.deltaserve

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        deadline = time.monotonic() + 180
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the test server failed to start, exit code {self.exit_code} (see the log)")
            if time.monotonic() > deadline:
                raise TimeoutError("the test server did not start within 180 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)

    def openai(self, key: str | None) -> openai.OpenAI:
        # max_retries=0: a test must see the first answer, not a retried one.
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "", max_retries=0, timeout=120)

    def http(self, key: str | None = ADMIN_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def add_tenant(self, name: str, delta: Path) -> str:
        """Create ``name`` through the admin API, upload its delta, and return a fresh API key for it."""
        with self.http() as admin:
            admin.post("/admin/tenants", json={"name": name}).raise_for_status()
            admin.put(f"/admin/tenants/{name}/delta", content=delta.read_bytes()).raise_for_status()
            return admin.post(f"/admin/tenants/{name}/keys").json()["key"]
