"""Everything one app instance holds while it runs, reached by the routes through ``app_state(request)``."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from .auth import Authenticator
from .config import ServerConfig
from .errors import APIError
from .generation import Generator
from .metrics import ServingMetrics


@dataclass
class ServerState:
    config: ServerConfig
    metrics: ServingMetrics
    engine: object = None
    store: object = None
    cache: object = None
    jobs: object = None
    auth: Authenticator | None = None
    generator: Generator | None = None
    ready: bool = False
    started_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def base_name(self) -> str:
        return self.config.server.served_model_name or self.engine.model_name


def app_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.deltaserve
    if not state.ready:
        raise APIError(503, "The server is starting or stopping; retry shortly.", code="not_ready")
    return state
