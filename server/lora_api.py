"""vLLM's dynamic-adapter endpoints mapped onto tenants, so tooling written for vLLM LoRA works unchanged:
loading an adapter registers (or replaces) a tenant's delta from a file on the server; unloading removes
the tenant. Both need the admin key (vLLM leaves them open; a multi-tenant server cannot)."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from deltaserve.delta_store.registry import TenantNotFound

from .admin_api import admin_state, install_delta, new_tenant, registry_errors, remove_tenant
from .schemas import Strict

router = APIRouter(prefix="/v1")


class LoadAdapter(Strict):
    lora_name: str
    lora_path: str


class UnloadAdapter(Strict):
    lora_name: str
    lora_int_id: int | None = None  # accepted for vLLM clients that send it; the name decides


@router.post("/load_lora_adapter")
async def load_adapter(body: LoadAdapter, request: Request) -> PlainTextResponse:
    state = admin_state(request)
    path = Path(body.lora_path).expanduser()
    created = False
    with registry_errors():
        if not path.is_file():
            raise ValueError(f"lora_path {body.lora_path!r} is not a file on the server")
        try:
            state.store.get_tenant(body.lora_name)
        except TenantNotFound:
            new_tenant(state, body.lora_name, description=f"loaded from {path}")
            created = True
        try:
            await install_delta(state, body.lora_name, path)
        except BaseException:
            if created:  # a failed load leaves no half-made tenant behind
                await remove_tenant(state, body.lora_name)
            raise
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter")
async def unload_adapter(body: UnloadAdapter, request: Request) -> PlainTextResponse:
    state = admin_state(request)
    with registry_errors():
        await remove_tenant(state, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
