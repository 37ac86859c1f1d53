"""The embedded SmolLM2-135M-Instruct through the engine: a chat-template prompt gives transformers' greedy text."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from deltaserve.delta_store.checkpoint import default_model_path
from deltaserve.engine import EngineConfig, LLMEngine, SamplingParams


@pytest.mark.slow
def test_chat_prompt_greedy_text_equals_transformers():
    path = default_model_path()
    engine = LLMEngine(EngineConfig(str(path), max_model_len=512, num_kv_blocks=64))
    messages = [{"role": "user", "content": "Name three primary colors, separated by commas."}]
    ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    engine.add_request("chat", list(ids), SamplingParams(max_tokens=40, temperature=0))
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    text = "".join(o.new_text for o in outputs)

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    prompt = torch.tensor([ids])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False)
    expected = engine.tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert text == expected
    assert outputs[-1].finished and len(text) > 10
