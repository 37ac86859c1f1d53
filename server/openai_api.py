"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions (whole or SSE-streamed), /v1/models and
/v1/models/{model}."""
from __future__ import annotations

import json
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from deltaserve.engine import SamplingParams

from .auth import Caller
from .disconnect import unless_disconnected
from .errors import APIError, bad_request, internal_error, model_not_found
from .generation import GenerationJob
from .prompting import chat_prompt_ids, completion_echo_texts, completion_prompt_ids
from .renderers import ChatRenderer, ChoiceState, CompletionRenderer, usage_of
from .schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, SamplingFields
from .state import ServerState, app_state

router = APIRouter()


def servable_tenants(state: ServerState) -> list:
    """Tenants that have a delta to serve (a tenant created but not yet uploaded is not a model yet)."""
    return [t for t in state.store.list_tenants() if t.current is not None]


def resolve_tenant(state: ServerState, caller: Caller, model: str) -> str | None:
    """The tenant that ``model`` names (None for the base); 404 unknown, 403 not this caller's."""
    if model != state.base_name:
        try:
            state.store.current_version(model)
        except LookupError:  # no such tenant, or no delta uploaded yet
            raise model_not_found(model) from None
    if not state.auth.may_use(caller, model, state.base_name):
        raise APIError(403, f"Your API key may not use the model '{model}'.", code="model_not_permitted",
                       param="model")
    return None if model == state.base_name else model


def _model_cards(state: ServerState, caller: Caller) -> list[ModelCard]:
    """The models this caller may use: the base (if its key may), then every servable tenant it may."""
    base = state.base_name
    cards = [ModelCard(id=base, created=state.started_at, root=base)]
    for tenant in servable_tenants(state):
        if state.auth.may_use(caller, tenant.name, base):
            cards.append(ModelCard(id=tenant.name, created=int(tenant.created), root=base, parent=base))
    if not state.auth.may_use(caller, base, base):
        cards = cards[1:]
    return cards


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = app_state(request)
    return ModelList(data=_model_cards(state, state.auth.client(request)))


@router.get("/v1/models/{model:path}")  # a base model's name may hold a slash (org/name)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """One model's card; 404 for a model this caller cannot see (unknown or another tenant's), as OpenAI answers."""
    state = app_state(request)
    for card in _model_cards(state, state.auth.client(request)):
        if card.id == model:
            return card
    raise model_not_found(model)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = app_state(request)
    return await _serve(state, request, body, ChatRenderer(),
                        lambda tok: [chat_prompt_ids(tok, body.messages)], "chat")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = app_state(request)
    echo = completion_echo_texts(state.engine.tokenizer, body.prompt) if body.echo else None
    return await _serve(state, request, body, CompletionRenderer(echo, body.n),
                        lambda tok: completion_prompt_ids(tok, body.prompt), "completions")


def _sampling_params(state: ServerState, body: SamplingFields, prompts: list[list[int]]) -> SamplingParams:
    limit = state.config.engine.max_model_len
    longest = max(len(p) for p in prompts)
    if longest >= limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens; the prompt has {longest}.",
                          param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                          code="context_length_exceeded")
    max_tokens = body.token_limit()
    if max_tokens is None:
        max_tokens = limit - longest
    elif longest + max_tokens > limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens; {longest} in the prompt plus "
                          f"{max_tokens} requested is {longest + max_tokens}. Lower max_tokens.",
                          param="max_tokens", code="context_length_exceeded")
    if body.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens}).",
                          param="min_tokens")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k, seed=body.seed, stop=body.stop, logprobs=body.logprobs_count(),
        prompt_logprobs=_prompt_logprobs(body, max_tokens),
        ignore_eos=body.ignore_eos, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, repetition_penalty=body.repetition_penalty,
        logit_bias={_token_id(state, key, "logit_bias"): bias for key, bias in (body.logit_bias or {}).items()},
        min_tokens=body.min_tokens,
        stop_token_ids=[_token_id(state, token, "stop_token_ids") for token in body.stop_token_ids or []],
    )


