"""TenantStore: tenants, versioned deltas validated before they become visible, hashed API keys, recovery."""
from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest

from deltaserve.delta_store import DeltaFormatError
from deltaserve.delta_store.checkpoint import open_checkpoint
from deltaserve.delta_store.registry import (
    InvalidTenantName, NoDelta, StoreInUse, TenantExists, TenantNotFound, TenantStore,
)
from store_deltas import make_delta, rewrite
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def base(tiny_base):
    ckpt = open_checkpoint(tiny_base)
    return tiny_base, ckpt.fingerprint(), ckpt.shapes()


@pytest.fixture(scope="module")
def deltas(base, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("deltas")
    return [make_delta(base[0], folder / f"d{i}.safetensors", seed=i) for i in range(3)]


def open_store(root: Path, base, **kw) -> TenantStore:
    _, fingerprint, shapes = base
    return TenantStore(root, fingerprint, shapes, **kw)


def files_of(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "deltas").rglob("*") if p.is_file()) + sorted(
        str(p.relative_to(root)) for p in (root / "staging").iterdir()
    )


def test_tenant_lifecycle(tmp_path, base, deltas):
    store = open_store(tmp_path, base)
    created = store.create_tenant("math-7b", "GSM8K fine-tune")
    assert created.name == "math-7b" and created.description == "GSM8K fine-tune" and created.current is None
    store.create_tenant("code")
    assert [t.name for t in store.list_tenants()] == ["code", "math-7b"]
    with pytest.raises(TenantExists):
        store.create_tenant("code")
    with pytest.raises(NoDelta):
        store.current_version("code")
    store.put_delta("code", deltas[0])
    store.delete_tenant("code")
    assert [t.name for t in store.list_tenants()] == ["math-7b"]
    assert not (tmp_path / "deltas" / "code").exists()
    with pytest.raises(TenantNotFound):
        store.get_tenant("code")
    with pytest.raises(TenantNotFound):
        store.delete_tenant("code")
    with pytest.raises(TenantNotFound):
        store.put_delta("code", deltas[0])
    assert files_of(tmp_path) == []


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "x" * 65, "tab\tname", "ünï"])
def test_invalid_names(tmp_path, base, name):
    with pytest.raises(InvalidTenantName):
        open_store(tmp_path, base).create_tenant(name)


def test_versions_flip_and_prune(tmp_path, base, deltas):
    store = open_store(tmp_path, base, keep_versions=2)
    store.create_tenant("a")
    versions = [store.put_delta("a", d) for d in deltas]
    assert [v.version for v in versions] == [1, 2, 3]
    current = store.current_version("a")
    assert current == versions[2]
    assert current.path == tmp_path / "deltas" / "a" / "v3.safetensors"
    assert current.sha256 == hashlib.sha256(deltas[2].read_bytes()).hexdigest()
    assert current.size_bytes == deltas[2].stat().st_size
    assert current.method == "deltacome" and current.bits_per_param > 0
    # Only the newest keep_versions survive, on disk and in the table.
    assert [v.version for v in store.list_versions("a")] == [2, 3]
    assert files_of(tmp_path) == ["deltas/a/v2.safetensors", "deltas/a/v3.safetensors"]
    # The caller's upload is copied, never moved.
    assert all(d.exists() for d in deltas)


def _truncated(src: Path, out: Path) -> Path:
    out.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return out


def _garbage(src: Path, out: Path) -> Path:
    out.write_bytes(b"\x00\x01not a safetensors file" * 10)
    return out


def _nan_scale(src: Path, out: Path) -> Path:
    def edit(tensors):
        name = next(n for n in tensors if n.endswith("/u_scales"))
        tensors[name][0, 0] = float("nan")
    return rewrite(src, out, edit)


def _missing_tensor(src: Path, out: Path) -> Path:
    return rewrite(src, out, lambda tensors: tensors.pop(next(n for n in tensors if n.endswith("/v_planes"))))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_truncated, "not a readable safetensors file"),
        (_garbage, "not a readable safetensors file"),
        (_nan_scale, "contains NaN or Inf"),
        (_missing_tensor, "is missing"),
    ],
)
def test_corrupt_upload_leaves_old_version(tmp_path, base, deltas, corrupt, message):
    store = open_store(tmp_path / "store", base)
    store.create_tenant("a")
    good = store.put_delta("a", deltas[0])
    bad = corrupt(deltas[1], tmp_path / "bad.safetensors")
    with pytest.raises(DeltaFormatError, match=message):
        store.put_delta("a", bad)
    store.close()
    assert_only_version(tmp_path / "store", base, good)


def test_wrong_fingerprint(tmp_path, base, deltas):
    store = open_store(tmp_path / "store", base)
    store.create_tenant("a")
    good = store.put_delta("a", deltas[0])
    other = make_delta(base[0], tmp_path / "other.safetensors", fingerprint="sha256:another-base")
    with pytest.raises(DeltaFormatError, match="base fingerprint mismatch"):
        store.put_delta("a", other)
    store.close()
    assert_only_version(tmp_path / "store", base, good)


