"""Background compression of uploaded fine-tuned checkpoints into tenants' deltas.

A job runs ``compress`` in a worker thread (one job at a time: compression saturates the cores or the GPU
by itself), reports progress, and registers the result through TenantStore.put_delta, so the result gets
the same validation and atomic version flip as an uploaded delta. Jobs live in memory: after a restart
the admin resubmits; the work folder is emptied at start, so an interrupted job leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deltaserve.delta_store.checkpoint import open_checkpoint
from deltaserve.delta_store.compress import compress
from deltaserve.delta_store.registry import TenantStore

JobStatus = Literal["queued", "running", "succeeded", "failed"]


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    method: str
    bits_per_param: float
    status: JobStatus
    progress: float  # percent, 0..100
    error: str | None  # set when failed
    version: int | None  # delta version registered when succeeded
    created: float  # unix seconds
    started: float | None
    finished: float | None


class CompressionJobs:
    def __init__(self, store: TenantStore, base: str | Path, workdir: Path | None = None):
        self._store = store
        self._base = Path(base)
        self._workdir = Path(workdir) if workdir is not None else store.root / "jobs"
        shutil.rmtree(self._workdir, ignore_errors=True)  # debris of jobs a restart interrupted
        self._workdir.mkdir(parents=True)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compress")

    def submit(self, tenant: str, finetuned: Path, method: str = "deltacome", bits_per_param: float = 1.0,
               remove_source: bool = False) -> str:
        """Queue compression of ``finetuned`` (an HF folder, or one .safetensors file with the base's weight
        names) for ``tenant``; returns the job id. With remove_source the job deletes ``finetuned`` when done
        (for uploads the server wrote to a temporary file)."""
        self._store.get_tenant(tenant)  # TenantNotFound now rather than a failed job later
        job = Job(id=uuid.uuid4().hex[:12], tenant=tenant, method=method, bits_per_param=bits_per_param,
                  status="queued", progress=0.0, error=None, version=None, created=time.time(), started=None,
                  finished=None)
        with self._lock:
            self._jobs[job.id] = job
        self._executor.submit(self._run, job.id, Path(finetuned), remove_source)
        return job.id

    def get(self, job_id: str) -> dict:
        """The job as a JSON-ready dict (fields of Job); KeyError for an unknown id."""
        with self._lock:
            return dataclasses.asdict(self._jobs[job_id])

    def shutdown(self) -> None:
        """Drop queued jobs; a running compression finishes in its thread (Python cannot stop it midway)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _update(self, job_id: str, **changes) -> None:
        with self._lock:
            self._jobs[job_id] = dataclasses.replace(self._jobs[job_id], **changes)

    def _run(self, job_id: str, finetuned: Path, remove_source: bool) -> None:
        job = self._jobs[job_id]
        folder = self._workdir / job_id
        folder.mkdir()
        self._update(job_id, status="running", started=time.time())
        try:
            out = compress(
                self._base, self._as_checkpoint_dir(finetuned, folder), folder / "delta.safetensors",
                method=job.method, bits_per_param=job.bits_per_param,
                # per weight compressed; 100 is reached only once the version is registered
                progress=lambda done, total, _name: self._update(job_id, progress=round(99.0 * done / total, 1)),
            )
            outcome = dict(status="succeeded", progress=100.0, version=self._store.put_delta(job.tenant, out).version)
        except Exception as exc:
            outcome = dict(status="failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            if remove_source:
                shutil.rmtree(finetuned) if finetuned.is_dir() else finetuned.unlink(missing_ok=True)
        # Only now: whoever sees the final status also sees the files cleaned up.
        self._update(job_id, finished=time.time(), **outcome)

    def _as_checkpoint_dir(self, finetuned: Path, folder: Path) -> Path:
        """An HF folder as is; a lone safetensors file becomes one by pairing it with the base's config."""
        if finetuned.is_dir():
            return finetuned
        ckpt = folder / "finetuned"
        ckpt.mkdir()
        open_checkpoint(self._base).config.save_pretrained(ckpt)
        # A hard link costs no copy; the store's folder and uploads share a filesystem in the usual layout.
        try:
            os.link(finetuned, ckpt / "model.safetensors")
        except OSError:
            shutil.copyfile(finetuned, ckpt / "model.safetensors")
        return ckpt
