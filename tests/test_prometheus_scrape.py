"""A real Prometheus scrapes a real server's /metrics and answers per-tenant counters through its query API."""
from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
from server_harness import LiveServer, free_port, tiny_config
from store_deltas import make_delta

pytestmark = pytest.mark.slow

REQUESTS = {"alpha": 3, "beta": 2}


def _query(prom: str, expr: str) -> dict[str, float]:
    """Instant query; {tenant label: value} of the result vector."""
    body = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    return {r["metric"].get("tenant", ""): float(r["value"][1]) for r in body["data"]["result"]}


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus binary missing (.ci/run installs it)")
def test_prometheus_scrapes_per_tenant_counters(tiny_base, tmp_path):
    with LiveServer(tiny_config(tiny_base, tmp_path / "store")) as server:
        keys = {t: server.add_tenant(t, make_delta(tiny_base, tmp_path / f"{t}.safetensors", seed=i))
                for i, t in enumerate(REQUESTS)}
        for tenant, count in REQUESTS.items():
            client = server.openai(keys[tenant])
            for _ in range(count):
                client.completions.create(model=tenant, prompt="hello world", max_tokens=3, temperature=0)

        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n  - job_name: deltaserve\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{server.config.server.port}']\n"
        )
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        prom = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            requests: dict[str, float] = {}
            while requests != {t: float(c) for t, c in REQUESTS.items()}:
                assert prometheus.poll() is None, prometheus.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, f"Prometheus never saw the counters; last answer {requests}"
                time.sleep(1)
                try:
                    requests = _query(prom, 'sum by (tenant) (deltaserve_requests_total{endpoint="completions"})')
                except httpx.TransportError:  # still starting
                    continue
            tokens = _query(prom, "sum by (tenant) (deltaserve_completion_tokens_total)")
            assert tokens == {t: 3.0 * c for t, c in REQUESTS.items()}
            assert _query(prom, "vllm:lora_requests_info"), "the adapter-affinity gauge is scraped too"
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
