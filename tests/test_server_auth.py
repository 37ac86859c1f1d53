"""Which models a caller may use, with keys issued and verified by a real TenantStore."""
from __future__ import annotations

import pytest

from deltaserve.delta_store.registry import TenantStore
from deltaserve.server.auth import Authenticator, Caller
from deltaserve.server.config import HTTPConfig


@pytest.fixture
def store(tmp_path):
    store = TenantStore(tmp_path / "store", "sha256:" + "1" * 32, {})
    store.create_tenant("acme")
    yield store
    store.close()


@pytest.mark.parametrize("base_allowed", [True, False])
def test_tenant_key_scopes_to_its_tenant(store, base_allowed):
    auth = Authenticator(HTTPConfig(admin_key="admin-key-123", tenant_keys_may_use_base=base_allowed),
                         store.tenant_for_key)
    caller = Caller("tenant", store.tenant_for_key(store.issue_key("acme")))
    assert caller.tenant == "acme"
    assert auth.may_use(caller, "acme", "base")
    assert not auth.may_use(caller, "other", "base")
    assert auth.may_use(caller, "base", "base") is base_allowed
    for everyone in (Caller("admin"), Caller("anonymous")):
        assert auth.may_use(everyone, "other", "base") and auth.may_use(everyone, "base", "base")
    assert store.tenant_for_key("ds-0123456789abcdef." + "x" * 43) is None
