"""Server config: YAML and CLI flags into validated dataclasses; every shipped config file validates."""
from __future__ import annotations

import argparse

import pytest
from server_harness import REPO

from deltaserve.server import cli_serve
from deltaserve.server.config import ADMIN_KEY_ENV, ConfigError, config_from_dict, load_config, parse_bytes


def test_sizes():
    assert parse_bytes("4MiB", "x") == 4 * 2**20 and parse_bytes("2GB", "x") == 2 * 10**9
    assert parse_bytes(123, "x") == 123 and parse_bytes("1.5KiB", "x") == 1536
    for bad in ("lots", "-1", 0, "3 parsecs"):
        with pytest.raises(ConfigError, match="x"):
            parse_bytes(bad, "x")


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml", "llama2-7b.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(REPO / "configs" / name)
    assert config.server.max_upload_bytes > 0 and config.store.host_bytes_limit > 0


def test_mistakes_are_named(tiny_base, tmp_path):
    engine = {"model": str(tiny_base)}
    with pytest.raises(ConfigError, match="server: unknown key.*prot"):
        config_from_dict({"engine": engine, "server": {"prot": 1}})
    with pytest.raises(ConfigError, match="unknown section.*servre"):
        config_from_dict({"engine": engine, "servre": {}})
    with pytest.raises(ConfigError, match="admin_key"):
        config_from_dict({"engine": engine, "server": {"admin_key": "short"}})
    with pytest.raises(ConfigError, match="does not exist"):
        config_from_dict({"engine": engine, "tenants": [{"name": "a", "delta": str(tmp_path / "nope")}]})
    with pytest.raises(ValueError, match="max_slots"):
        config_from_dict({"engine": {**engine, "max_slots": 0}})


def test_admin_key_from_environment(tiny_base, monkeypatch):
    monkeypatch.setenv(ADMIN_KEY_ENV, "from-the-environment")
    assert config_from_dict({"engine": {"model": str(tiny_base)}}).server.admin_key == "from-the-environment"
    explicit = config_from_dict({"engine": {"model": str(tiny_base)}, "server": {"admin_key": "from-the-file"}})
    assert explicit.server.admin_key == "from-the-file"


def test_flags_lay_over_a_config_file(tmp_path):
    parser = argparse.ArgumentParser()
    cli_serve.register(parser.add_subparsers())
    delta = tmp_path / "d.safetensors"
    delta.write_bytes(b"checked at start-up, not here")
    args = parser.parse_args(["serve", "--config", str(REPO / "configs" / "tiny.yaml"), "--port", "9123",
                              "--device", "cpu", "--tenant", f"t1={delta}", "--no-require-api-key"])
    raw = cli_serve.raw_config(args)
    assert raw["server"]["port"] == 9123 and raw["server"]["require_api_key"] is False
    assert raw["server"]["admin_key"] == "test-admin-key", "values the flags do not name come from the file"
    assert raw["tenants"] == [{"name": "t1", "delta": str(delta)}]
    assert raw["engine"]["max_slots"] == 2
