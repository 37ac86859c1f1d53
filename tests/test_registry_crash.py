"""Kill a process in the middle of uploading versions (SIGKILL: no cleanup runs) and check that reopening
the store finds every committed version intact, a current version that loads, and no debris."""
from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from deltaserve.delta_store import load_delta
from deltaserve.delta_store.checkpoint import open_checkpoint
from deltaserve.delta_store.registry import TenantStore
from store_deltas import make_delta

UPLOADER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from deltaserve.delta_store.registry import TenantStore
    root, fingerprint, shapes, *deltas = sys.argv[1:]
    store = TenantStore(Path(root), fingerprint, {k: tuple(v) for k, v in json.loads(shapes).items()})
    i = 0
    while True:
        version = store.put_delta("a", Path(deltas[i % len(deltas)]))
        print(version.version, flush=True)
        i += 1
    """
)


@pytest.mark.slow
def test_sigkill_during_uploads_leaves_a_consistent_store(tmp_path, tiny_base):
    base = open_checkpoint(tiny_base)
    fingerprint, shapes = base.fingerprint(), base.shapes()
    deltas = [str(make_delta(tiny_base, tmp_path / f"d{i}.safetensors", seed=i)) for i in range(3)]
    root = tmp_path / "store"
    store = TenantStore(root, fingerprint, shapes)
    store.create_tenant("a")
    store.close()
    rng = random.Random(0)
    last_seen = 0
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", UPLOADER, str(root), fingerprint, json.dumps(shapes), *deltas],
            stdout=subprocess.PIPE, text=True,
        )
        # Let it commit a few versions, then kill it at an arbitrary point of the next ones.
        for _ in range(3):
            last_seen = int(child.stdout.readline())
        time.sleep(rng.uniform(0.0, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL

        store = TenantStore(root, fingerprint, shapes)
        versions = store.list_versions("a")
        current = store.current_version("a")
        assert current == versions[-1] and current.version >= last_seen
        on_disk = sorted(p.name for p in (root / "deltas" / "a").iterdir())
        assert on_disk == sorted(f"v{v.version}.safetensors" for v in versions)
        assert list((root / "staging").iterdir()) == []
        for v in versions:
            assert hashlib.sha256(v.path.read_bytes()).hexdigest() == v.sha256
        load_delta(current.path, expected_fingerprint=fingerprint, base_shapes=shapes)
        store.close()
