"""Turn API inputs into token ids: chat messages through the model's chat template, completion prompts
as text or as token ids (OpenAI accepts a string, a list of strings, a token list or a list of them)."""
from __future__ import annotations

from .errors import bad_request
from .schemas import ChatMessage


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise bad_request("This model has no chat template; use /v1/completions.", param="messages")
    # "developer" is OpenAI's newer name for "system"; open chat templates know only "system".
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    # Render to text, then tokenize without adding specials: the template already wrote BOS where it wants one.
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The request's prompts one by one, each text or token ids."""
    if isinstance(prompt, str) or all(isinstance(item, int) for item in prompt):
        return [prompt]
    return list(prompt)


def completion_prompt_ids(tokenizer, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    # Token ids are checked by the engine (range, emptiness), which answers ValueError -> 400.
    return [tokenizer(item)["input_ids"] if isinstance(item, str) else list(item)
            for item in _completion_prompts(prompt)]


def completion_echo_texts(tokenizer, prompt: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    """What OpenAI's echo puts before each prompt's completions: the prompt as sent, token ids as their text."""
    return [item if isinstance(item, str) else tokenizer.decode(item) for item in _completion_prompts(prompt)]
