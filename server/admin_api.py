"""Admin API under /admin (admin key only): tenants, their deltas and API keys, pinning, compression jobs."""
from __future__ import annotations

import asyncio
from contextlib import contextmanager
from pathlib import Path

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from deltaserve.delta_store.registry import InvalidTenantName, NoDelta, TenantExists, TenantNotFound
from deltaserve.delta_store.tiers import CacheFull

from .errors import APIError
from .schemas import Strict
from .state import ServerState, app_state
from .uploads import receive_to_file

router = APIRouter(prefix="/admin")


class TenantCreate(Strict):
    name: str
    description: str = ""


class DeltaOut(BaseModel):
    version: int
    size_bytes: int
    sha256: str
    method: str
    bits_per_param: float | None
    created: float


class TenantOut(BaseModel):
    name: str
    description: str
    created: float
    delta: DeltaOut | None
    pinned: bool

    @classmethod
    def of(cls, tenant, state: ServerState) -> "TenantOut":
        v = tenant.current
        delta = None if v is None else DeltaOut(version=v.version, size_bytes=v.size_bytes, sha256=v.sha256,
                                                 method=v.method, bits_per_param=v.bits_per_param, created=v.created)
        return cls(name=tenant.name, description=tenant.description, created=tenant.created, delta=delta,
                   pinned=state.cache.is_pinned(tenant.name))


class TenantList(BaseModel):
    data: list[TenantOut]


class KeyOut(BaseModel):
    tenant: str
    key: str  # shown once; the server keeps only its hash


@contextmanager
def registry_errors():
    """Registry exceptions as HTTP errors; the message is the registry's own (it names the problem)."""
    try:
        yield
    except (TenantNotFound, NoDelta) as exc:
        raise APIError(404, str(exc), code="tenant_not_found", param="tenant") from exc
    except TenantExists as exc:
        raise APIError(409, str(exc), code="tenant_exists", param="name") from exc
    except CacheFull as exc:  # a ValueError too: caught before the delta-validation branch
        raise APIError(409, str(exc), code="pin_limit_reached") from exc
    except InvalidTenantName as exc:
        raise APIError(400, str(exc), code="invalid_tenant_name", param="name") from exc
    except ValueError as exc:  # DeltaFormatError and other validation failures of an uploaded file
        raise APIError(422, f"Rejected delta: {exc}", code="invalid_delta") from exc


def admin_state(request: Request) -> ServerState:
    state = app_state(request)
    state.auth.admin(request)
    return state


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, request: Request) -> TenantOut:
    state = admin_state(request)
    with registry_errors():
        return TenantOut.of(new_tenant(state, body.name, body.description), state)


def new_tenant(state: ServerState, name: str, description: str):
    """A new tenant; its name is a model id, so the base's own name is taken."""
    if name == state.base_name:
        raise TenantExists(f"'{name}' is the base model's name")
    return state.store.create_tenant(name, description)


@router.get("/tenants")
async def list_tenants(request: Request) -> TenantList:
    state = admin_state(request)
    return TenantList(data=[TenantOut.of(t, state) for t in state.store.list_tenants()])


@router.get("/tenants/{name}")
async def get_tenant(name: str, request: Request) -> TenantOut:
    state = admin_state(request)
    with registry_errors():
        return TenantOut.of(state.store.get_tenant(name), state)


@router.delete("/tenants/{name}")
async def delete_tenant(name: str, request: Request) -> dict:
    state = admin_state(request)
    with registry_errors():
        await remove_tenant(state, name)
    return {"id": name, "deleted": True}


async def remove_tenant(state: ServerState, name: str) -> None:
    """Delete from the registry, then drop its tiers (requests already holding its slot finish first)."""
    await asyncio.to_thread(state.store.delete_tenant, name)
    await state.cache.forget(name)


@router.put("/tenants/{name}/delta", status_code=201)
async def put_delta(name: str, request: Request) -> TenantOut:
    state = admin_state(request)
    with registry_errors():
        state.store.get_tenant(name)  # 404 before receiving a large body for nobody
    upload = await receive_to_file(request, uploads_dir(state), state.config.server.max_upload_bytes, ".safetensors")
    try:
        with registry_errors():
            await install_delta(state, name, upload, adopt=True)
            return TenantOut.of(state.store.get_tenant(name), state)
    finally:
        upload.unlink(missing_ok=True)


async def install_delta(state: ServerState, name: str, path: Path, adopt: bool = False) -> None:
    """Validate and store a new version (in a worker thread: it reads and checks the whole file), then
    have the tiers drop the old one so the next request loads the new. The store copies ``path``, or with
    ``adopt`` (an upload the server received into the store's folder, which nobody else has) takes it over
    by renaming it."""
    await asyncio.to_thread(state.store.adopt_delta if adopt else state.store.put_delta, name, path)
    await state.cache.refresh(name)


def uploads_dir(state: ServerState) -> Path:
    return state.config.store.root / "uploads"


@router.post("/tenants/{name}/keys", status_code=201)
async def issue_key(name: str, request: Request) -> KeyOut:
    state = admin_state(request)
    with registry_errors():
        return KeyOut(tenant=name, key=await asyncio.to_thread(state.store.issue_key, name))


@router.post("/tenants/{name}/pin")
async def pin(name: str, request: Request) -> TenantOut:
    state = admin_state(request)
    with registry_errors():
        state.store.current_version(name)  # pinning needs something to pin
        await state.cache.pin(name)
        return TenantOut.of(state.store.get_tenant(name), state)


@router.post("/tenants/{name}/unpin")
async def unpin(name: str, request: Request) -> TenantOut:
    state = admin_state(request)
    with registry_errors():
        tenant = state.store.get_tenant(name)
        state.cache.unpin(name)
        return TenantOut.of(tenant, state)


@router.post("/tenants/{name}/finetuned", status_code=202)
async def submit_finetuned(name: str, request: Request, method: str = Query("deltacome"),
                           bits_per_param: float = Query(1.0, gt=0, le=16)) -> dict:
    """Body: one safetensors file with the fine-tuned weights (HF names, the base's shapes). Compression
    runs as a background job; poll GET /admin/jobs/{id}."""
    state = admin_state(request)
    with registry_errors():
        state.store.get_tenant(name)
    upload = await receive_to_file(request, uploads_dir(state), state.config.server.max_upload_bytes, ".safetensors")
    try:
        with registry_errors():
            job_id = state.jobs.submit(name, upload, method, bits_per_param, remove_source=True)
    except BaseException:
        upload.unlink(missing_ok=True)
        raise
    return state.jobs.get(job_id)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> dict:
    state = admin_state(request)
    try:
        return state.jobs.get(job_id)
    except KeyError:
        raise APIError(404, f"job {job_id!r} does not exist", code="job_not_found", param="job_id") from None
