"""Shape engine outputs into OpenAI bodies: chat vs text completions, whole responses vs stream chunks.

The two endpoints share the request flow (openai_api.py); only what a choice, a chunk and logprobs look
like differs, and that lives here, one class per endpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta,
                      ChatLogprobs, ChatTokenLogprob, Completion, CompletionChoice, CompletionLogprobs, TopLogprob,
                      Usage)


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: str = ""
    logprobs: list = field(default_factory=list)   # engine TokenLogprob per generated token
    prompt_logprobs: list | None = None            # engine TokenLogprob per prompt token (echo with logprobs)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    started: bool = False


def usage_of(choices: dict[int, ChoiceState], n: int) -> Usage:
    # Each prompt is processed once however many choices it has: count it from its first choice.
    prompt = sum(c.num_prompt_tokens for i, c in choices.items() if i % n == 0)
    completion = sum(c.num_completion_tokens for c in choices.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ChatRenderer:
    object_prefix = "chatcmpl"

    def logprobs(self, entries: list) -> ChatLogprobs:
        content = []
        for e in entries:  # engine TokenLogprob
            tops = [TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode())) for t in e.top_logprobs]
            content.append(ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
                                            top_logprobs=tops))
        return ChatLogprobs(content=content)

    def response(self, rid: str, created: int, model: str, choices: dict[int, ChoiceState], n: int,
                 want_logprobs: bool) -> ChatCompletion:
        return ChatCompletion(id=rid, created=created, model=model, usage=usage_of(choices, n), choices=[
            ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                       logprobs=self.logprobs(c.logprobs) if want_logprobs else None)
            for i, c in sorted(choices.items())])

    def chunk(self, rid: str, created: int, model: str, index: int, out, sofar: ChoiceState,
              want_logprobs: bool) -> ChatCompletionChunk:
        # The first chunk of a choice announces the role, as OpenAI's stream does.
        delta = ChatDelta(role=None if sofar.started else "assistant", content=out.new_text)
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=out.finish_reason if out.finished else None,
                                 logprobs=self.logprobs(out.logprobs or []) if want_logprobs else None)
        return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])

    def usage_chunk(self, rid: str, created: int, model: str, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)


class CompletionRenderer:
    """echo_texts: with OpenAI's echo, each prompt's text, which its choices' text starts with (and with logprobs,
    the prompt tokens' entries their logprobs); n: choices per prompt."""

    object_prefix = "cmpl"

    def __init__(self, echo_texts: list[str] | None = None, n: int = 1):
        self.echo_texts, self.n = echo_texts, n

    def logprobs(self, entries: list, text_start: int) -> CompletionLogprobs:
        tokens, offsets = [], []
        offset = text_start
        for e in entries:  # engine TokenLogprob
            tokens.append(e.token)
            offsets.append(offset)
            offset += len(e.token)
        tops = [None if e.logprob is None else {t.token: t.logprob for t in e.top_logprobs} for e in entries]
        return CompletionLogprobs(tokens=tokens, token_logprobs=[e.logprob for e in entries], top_logprobs=tops,
                                  text_offset=offsets)

    def _echo(self, index: int) -> str:
        return self.echo_texts[index // self.n] if self.echo_texts is not None else ""

    def response(self, rid: str, created: int, model: str, choices: dict[int, ChoiceState], n: int,
                 want_logprobs: bool) -> Completion:
        return Completion(id=rid, created=created, model=model, usage=usage_of(choices, n), choices=[
            CompletionChoice(index=i, text=self._echo(i) + c.text, finish_reason=c.finish_reason,
                             logprobs=self.logprobs((c.prompt_logprobs or []) + c.logprobs, 0) if want_logprobs
                             else None)
            for i, c in sorted(choices.items())])

    def chunk(self, rid: str, created: int, model: str, index: int, out, sofar: ChoiceState,
              want_logprobs: bool) -> Completion:
        # An echoed prompt leads the choice's first chunk.
        echo = "" if sofar.started else self._echo(index)
        entries = ((out.prompt_logprobs or []) if not sofar.started else []) + (out.logprobs or [])
        text_start = 0 if not sofar.started else len(self._echo(index)) + len(sofar.text)
        choice = CompletionChoice(index=index, text=echo + out.new_text,
                                  finish_reason=out.finish_reason if out.finished else None,
                                  logprobs=self.logprobs(entries, text_start) if want_logprobs else None)
        return Completion(id=rid, created=created, model=model, choices=[choice])

    def usage_chunk(self, rid: str, created: int, model: str, usage: Usage) -> Completion:
        return Completion(id=rid, created=created, model=model, choices=[], usage=usage)
