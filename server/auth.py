"""Who is calling: the admin key, a tenant's API key (issued by the admin API, stored hashed by the
registry), or nobody; and which models each may use."""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Callable, Literal

from fastapi import Request

from .config import HTTPConfig
from .errors import APIError

Role = Literal["admin", "tenant", "anonymous"]


@dataclass(frozen=True, slots=True)
class Caller:
    role: Role
    tenant: str | None = None  # set for role "tenant"


def bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


class Authenticator:
    def __init__(self, config: HTTPConfig, tenant_for_key: Callable[[str], str | None]):
        self.config = config
        self.tenant_for_key = tenant_for_key

    def _is_admin_key(self, key: str) -> bool:
        # Constant-time comparison: the admin key must not leak through response timing.
        return self.config.admin_key is not None and hmac.compare_digest(key.encode(), self.config.admin_key.encode())

    def admin(self, request: Request) -> Caller:
        if self.config.admin_key is None:
            raise APIError(401, "The admin API is disabled: set server.admin_key or DELTASERVE_ADMIN_KEY.",
                           code="admin_disabled")
        key = bearer_key(request)
        if key is None:
            raise APIError(401, "Missing admin key: send 'Authorization: Bearer <admin key>'.", code="missing_api_key")
        if not self._is_admin_key(key):
            raise APIError(401, "Invalid admin key.", code="invalid_api_key")
        return Caller("admin")

    def client(self, request: Request) -> Caller:
        key = bearer_key(request)
        if key is None:
            if self.config.require_api_key:
                raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
            return Caller("anonymous")
        if self._is_admin_key(key):
            return Caller("admin")
        tenant = self.tenant_for_key(key)
        if tenant is not None:
            return Caller("tenant", tenant)
        if not self.config.require_api_key:
            # Open mode: everyone may use every model, and OpenAI clients must send some key ("EMPTY").
            return Caller("anonymous")
        raise APIError(401, "Invalid API key.", code="invalid_api_key")

    def may_use(self, caller: Caller, model: str, base_name: str) -> bool:
        """Whether ``caller`` may use ``model`` (the base's name or a tenant's)."""
        if caller.role != "tenant":
            return True
        if model == base_name:
            return self.config.tenant_keys_may_use_base
        return model == caller.tenant
