"""CompressionJobs: real compression of tiny fine-tunes in the background, registered through the store."""
from __future__ import annotations

import shutil
import time

import pytest

from deltaserve.delta_store import load_delta
from deltaserve.delta_store.checkpoint import open_checkpoint
from deltaserve.delta_store.jobs import CompressionJobs
from deltaserve.delta_store.registry import TenantNotFound, TenantStore
from tiny_models import make_tiny_model


@pytest.fixture
def store(tmp_path, tiny_base) -> TenantStore:
    base = open_checkpoint(tiny_base)
    store = TenantStore(tmp_path / "store", base.fingerprint(), base.shapes())
    store.create_tenant("a")
    return store


def wait(jobs: CompressionJobs, job_id: str, timeout: float = 300) -> tuple[dict, list[float]]:
    """The finished job, and the progress values seen while polling."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.get(job_id)
        seen.append(job["progress"])
        if job["status"] in ("succeeded", "failed"):
            return job, seen
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} still {jobs.get(job_id)['status']} after {timeout}s")


def test_compresses_folder_and_registers_version(tiny_base, tiny_finetunes, store):
    jobs = CompressionJobs(store, tiny_base)
    job_id = jobs.submit("a", tiny_finetunes[0], method="deltacome", bits_per_param=2.0)
    job, seen = wait(jobs, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["error"] is None and job["progress"] == 100.0 and job["version"] == 1
    assert job["tenant"] == "a" and job["method"] == "deltacome" and job["bits_per_param"] == 2.0
    assert job["created"] <= job["started"] <= job["finished"]
    assert seen == sorted(seen)
    current = store.current_version("a")
    assert current.method == "deltacome"
    delta = load_delta(current.path, expected_fingerprint=store.base_fingerprint, base_shapes=store.base_shapes)
    assert delta.metadata["bits_per_param"] <= 2.0
    assert list((store.root / "jobs").iterdir()) == []  # the work folder is cleaned
    assert tiny_finetunes[0].exists()  # a folder the caller still owns is left alone
    jobs.shutdown()


def test_single_safetensors_upload_is_removed_after(tmp_path, tiny_base, tiny_finetunes, store):
    upload = tmp_path / "upload.safetensors"
    shutil.copyfile(next(tiny_finetunes[1].glob("*.safetensors")), upload)
    jobs = CompressionJobs(store, tiny_base)
    job, _ = wait(jobs, jobs.submit("a", upload, method="bitdelta", remove_source=True))
    assert job["status"] == "succeeded", job["error"]
    assert store.current_version("a").method == "bitdelta"
    assert not upload.exists()
    jobs.shutdown()


def test_mismatched_finetune_fails_and_store_is_unchanged(tmp_path, tiny_base, tiny_finetunes, store):
    jobs = CompressionJobs(store, tiny_base)
    wait(jobs, jobs.submit("a", tiny_finetunes[0]))
    before = store.current_version("a")
    other = make_tiny_model(tmp_path / "other", hidden_size=96, intermediate_size=160)
    job, _ = wait(jobs, jobs.submit("a", other))
    assert job["status"] == "failed" and job["version"] is None
    assert job["error"].startswith("ValueError: ") and "hidden_size" in job["error"]
    assert store.current_version("a") == before
    assert [v.version for v in store.list_versions("a")] == [before.version]
    assert list((store.root / "jobs").iterdir()) == []
    jobs.shutdown()


def test_jobs_run_one_at_a_time(tiny_base, tiny_finetunes, store):
    jobs = CompressionJobs(store, tiny_base)
    first = jobs.submit("a", tiny_finetunes[0])
    second = jobs.submit("a", tiny_finetunes[1])
    assert jobs.get(second)["status"] == "queued"
    assert wait(jobs, first)[0]["version"] == 1
    assert wait(jobs, second)[0]["version"] == 2
    jobs.shutdown()


def test_unknown_tenant_and_job(tiny_base, tiny_finetunes, store):
    jobs = CompressionJobs(store, tiny_base)
    with pytest.raises(TenantNotFound):
        jobs.submit("nobody", tiny_finetunes[0])
    with pytest.raises(KeyError):
        jobs.get("no-such-job")
    jobs.shutdown()


def test_restart_clears_interrupted_work(tiny_base, store):
    debris = store.root / "jobs" / "dead-job"
    debris.mkdir(parents=True)
    (debris / "delta.safetensors").write_bytes(b"half written")
    CompressionJobs(store, tiny_base).shutdown()
    assert list((store.root / "jobs").iterdir()) == []

