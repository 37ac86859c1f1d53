"""vLLM's /tokenize and /detokenize: the model's token ids of a completion prompt or of chat messages (as the chat
template renders them), and the text of token ids, so clients can count and check tokens before they send a
request. A tenant shares the base's tokenizer; the key must still be one that may use the model."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import Field, model_validator

from .errors import bad_request
from .openai_api import resolve_tenant
from .prompting import chat_prompt_ids
from .schemas import ChatMessage, Strict
from .state import ServerState, app_state

router = APIRouter()


class TokenizeRequest(Strict):
    model: str
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True     # a completion prompt's BOS (chat templates write their own)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(Strict):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(Strict):
    model: str
    tokens: list[int]


class DetokenizeResponse(Strict):
    prompt: str


def _allowed(request: Request, model: str) -> ServerState:
    """The server state, once the caller's key may use `model` (401, 403 and 404 as the completions answer)."""
    state = app_state(request)
    resolve_tenant(state, state.auth.client(request), model)
    return state


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = _allowed(request, body.model)
    tokenizer = state.engine.tokenizer
    if body.messages is not None:
        tokens = chat_prompt_ids(tokenizer, body.messages)
    else:
        tokens = tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=state.config.engine.max_model_len)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = _allowed(request, body.model)
    vocab = state.engine.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise bad_request(f"tokens must be token ids of this model (0 to {vocab - 1}).", param="tokens")
    return DetokenizeResponse(prompt=state.engine.tokenizer.decode(body.tokens))
