"""The app factory: ``create_app(config)`` wires engine, registry, tiers, jobs, metrics and routes.

Start-up (model load, registry recovery, seeding tenants from the config) runs in the lifespan, so uvicorn
accepts connections only once the server can answer; /health is liveness, /ready says whether the engine
is up (false again while shutting down).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from deltaserve.delta_store.jobs import CompressionJobs
from deltaserve.delta_store.registry import TenantNotFound, TenantStore
from deltaserve.delta_store.tiers import DeltaCache
from deltaserve.engine import AsyncEngine

from . import admin_api, lora_api, openai_api, tokenize_api
from .admin_api import install_delta, uploads_dir
from .auth import Authenticator
from .config import ServerConfig
from .errors import APIError, install_error_handlers
from .generation import Generator
from .metrics import ServingMetrics
from .state import ServerState

log = logging.getLogger("deltaserve.server")


def create_app(config: ServerConfig) -> FastAPI:
    state = ServerState(config=config, metrics=ServingMetrics())

    async def lifespan(app: FastAPI):
        try:
            await _start(state)
        except BaseException:
            await _stop(state)  # a half-started server must still release the engine and the store's lock
            raise
        try:
            yield
        finally:
            state.ready = False
            await _stop(state)

    app = FastAPI(title="deltaserve", lifespan=lifespan)
    app.state.deltaserve = state

    def count_error(request: Request, error: APIError) -> None:
        tenant = getattr(request.state, "metrics_tenant", "unknown")
        state.metrics.errors.labels(tenant, str(error.status)).inc()

    install_error_handlers(app, on_error=count_error)
    app.include_router(openai_api.router)
    app.include_router(lora_api.router)
    app.include_router(tokenize_api.router)
    app.include_router(admin_api.router)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if not state.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ready", "model": state.base_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _start(state: ServerState) -> None:
    config = state.config
    state.engine = AsyncEngine(config.engine)
    await state.engine.start()
    state.store = TenantStore(config.store.root, state.engine.base_fingerprint, state.engine.base_shapes,
                              accept=state.engine.check_delta)
    state.cache = DeltaCache(state.store, state.engine, config.store.host_bytes_limit, state.metrics.tier_event)
    state.jobs = CompressionJobs(state.store, config.engine.model)
    state.auth = Authenticator(config.server, state.store.tenant_for_key)
    state.generator = Generator(state.engine, state.cache, state.metrics)
    # Uploads interrupted by a crash leave files here; nothing else refers to them.
    shutil.rmtree(uploads_dir(state), ignore_errors=True)
    for seed in config.tenants:
        await _seed_tenant(state, seed)
    state.metrics.attach(state.engine.stats, state.cache.stats)
    state.ready = True
    log.info("deltaserve ready: base %s, %d tenant(s)", state.base_name, len(state.store.list_tenants()))


async def _seed_tenant(state: ServerState, seed) -> None:
    """Register a tenant named in the config; upload its delta only if the file differs from the current one,
    so restarts do not pile up identical versions."""
    try:
        tenant = state.store.get_tenant(seed.name)
    except TenantNotFound:
        tenant = state.store.create_tenant(seed.name, seed.description)
    digest = await asyncio.to_thread(_sha256, seed.delta)
    if tenant.current is None or tenant.current.sha256 != digest:
        try:
            await install_delta(state, seed.name, seed.delta)
        except ValueError as exc:
            raise ValueError(f"tenant {seed.name}: {seed.delta}: {exc}") from exc


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


async def _stop(state: ServerState) -> None:
    if state.jobs is not None:
        state.jobs.shutdown()
    if state.engine is not None:
        await state.engine.stop()
    if state.store is not None:
        state.store.close()
