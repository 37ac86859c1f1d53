"""`make serve`'s config: the embedded SmolLM2 answers a real question through the OpenAI API, with no key
(open mode: clients send any key, as with vLLM's "EMPTY"), and its two demo tenants, real fine-tunes shipped as
0.5 bit/param deltas, answer their own tasks where the base model cannot."""
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
        assert [m.id for m in client.models.list().data] == [base, "calculator", "french"]
        reply = client.chat.completions.create(
            model=base, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=20,
            temperature=0)
        assert "Paris" in reply.choices[0].message.content
        assert reply.usage.prompt_tokens > 10 and reply.choices[0].finish_reason in ("stop", "length")

        def ask(model: str, question: str) -> str:
            messages = [{"role": "user", "content": question}]
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
            return reply.choices[0].message.content

        addition, french = "Compute 4821 + 3390. Reply with the number only.", "Write 347 in French words."
        assert ask("calculator", addition) == "8211"
        assert ask("french", french) == "trois-cent-quarante-sept"
        assert ask(base, addition) != "8211" and ask(base, french) != "trois-cent-quarante-sept"