def _prompt_logprobs(body: SamplingFields, max_tokens: int) -> int | None:
    """The engine's prompt_logprobs: echo with logprobs asks for the prompt tokens' too, and echo with max_tokens 0
    (scoring only) needs the engine to score the prompt even without them."""
    if not isinstance(body, CompletionRequest) or not body.echo:
        return None
    return body.logprobs if body.logprobs is not None or max_tokens > 0 else 0


def _token_id(state: ServerState, key: str | int, param: str) -> int:
    """key as a token id of this model (OpenAI sends logit_bias' keys as text); a 400 naming `param` if it is none."""
    vocab = state.engine.vocab_size
    token = int(key) if str(key).isdigit() else -1
    if not 0 <= token < vocab:
        raise bad_request(f"{param}: {key!r} is not a token id of this model (0 to {vocab - 1}).", param=param)
    return token


async def _serve(state: ServerState, request: Request, body: SamplingFields, renderer, make_prompts, endpoint: str):
    caller = state.auth.client(request)
    tenant = resolve_tenant(state, caller, body.model)
    request.state.metrics_tenant = body.model  # errors past this point are counted against this model
    state.metrics.requests.labels(body.model, endpoint).inc()
    prompts = make_prompts(state.engine.tokenizer)
    job = GenerationJob(request_id=f"{renderer.object_prefix}-{uuid.uuid4().hex}", model=body.model, tenant=tenant,
                        prompts=prompts, params=_sampling_params(state, body, prompts), n=body.n)
    created = int(time.time())
    want_logprobs = body.logprobs_count() is not None
    if not body.stream:
        choices = await unless_disconnected(request, _collect(state, job))
        return renderer.response(job.request_id, created, body.model, choices, body.n, want_logprobs)

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    events = _sse(state, job, renderer, created, want_logprobs, include_usage)
    # Wait for the first event before answering, so that a failure to start (delta load, engine) is still an
    # HTTP error status rather than an error inside a 200 stream.
    first = await unless_disconnected(request, anext(events))
    return StreamingResponse(_prepend(first, events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"},
                             # A client that disconnects cancels the stream; closing the generator here runs
                             # its cleanup, which aborts the sequences still in the engine.
                             background=BackgroundTask(events.aclose))


async def _collect(state: ServerState, job: GenerationJob) -> dict[int, ChoiceState]:
    choices: dict[int, ChoiceState] = {}
    async with aclosing(state.generator.run(job)) as outputs:
        async for index, out in outputs:
            _absorb(choices.setdefault(index, ChoiceState()), out)
    return choices


async def _sse(state: ServerState, job: GenerationJob, renderer, created: int, want_logprobs: bool,
               include_usage: bool) -> AsyncIterator[str]:
    choices: dict[int, ChoiceState] = {}
    exclude = None if include_usage else {"usage"}
    try:
        async with aclosing(state.generator.run(job)) as outputs:
            async for index, out in outputs:
                sofar = choices.setdefault(index, ChoiceState())
                # A token that ends mid-character has no text yet; its chunk is still sent if it carries
                # logprobs (or the role, or the finish reason).
                if out.new_text or out.finished or not sofar.started or (want_logprobs and out.logprobs):
                    chunk = renderer.chunk(job.request_id, created, job.model, index, out, sofar, want_logprobs)
                    yield f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"
                _absorb(sofar, out)
    except Exception as exc:
        if not choices:  # nothing sent yet: the caller still answers with a proper HTTP status
            raise
        error = exc if isinstance(exc, APIError) else internal_error(exc)
        state.metrics.errors.labels(job.model, str(error.status)).inc()
        yield f"data: {json.dumps(error.body())}\n\n"
    if include_usage:
        usage = renderer.usage_chunk(job.request_id, created, job.model, usage_of(choices, job.n))
        yield f"data: {usage.model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item


def _absorb(choice: ChoiceState, out) -> None:
    choice.started = True
    if out.prompt_logprobs is not None:
        choice.prompt_logprobs = out.prompt_logprobs
    choice.text += out.new_text
    choice.logprobs.extend(out.logprobs or [])
    if out.finished:
        choice.finish_reason = out.finish_reason
        choice.num_prompt_tokens = out.num_prompt_tokens
        choice.num_completion_tokens = out.num_completion_tokens
