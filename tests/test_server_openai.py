"""OpenAI API end to end: a real uvicorn server (tiny random Llama, CPU), the official openai client, three
tenants at once, answers compared with the engine's own for each tenant; errors; streaming; disconnects."""
from __future__ import annotations

import asyncio
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from server_harness import ADMIN_KEY, REPO, LiveServer, tiny_config
from store_deltas import make_delta

from deltaserve.delta_store.format import load_delta
from deltaserve.engine import AsyncEngine, EngineConfig, SamplingParams
from deltaserve.server import disconnect
from deltaserve.server.prompting import chat_prompt_ids, completion_prompt_ids
from deltaserve.server.schemas import ChatMessage

TENANTS = ("alpha", "beta", "gamma")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world, the answer is"}]
PROMPT = "the quick brown fox"
MAX_TOKENS = 12
# Penalties the server passes to the engine (OpenAI's two, vLLM's repetition_penalty through extra_body); negative
# presence favours repeats, enough to change a tiny random model's greedy tokens.
PENALTIES = dict(presence_penalty=-2.0, frequency_penalty=0.5, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def deltas(tiny_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("deltas")
    return {name: make_delta(tiny_base, folder / f"{name}.safetensors", seed=i) for i, name in enumerate(TENANTS)}


@pytest.fixture(scope="module")
def served(tiny_base, deltas, tmp_path_factory):
    """One server for the module, three tenants uploaded over HTTP; yields (server, {tenant: key})."""
    with LiveServer(tiny_config(tiny_base, tmp_path_factory.mktemp("store"))) as server:
        keys = {name: server.add_tenant(name, path) for name, path in deltas.items()}
        yield server, keys


@pytest.fixture(scope="module")
def expected(tiny_base, deltas):
    """Greedy answers of a separate engine with each tenant's delta loaded directly: {(model, kind): text}."""

    async def run() -> dict:
        engine = AsyncEngine(EngineConfig(model=str(tiny_base), max_slots=len(TENANTS), max_model_len=256))
        await engine.start()
        try:
            slots = {None: -1}
            for slot, name in enumerate(TENANTS):
                engine.load_delta(slot, load_delta(deltas[name]))
                slots[name] = slot
            tok = engine.tokenizer
            prompts = {"chat": chat_prompt_ids(tok, [ChatMessage(**m) for m in CHAT]),
                       "completion": completion_prompt_ids(tok, PROMPT)[0]}
            answers = {}
            for tenant, slot in slots.items():
                for kind, ids in [*prompts.items(), ("penalized", prompts["completion"])]:
                    text = ""
                    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                            **(PENALTIES if kind == "penalized" else {}))
                    async for out in engine.generate(f"ref-{tenant}-{kind}", ids, params, slot=slot):
                        text += out.new_text
                    answers[(tenant or engine.model_name, kind)] = text
            return answers
        finally:
            await engine.stop()

    return asyncio.run(run())


def _chat(client: openai.OpenAI, model: str, stream: bool) -> str:
    if not stream:
        reply = client.chat.completions.create(model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
        return reply.choices[0].message.content
    parts = client.chat.completions.create(model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in parts if chunk.choices)


def _completion(client: openai.OpenAI, model: str, stream: bool) -> str:
    if not stream:
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
    parts = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    return "".join(chunk.choices[0].text for chunk in parts if chunk.choices)


def test_three_tenants_concurrently_match_engine(served, expected):
    server, keys = served
    base = server.state.base_name
    jobs = [(model, key, kind, stream) for model, key in [*keys.items(), (base, keys["alpha"])]
            for kind in ("chat", "completion") for stream in (False, True)]

    def one(job):
        model, key, kind, stream = job
        client = server.openai(key)
        return (_chat if kind == "chat" else _completion)(client, model, stream)

    # tiny.yaml has 2 slots for 3 tenants: the third queues for a slot, evictions happen under load.
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(one, jobs))
    for (model, _, kind, stream), answer in zip(jobs, answers):
        assert answer == expected[(model, kind)], f"{model} {kind} stream={stream}"
    assert len({expected[(t, "chat")] for t in (*TENANTS, base)}) > 1, "deltas should change the answers"


def test_models_list_per_caller(served):
    server, keys = served
    base = server.state.base_name
    admin_ids = [m.id for m in server.openai(ADMIN_KEY).models.list().data]
    assert admin_ids == [base, *sorted(TENANTS)]
    cards = server.openai(keys["beta"]).models.list().data
    assert [c.id for c in cards] == [base, "beta"]
    assert cards[1].parent == base and cards[1].root == base and cards[0].parent is None
    beta = server.openai(keys["beta"])
    assert beta.models.retrieve("beta") == cards[1] and beta.models.retrieve(base) == cards[0]
    for hidden in ("gamma", "nobody"):   # another tenant's model is as unknown to this key as a missing one
        with pytest.raises(openai.NotFoundError):
            beta.models.retrieve(hidden)
    assert server.openai(ADMIN_KEY).models.retrieve("gamma").id == "gamma"


def test_stream_usage_chunks_and_done(served):
    server, keys = served
    with server.http(keys["alpha"]) as http:
        body = {"model": "alpha", "messages": CHAT, "max_tokens": 5, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    final = chunks[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 5
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + 5
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_stream_several_choices_equals_whole_answer(served):
    server, keys = served
    client = server.openai(keys["alpha"])
    args = dict(model="alpha", prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=3)
    whole = client.completions.create(**args)
    texts, reasons = {0: "", 1: ""}, {}
    for chunk in client.completions.create(**args, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}


def test_usage_logprobs_n_seed(served):
    server, keys = served
    client = server.openai(keys["gamma"])
    chat = client.chat.completions.create(model="gamma", messages=CHAT, max_completion_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    assert chat.usage.completion_tokens == 4 and chat.choices[0].finish_reason == "length"
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert all(t.bytes == list(t.token.encode()) for t in content)

    text = client.completions.create(model="gamma", prompt=[PROMPT, "hello world"], max_tokens=3, n=2,
                                     temperature=1.0, seed=7, logprobs=2)
    assert [c.index for c in text.choices] == [0, 1, 2, 3]
    assert text.usage.completion_tokens == 12
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.top_logprobs[0]) <= 2 and lp.text_offset[0] == 0
    again = client.completions.create(model="gamma", prompt=[PROMPT, "hello world"], max_tokens=3, n=2,
                                      temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in text.choices], "a seed makes sampling repeatable"

    stopped = client.completions.create(model="gamma", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    word = stopped.choices[0].text.strip().split(" ")[0]
    if word:
        cut = client.completions.create(model="gamma", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                        stop=[word])
        assert word not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


def test_penalties_reach_the_engine(served, expected):
    """presence_penalty and frequency_penalty (OpenAI's) and repetition_penalty (vLLM's, through extra_body) give
    the engine's own penalized tokens; null means 0; out-of-range values of these and of logit_bias, stop_token_ids
    and min_tokens are 400s naming the parameter."""
    server, keys = served
    client = server.openai(keys["beta"])
    reply = client.completions.create(model="beta", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                      presence_penalty=PENALTIES["presence_penalty"],
                                      frequency_penalty=PENALTIES["frequency_penalty"],
                                      extra_body={"repetition_penalty": PENALTIES["repetition_penalty"]})
    assert reply.choices[0].text == expected[("beta", "penalized")]
    assert expected[("beta", "penalized")] != expected[("beta", "completion")], "the penalties change these tokens"
    with server.http(keys["beta"]) as http:
        body = {"model": "beta", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        plain = http.post("/v1/completions", json={**body, "presence_penalty": None, "frequency_penalty": None})
        assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == expected[("beta", "completion")]
        for name, value in (("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0),
                            ("logit_bias", {"5": 101}), ("logit_bias", {"five": 1}), ("logit_bias", {"99999999": 1}),
                            ("stop_token_ids", [99999999]), ("min_tokens", MAX_TOKENS + 1)):
            error = _error(http.post("/v1/completions", json={**body, name: value}), 400)
            assert error["param"].split(".")[0] == name, error   # a bias' own key after the dot


def test_logit_bias_and_min_tokens(served):
    """OpenAI's logit_bias (token ids as text) pins a greedy answer to the biased token; vLLM's min_tokens holds off
    a stop token until that many tokens."""
    server, keys = served
    client = server.openai(keys["gamma"])
    plain = client.completions.create(model="gamma", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0)
    biased = client.completions.create(model="gamma", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0,
                                       logit_bias={"42": 100})
    assert len(set(biased.choices[0].logprobs.tokens)) == 1 and biased.usage.completion_tokens == 4
    assert biased.choices[0].logprobs.tokens != plain.choices[0].logprobs.tokens
    # Stopping on token 42 (pinned by the bias) ends the answer at once, unless min_tokens holds it off.
    stop = {"logit_bias": {"42": 100}, "stop_token_ids": [42]}
    first = client.completions.create(model="gamma", prompt=PROMPT, max_tokens=8, temperature=0, extra_body=stop)
    held = client.completions.create(model="gamma", prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={**stop, "min_tokens": 3})
    assert (first.usage.completion_tokens, first.choices[0].finish_reason) == (1, "stop")
    assert held.usage.completion_tokens == 4 and held.choices[0].finish_reason == "stop"


def test_echo_with_logprobs_scores_the_prompt(served, tiny_base):
    """OpenAI's echo (what lm-evaluation-harness sends to score a text): the choice's text starts with the prompt,
    and with logprobs the prompt tokens come first, the first without a logprob, the rest the base model's own
    log-softmax; streamed as whole. Without logprobs, echo adds only the text; with max_tokens 0 the prompt is
    scored and nothing generated (0 needs echo)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    server, _ = served
    client, base = server.openai(ADMIN_KEY), server.state.base_name
    ids = completion_prompt_ids(AutoTokenizer.from_pretrained(tiny_base), PROMPT)[0]
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        want = model(torch.tensor([ids])).logits[0].log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
    args = dict(model=base, prompt=PROMPT, max_tokens=3, temperature=0)
    echoed = client.completions.create(**args, echo=True, logprobs=1).choices[0]
    plain = client.completions.create(**args, logprobs=1).choices[0]
    assert echoed.text == PROMPT + plain.text
    lp = echoed.logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.tokens[len(ids):] == plain.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(ids)]), want.squeeze(1), atol=1e-4, rtol=0)
    assert lp.token_logprobs[len(ids):] == plain.logprobs.token_logprobs
    stream = list(client.completions.create(**args, echo=True, logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in stream if c.choices) == echoed.text
    assert sum((c.choices[0].logprobs.token_logprobs for c in stream if c.choices), []) == lp.token_logprobs
    assert client.completions.create(**args, echo=True).choices[0].text == echoed.text
    # max_tokens 0: the prompt scored, nothing generated.
    scored = client.completions.create(**{**args, "max_tokens": 0}, echo=True, logprobs=1)
    assert scored.choices[0].text == PROMPT and scored.choices[0].finish_reason == "length"
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]
    assert (scored.usage.prompt_tokens, scored.usage.completion_tokens) == (len(ids), 0)
    streamed = list(client.completions.create(**{**args, "max_tokens": 0}, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == PROMPT
    with pytest.raises(openai.BadRequestError, match="needs echo"):
        client.completions.create(**{**args, "max_tokens": 0})


def test_tokenize_and_detokenize(served, tiny_base):
    """vLLM's /tokenize gives the ids a completion or chat request would run on (the server's own prompt paths),
    /detokenize their text; the key must be one that may use the model; bad input is a 400 naming its field."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    server, keys = served
    with server.http(keys["alpha"]) as http:
        got = http.post("/tokenize", json={"model": "alpha", "prompt": PROMPT}).json()
        assert got["tokens"] == completion_prompt_ids(tokenizer, PROMPT)[0] and got["count"] == len(got["tokens"])
        assert got["max_model_len"] == server.state.config.engine.max_model_len
        chat = http.post("/tokenize", json={"model": "alpha", "messages": CHAT}).json()
        assert chat["tokens"] == chat_prompt_ids(tokenizer, [ChatMessage(**m) for m in CHAT])
        bare = http.post("/tokenize", json={"model": "alpha", "prompt": PROMPT, "add_special_tokens": False}).json()
        text = http.post("/detokenize", json={"model": "alpha", "tokens": bare["tokens"]}).json()
        assert text == {"prompt": tokenizer.decode(bare["tokens"])} and PROMPT in text["prompt"]
        _error(http.post("/tokenize", json={"model": "beta", "prompt": PROMPT}), 403, "model_not_permitted")
        _error(http.post("/tokenize", json={"model": "nobody", "prompt": PROMPT}), 404, "model_not_found")
        _error(http.post("/tokenize", json={"model": "alpha", "prompt": PROMPT, "messages": CHAT}), 400)
        error = _error(http.post("/detokenize", json={"model": "alpha", "tokens": [1, 10 ** 9]}), 400)
        assert error["param"] == "tokens"
    with server.http(None) as anonymous:
        _error(anonymous.post("/tokenize", json={"model": "alpha", "prompt": PROMPT}), 401, "missing_api_key")


def _error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def test_client_errors(served):
    server, keys = served
    body = {"model": "alpha", "messages": CHAT, "max_tokens": 4}
    with server.http(None) as anonymous:
        _error(anonymous.post("/v1/chat/completions", json=body), 401, "missing_api_key")
    with server.http("ds-0000000000000000.not-a-real-key-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa") as stranger:
        _error(stranger.post("/v1/chat/completions", json=body), 401, "invalid_api_key")
    with server.http(keys["alpha"]) as alpha:
        _error(alpha.post("/v1/chat/completions", json={**body, "model": "beta"}), 403, "model_not_permitted")
        _error(alpha.post("/v1/chat/completions", json={**body, "model": "nobody"}), 404, "model_not_found")
        _error(alpha.post("/v1/chat/completions", content=b'{"model": "alpha", "messages": [',
                          headers={"content-type": "application/json"}), 400, "invalid_json")
        error = _error(alpha.post("/v1/chat/completions", json={**body, "max_tokens": 0}), 400)
        assert error["param"] == "max_tokens"
        error = _error(alpha.post("/v1/completions", json={"model": "alpha", "prompt": "x", "temprature": 0.5}), 400,
                       "unknown_parameter")
        assert "temprature" in error["message"]
        _error(alpha.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 10_000}), 400,
               "context_length_exceeded")
        _error(alpha.post("/v1/chat/completions", json={"model": "alpha"}), 400, "missing_required_parameter")
        _error(alpha.get("/v1/nothing-here"), 404)
    # The openai client maps these onto its typed exceptions.
    with pytest.raises(openai.NotFoundError):
        server.openai(ADMIN_KEY).chat.completions.create(model="nobody", messages=CHAT)
    with pytest.raises(openai.PermissionDeniedError):
        server.openai(keys["beta"]).completions.create(model="gamma", prompt="x")
    with pytest.raises(openai.BadRequestError):
        server.openai(keys["beta"]).completions.create(model="beta", prompt="x", max_tokens=0)


def _wait_until_idle_and_counted(server, engine, *expected: str) -> None:
    """Wait until the engine has dropped every sequence (an abandoned one must not keep running) and every
    ``expected`` line shows in /metrics: the server counts an abort in its cancellation handler, just after
    the engine lets go."""
    deadline = time.monotonic() + 30
    while True:
        idle = engine.stats().num_running + engine.stats().num_waiting == 0
        with server.http(None) as http:
            metrics = http.get("/metrics").text
        missing = [line for line in expected if line not in metrics]
        if idle and not missing:
            return
        assert time.monotonic() < deadline, f"still running: {not idle}; not in /metrics: {missing}"
        time.sleep(0.05)


def test_disconnect_mid_stream_aborts(served, monkeypatch):
    server, keys = served
    # The whole answer below must outlast the server's noticing the client gone (a read timeout, then one poll):
    # 240 tokens of the tiny model take well under a second on a fast machine, which at the default 0.5 s poll
    # let the answer finish first and fail this test now and then (seen in a fresh-clone run of .ci/run).
    monkeypatch.setattr(disconnect, "POLL_SECONDS", 0.05)
    engine = server.state.engine
    body = {"model": "beta", "prompt": PROMPT, "max_tokens": 240, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with server.http(keys["beta"]) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()  # kept referenced: a dropped iterator closes the response
            assert next(lines).startswith("data: ")
            with server.http(None) as probe:  # while it streams, the gateway gauge names the tenant as running
                assert 'running_lora_adapters="beta"' in probe.get("/metrics").text
        # Leaving the block closed the connection after one chunk of 240 tokens.
    _wait_until_idle_and_counted(server, engine, 'deltaserve_sequences_finished_total{finish_reason="abort",tenant="beta"} 1.0')

    # A whole answer has nothing to send until the end: the server polls the connection meanwhile.
    with server.http(keys["beta"]) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(10, read=0.2))
    _wait_until_idle_and_counted(server, engine,
                       'deltaserve_sequences_finished_total{finish_reason="abort",tenant="beta"} 2.0',
                       'deltaserve_request_errors_total{status="499",tenant="beta"} 1.0')


def test_health_ready_metrics(served):
    server, _ = served
    with server.http(None) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").json()["status"] == "ready"
        text = http.get("/metrics").text
    for name in ("deltaserve_requests_total", "deltaserve_prompt_tokens_total", "deltaserve_completion_tokens_total",
                 "deltaserve_time_to_first_token_seconds_bucket", "deltaserve_inter_token_latency_seconds_bucket",
                 "deltaserve_e2e_request_latency_seconds_bucket", "deltaserve_num_requests_running",
                 "deltaserve_kv_cache_usage_ratio", "deltaserve_device_memory_bytes", "deltaserve_delta_tier_events_total",
                 "deltaserve_delta_load_seconds_bucket", "deltaserve_decode_graph_captures_total",
                 "deltaserve_decode_graph_capture_seconds_total", "deltaserve_decode_graph_covering_steps_total",
                 "vllm:lora_requests_info"):
        assert name in text, name
    assert 'deltaserve_requests_total{endpoint="chat",tenant="alpha"}' in text
    # Three tenants went through two slots: loads, misses and at least one eviction were counted.
    for event in ("load", "miss", "eviction"):
        assert f'deltaserve_delta_tier_events_total{{event="{event}",tier="gpu"}}' in text, event
    assert 'deltaserve_delta_resident{tier="gpu"} 2.0' in text
    assert re.search(r'^vllm:lora_requests_info\{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""\} ',
                     text, re.M)


def test_grafana_panels_use_exported_metrics(served):
    """Every metric a dashboard panel queries exists in /metrics (after the traffic of the tests above)."""
    server, _ = served
    with server.http(None) as http:
        exported = http.get("/metrics").text
    dashboard = json.loads((REPO / "docker" / "grafana-dashboard.json").read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\b(?:deltaserve_|vllm:)[a-z0-9_:]+", target["expr"]):
                assert re.search(rf"^{re.escape(name)}[{{ ]", exported, re.M), f"{panel['title']}: {name}"
