"""Tenant registry: SQLite metadata plus versioned delta files on disk.

Layout under ``root``::

    registry.sqlite3                    tenants, delta_versions, api_keys
    deltas/<tenant>/v<N>.safetensors    one immutable file per version
    staging/                            uploads being copied (or moved) and validated; emptied at every open

Crash safety rests on one ordering: a version's file is fsynced and renamed into place before the row
naming it commits, and rows are deleted before their files. So every row names a complete file, and a
file without a row is debris of an interrupted put or delete, which reopening removes.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from deltaserve.delta_store import apikeys
from deltaserve.delta_store.format import DeltaFile, load_delta_buffer

log = logging.getLogger(__name__)

# Names become directory names and OpenAI `model` ids: no path separators, no leading dot.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_FILE_RE = re.compile(r"^v([0-9]+)\.safetensors$")
_VERSION_COLUMNS = "tenant, version, size_bytes, sha256, method, bits_per_param, created"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    created REAL NOT NULL,
    current_version INTEGER          -- NULL until the first delta is accepted
);
CREATE TABLE IF NOT EXISTS delta_versions (
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    method TEXT NOT NULL,
    bits_per_param REAL,
    created REAL NOT NULL,
    PRIMARY KEY (tenant, version)
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    salt BLOB NOT NULL,
    digest BLOB NOT NULL,
    created REAL NOT NULL
);
"""


class RegistryError(Exception):
    """Base of the registry's own errors (invalid deltas raise the format's DeltaFormatError)."""


class TenantNotFound(RegistryError, LookupError):
    pass


class TenantExists(RegistryError):
    pass


class InvalidTenantName(RegistryError, ValueError):
    pass


class StoreInUse(RegistryError):
    pass


class NoDelta(RegistryError, LookupError):
    """The tenant exists but no delta has been accepted for it yet."""


@dataclass(frozen=True)
class DeltaVersion:
    tenant: str
    version: int
    path: Path
    size_bytes: int
    sha256: str
    method: str
    bits_per_param: float | None
    created: float  # unix seconds


@dataclass(frozen=True)
class Tenant:
    name: str
    description: str
    created: float
    current: DeltaVersion | None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_all(file: BinaryIO) -> bytearray:
    """The rest of an open file in one writable buffer (tensors are made as views into it)."""
    data = bytearray(os.fstat(file.fileno()).st_size)
    with memoryview(data) as view:
        got = 0
        while got < len(data) and (n := file.readinto(view[got:])):
            got += n
    del data[got:]  # the file shrank meanwhile: keep what was read
    return data


def _copy_synced(src: Path, dst: Path) -> bytearray:
    """Copy src to dst, fsync it, and return the bytes written."""
    with open(src, "rb") as fin:
        data = _read_all(fin)
    with open(dst, "wb") as fout:
        fout.write(data)
        fout.flush()
        os.fsync(fout.fileno())
    return data


def _move_synced(src: Path, dst: Path) -> bytearray:
    """Rename src to dst (no copy), fsync it, and return its bytes."""
    os.replace(src, dst)
    with open(dst, "rb") as f:
        data = _read_all(f)
        os.fsync(f.fileno())  # the writer did not: the version must be durable before its row commits
    return data