def test_wrong_shapes(tmp_path, base, deltas):
    """A delta for a differently shaped model that claims our fingerprint is refused by shape."""
    store = open_store(tmp_path / "store", base)
    store.create_tenant("a")
    good = store.put_delta("a", deltas[0])
    wide = make_tiny_model(tmp_path / "wide", hidden_size=96, intermediate_size=160, num_attention_heads=4,
                           num_key_value_heads=4)
    liar = make_delta(wide, tmp_path / "liar.safetensors", fingerprint=base[1])
    with pytest.raises(DeltaFormatError, match="delta shape .* != base shape"):
        store.put_delta("a", liar)
    store.close()
    assert_only_version(tmp_path / "store", base, good)


def assert_only_version(root: Path, base, good) -> None:
    """The store serves ``good``, holds no other file, and says the same after a restart."""
    for _ in range(2):
        store = open_store(root, base)
        assert store.current_version("a") == good
        assert [v.version for v in store.list_versions("a")] == [good.version]
        assert files_of(root) == [f"deltas/a/v{good.version}.safetensors"]
        store.close()


def test_one_process_owns_a_store(tmp_path, base):
    store = open_store(tmp_path, base)
    with pytest.raises(StoreInUse):
        open_store(tmp_path, base)  # its recovery would delete the first one's uploads in progress
    store.close()
    open_store(tmp_path, base).close()


def test_recovery_removes_debris_and_keeps_committed(tmp_path, base, deltas):
    store = open_store(tmp_path, base)
    store.create_tenant("a")
    v1 = store.put_delta("a", deltas[0])
    store.close()
    # What a crash can leave: a half-copied upload, a version renamed into place whose row never
    # committed, and the folder of a tenant whose delete committed before its files went.
    (tmp_path / "staging" / "1234.part").write_bytes(b"half an upload")
    (tmp_path / "deltas" / "a" / "v2.safetensors").write_bytes(deltas[1].read_bytes())
    (tmp_path / "deltas" / "gone").mkdir()
    (tmp_path / "deltas" / "gone" / "v1.safetensors").write_bytes(deltas[2].read_bytes())
    store = open_store(tmp_path, base)
    assert files_of(tmp_path) == ["deltas/a/v1.safetensors"]
    assert store.current_version("a") == v1
    # The next version takes the number the crashed one never committed.
    assert store.put_delta("a", deltas[1]).version == 2


def test_recovery_falls_back_when_current_file_lost(tmp_path, base, deltas):
    store = open_store(tmp_path, base)
    store.create_tenant("a")
    v1 = store.put_delta("a", deltas[0])
    v2 = store.put_delta("a", deltas[1])
    store.close()
    v2.path.write_bytes(v2.path.read_bytes()[:100])  # outside interference: truncated on disk
    store = open_store(tmp_path, base)
    assert store.current_version("a") == v1
    assert files_of(tmp_path) == ["deltas/a/v1.safetensors"]


def test_concurrent_puts_get_distinct_versions(tmp_path, base, deltas):
    store = open_store(tmp_path, base, keep_versions=10)
    store.create_tenant("a")
    results, errors = [], []

    def put(path):
        try:
            results.append(store.put_delta("a", path).version)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(d,)) for d in deltas * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == list(range(1, 7))
    assert store.current_version("a").version == 6
    assert len(files_of(tmp_path)) == 6


def test_api_keys_hashed_and_scoped(tmp_path, base):
    store = open_store(tmp_path, base)
    store.create_tenant("a")
    store.create_tenant("b")
    key_a, key_b = store.issue_key("a"), store.issue_key("b")
    assert key_a != key_b and key_a.startswith("ds-")
    assert store.tenant_for_key(key_a) == "a" and store.tenant_for_key(key_b) == "b"
    tampered = key_a[:-1] + ("A" if key_a[-1] != "A" else "B")
    for bad in (tampered, "", "ds-", "Bearer " + key_a, key_a + "x", "ds-" + "0" * 16 + "." + "x" * 43):
        assert store.tenant_for_key(bad) is None
    with pytest.raises(TenantNotFound):
        store.issue_key("nobody")
    store.close()
    # The database never holds the secret; a reopened store still verifies the key.
    secret = key_a.split(".", 1)[1].encode()
    assert all(secret not in p.read_bytes() for p in tmp_path.glob("registry.sqlite3*"))
    store = open_store(tmp_path, base)
    assert store.tenant_for_key(key_a) == "a"
    store.delete_tenant("a")
    assert store.tenant_for_key(key_a) is None  # also after it was verified (and cached) once
    store.create_tenant("a")
    assert store.tenant_for_key(key_a) is None  # a new tenant of the same name does not inherit keys
    assert store.tenant_for_key(key_b) == "b"
    rows = sqlite3.connect(tmp_path / "registry.sqlite3").execute("SELECT tenant FROM api_keys").fetchall()
    assert rows == [("b",)]
    store.close()


def test_reopen_keeps_everything(tmp_path, base, deltas):
    store = open_store(tmp_path, base)
    store.create_tenant("a", "first")
    v = store.put_delta("a", deltas[0])
    key = store.issue_key("a")
    before = store.list_tenants()
    store.close()
    store = open_store(tmp_path, base)
    assert store.list_tenants() == before
    assert store.current_version("a") == v
    assert store.tenant_for_key(key) == "a"
