"""`deltaserve serve` as users start it, in a subprocess: config-less vLLM style with --model and --tenant."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
from server_harness import free_port
from store_deltas import make_delta

CLI = [sys.executable, "-m", "deltaserve.server.cli", "serve"]


def test_serve_model_and_tenants_from_flags(tiny_base, tmp_path):
    delta = make_delta(tiny_base, tmp_path / "delta.safetensors")
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "--model", str(tiny_base), "--tenant", f"acme={delta}", "--port", str(port), "--max-model-len", "128",
         "--served-model-name", "tiny",
         "--store-dir", str(tmp_path / "store"), "--admin-key", "cli-admin-key", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        # Config-less, like vLLM: no key needed for inference; the admin key guards /admin.
        models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert models == ["tiny", "acme"]
        reply = httpx.post(f"{url}/v1/completions", json={"model": "acme", "prompt": "hello", "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(f"{url}/admin/tenants").status_code == 401
        tenants = httpx.get(f"{url}/admin/tenants", headers={"Authorization": "Bearer cli-admin-key"}).json()
        assert [t["name"] for t in tenants["data"]] == ["acme"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def test_serve_rejects_bad_flags(tmp_path):
    missing = subprocess.run([*CLI], capture_output=True, text=True)
    assert missing.returncode == 2 and "--config FILE or --model" in missing.stderr
    bad = subprocess.run([*CLI, "--model", str(tmp_path), "--tenant", "no-equals-sign"], capture_output=True, text=True)
    assert bad.returncode == 2 and "NAME=DELTA_FILE" in bad.stderr