class TenantStore:
    """Tenants, their delta versions and API keys. Thread-safe: the server calls it from worker threads."""

    def __init__(self, root: Path, base_fingerprint: str, base_shapes: dict[str, tuple], keep_versions: int = 2,
                 accept: Callable[[DeltaFile], None] | None = None):
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        self.root = Path(root)
        self.base_fingerprint = base_fingerprint
        self.base_shapes = base_shapes
        self.keep_versions = keep_versions
        # Extra check of a validated upload (the engine's slot capacity): raises ValueError to refuse it.
        self.accept = accept
        self._deltas = self.root / "deltas"
        self._staging = self.root / "staging"
        for folder in (self.root, self._deltas, self._staging):
            folder.mkdir(parents=True, exist_ok=True)
        # Recovery deletes whatever no committed row names, which is only safe if no other process is
        # writing here: one process owns a store (the OS drops the lock if that process dies).
        self._owner = open(self.root / "lock", "a")
        try:
            fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._owner.close()
            raise StoreInUse(f"{self.root} is in use by another open TenantStore (another server?)") from None
        # One connection shared under a lock: SQLite serialises writers anyway, and this keeps
        # "check then write" sequences atomic with respect to other threads of this process.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "registry.sqlite3", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._verified_keys: dict[bytes, str] = {}  # blake2b(plaintext key) -> tenant
        self._recover()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._owner.close()  # releases the flock

    # ---- tenants -------------------------------------------------------------------------------

    def create_tenant(self, name: str, description: str = "") -> Tenant:
        if not _NAME_RE.match(name):
            raise InvalidTenantName(
                f"invalid tenant name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO tenants (name, description, created) VALUES (?, ?, ?)", (name, description, time.time())
                )
        except sqlite3.IntegrityError:
            raise TenantExists(f"tenant {name!r} already exists") from None
        return self.get_tenant(name)

    def get_tenant(self, name: str) -> Tenant:
        with self._lock:
            row = self._db.execute(
                "SELECT name, description, created, current_version FROM tenants WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise TenantNotFound(f"tenant {name!r} does not exist")
        return self._tenant(row)

    def list_tenants(self) -> list[Tenant]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, description, created, current_version FROM tenants ORDER BY name"
            ).fetchall()
        return [self._tenant(row) for row in rows]

    def delete_tenant(self, name: str) -> None:
        # Under the lock throughout: a tenant re-created under this name must not lose its new files.
        with self._lock:
            with self._transaction() as db:
                if db.execute("DELETE FROM tenants WHERE name = ?", (name,)).rowcount == 0:
                    raise TenantNotFound(f"tenant {name!r} does not exist")
            self._verified_keys = {k: t for k, t in self._verified_keys.items() if t != name}
            # Rows are gone first: a crash here leaves only an orphan folder, which _recover removes.
            shutil.rmtree(self._deltas / name, ignore_errors=True)

    # ---- delta versions ------------------------------------------------------------------------

    def current_version(self, name: str) -> DeltaVersion:
        """The version requests are served with; raises TenantNotFound or NoDelta."""
        current = self.get_tenant(name).current
        if current is None:
            raise NoDelta(f"tenant {name!r} has no delta yet")
        return current

    def list_versions(self, name: str) -> list[DeltaVersion]:
        self.get_tenant(name)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_VERSION_COLUMNS} FROM delta_versions WHERE tenant = ? ORDER BY version", (name,)
            ).fetchall()
        return [self._version(row) for row in rows]

    def put_delta(self, name: str, upload_path: Path) -> DeltaVersion:
        """Validate ``upload_path`` against the base and make it the tenant's current version.

        The upload is copied into staging first and the *copy* is validated, so what gets served is
        exactly what was checked even if the caller's file changes meanwhile. Raises DeltaFormatError
        (a ValueError) for an invalid file; on any error the previous version keeps serving and no
        file is left behind.
        """
        return self._put(name, lambda staged: _copy_synced(Path(upload_path), staged))

    def adopt_delta(self, name: str, upload_path: Path) -> DeltaVersion:
        """put_delta for a file handed over to the store (the server's own upload): it is renamed into
        staging instead of copied, so it must be on the store's filesystem and nothing else may write it.
        Once the tenant is found the file is the store's: gone from ``upload_path`` whatever the outcome.
        """
        return self._put(name, lambda staged: _move_synced(Path(upload_path), staged))

    def _put(self, name: str, stage: Callable[[Path], bytearray]) -> DeltaVersion:
        """Stage a file (``stage`` puts it at the path given, fsynced, and returns its bytes), validate
        those bytes and install them as the next version."""
        self.get_tenant(name)  # fail before copying a large file for an unknown tenant
        staged = self._staging / f"{uuid.uuid4().hex}.part"
        try:
            data = stage(staged)
            # One read serves hashing and validation: the tensors checked are views into these bytes.
            sha256 = hashlib.sha256(data).hexdigest()
            delta = load_delta_buffer(staged, data, expected_fingerprint=self.base_fingerprint,
                                      base_shapes=self.base_shapes)
            if self.accept is not None:
                self.accept(delta)
            metadata = delta.metadata
            bits = metadata.get("bits_per_param")
            with self._lock:
                row = self._db.execute(
                    "SELECT (SELECT COALESCE(MAX(version), 0) FROM delta_versions WHERE tenant = ?)"
                    " FROM tenants WHERE name = ?",
                    (name, name),
                ).fetchone()
                if row is None:  # deleted while we validated
                    raise TenantNotFound(f"tenant {name!r} does not exist")
                version = DeltaVersion(
                    tenant=name, version=row[0] + 1, path=self._version_path(name, row[0] + 1), size_bytes=len(data),
                    sha256=sha256, method=str(metadata.get("method", "unknown")),
                    bits_per_param=float(bits) if bits is not None else None, created=time.time(),
                )
                self._install(staged, version)
        finally:
            staged.unlink(missing_ok=True)
        self._prune(name)
        return version

    # ---- API keys ------------------------------------------------------------------------------

    def issue_key(self, name: str) -> str:
        """A new API key for ``name``; the plaintext is returned once and only its hash is stored."""
        key = apikeys.new_key()
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO api_keys (key_id, tenant, salt, digest, created) VALUES (?, ?, ?, ?, ?)",
                    (key.key_id, name, key.salt, key.digest, time.time()),
                )
        except sqlite3.IntegrityError:  # the foreign key: no such tenant
            raise TenantNotFound(f"tenant {name!r} does not exist") from None
        return key.plaintext

    def tenant_for_key(self, key: str) -> str | None:
        """The tenant a key belongs to, or None for a malformed or unknown key (deleting a tenant deletes its keys)."""
        fast = hashlib.blake2b(key.encode()).digest()
        tenant = self._verified_keys.get(fast)
        if tenant is not None:
            return tenant
        parsed = apikeys.parse_key(key)
        if parsed is None:
            return None
        key_id, secret = parsed
        with self._lock:
            row = self._db.execute("SELECT tenant, salt, digest FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None or not apikeys.verify(secret, row[1], row[2]):
            return None
        with self._lock:
            # Cache only if the key survived the (unlocked) hash check: a delete meanwhile must win.
            if self._db.execute("SELECT 1 FROM api_keys WHERE key_id = ?", (key_id,)).fetchone() is None:
                return None
            self._verified_keys[fast] = row[0]
        return row[0]

    # ---- internals -----------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _version_path(self, name: str, version: int) -> Path:
        return self._deltas / name / f"v{version}.safetensors"

    def _tenant(self, row: tuple) -> Tenant:
        name, description, created, current = row
        version = None
        if current is not None:
            with self._lock:
                vrow = self._db.execute(
                    f"SELECT {_VERSION_COLUMNS} FROM delta_versions WHERE tenant = ? AND version = ?", (name, current)
                ).fetchone()
            version = self._version(vrow)
        return Tenant(name=name, description=description, created=created, current=version)

    def _version(self, row: tuple) -> DeltaVersion:
        tenant, version, size, sha256, method, bits, created = row
        return DeltaVersion(tenant, version, self._version_path(tenant, version), size, sha256, method, bits, created)

    def _install(self, staged: Path, version: DeltaVersion) -> None:
        """Rename the validated file into place, then flip the current version in one transaction."""
        folder = version.path.parent
        if not folder.exists():
            folder.mkdir()
            _fsync_dir(self._deltas)
        os.replace(staged, version.path)
        _fsync_dir(folder)
        try:
            with self._transaction() as db:
                db.execute(
                    f"INSERT INTO delta_versions ({_VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (version.tenant, version.version, version.size_bytes, version.sha256, version.method,
                     version.bits_per_param, version.created),
                )
                db.execute("UPDATE tenants SET current_version = ? WHERE name = ?", (version.version, version.tenant))
        except BaseException:
            version.path.unlink(missing_ok=True)
            raise

    def _prune(self, name: str) -> None:
        """Drop versions older than the newest ``keep_versions`` (rows first, then files, under one lock)."""
        with self._lock:
            with self._transaction() as db:
                old = [
                    v for (v,) in db.execute(
                        "SELECT version FROM delta_versions WHERE tenant = ? ORDER BY version DESC LIMIT -1 OFFSET ?",
                        (name, self.keep_versions),
                    )
                ]
                db.executemany("DELETE FROM delta_versions WHERE tenant = ? AND version = ?", [(name, v) for v in old])
            for v in old:
                self._version_path(name, v).unlink(missing_ok=True)

    def _recover(self) -> None:
        """Bring disk and database back in line after a crash: drop debris, never a committed version."""
        for leftover in self._staging.iterdir():
            leftover.unlink()
        with self._transaction() as db:
            rows = db.execute("SELECT tenant, version, size_bytes FROM delta_versions").fetchall()
            broken = [
                (tenant, version) for tenant, version, size in rows
                if not self._version_path(tenant, version).is_file()
                or self._version_path(tenant, version).stat().st_size != size
            ]
            for tenant, version in broken:
                # Only outside interference gets here (see the module docstring); serve the newest intact version.
                log.error("registry: delta file of %s v%d is missing or truncated; dropping that version", tenant, version)
                db.execute("DELETE FROM delta_versions WHERE tenant = ? AND version = ?", (tenant, version))
            db.execute(
                "UPDATE tenants SET current_version = (SELECT MAX(version) FROM delta_versions WHERE tenant = name)"
                " WHERE current_version IS NOT NULL"
                " AND current_version NOT IN (SELECT version FROM delta_versions WHERE tenant = name)"
            )
            known = {(tenant, version) for tenant, version, _ in rows} - set(broken)
            tenants = {name for (name,) in db.execute("SELECT name FROM tenants")}
        for folder in self._deltas.iterdir():
            if folder.name not in tenants or not folder.is_dir():
                log.warning("registry: removing orphaned %s", folder)
                shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
                continue
            for file in folder.iterdir():
                match = _VERSION_FILE_RE.match(file.name)
                if match is None or (folder.name, int(match.group(1))) not in known:
                    log.warning("registry: removing orphaned %s", file)
                    file.unlink()

