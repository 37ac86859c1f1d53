"""`make serve`'s config: the embedded SmolLM2 answers a real question through the OpenAI API, with no key
(open mode: clients send any key, as with vLLM's "EMPTY")."""
from __future__ import annotations

import pytest
from server_harness import REPO, LiveServer, free_port

from deltaserve.server.config import config_from_dict, read_yaml

pytestmark = pytest.mark.slow


def test_default_config_serves_smollm2(tmp_path):
    raw = read_yaml(REPO / "configs" / "default.yaml")
    raw["store"]["root"] = str(tmp_path / "store")
    raw["server"]["port"] = free_port()
    with LiveServer(config_from_dict(raw)) as server:
        client = server.openai("EMPTY")
        base = "SmolLM2-135M-Instruct"  # served_model_name in the config
        assert [m.id for m in client.models.list().data] == [base]
        reply = client.chat.completions.create(
            model=base, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=20,
            temperature=0)
        assert "Paris" in reply.choices[0].message.content
        assert reply.usage.prompt_tokens > 10 and reply.choices[0].finish_reason in ("stop", "length")
