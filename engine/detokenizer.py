"""Incremental detokenization and stop strings for one sequence.

Text is decoded a few tokens at a time, starting from a short window before the new tokens so tokenizers
that merge a leading space or split a character over several byte tokens decode correctly. Text that
could be the start of a stop string is held back until it is known not to be one, so a client never sees
part of a stop string.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 5     # prompt tokens kept as decoding context for the first generated tokens


class TextDecoder:
    """tokenizer.decode(ids, skip_special_tokens), straight from the Rust tokenizer where that gives the same text.

    Why: every decode step decodes twice per sequence (Detokenizer.add); transformers' wrapper around the Rust call
    (argument conversion, clean-up checks) cost ~20 us a call on the CPU against ~1 us for the decode itself, ~1.4 ms
    of host time a step at batch 64, in which the GPU waits for the next step. The wrapper is skipped only when it
    adds nothing: the tokenizer is transformers' plain Rust-backed class (decode and _decode not overridden) and its
    clean-up of spaces is off, or skipped by transformers itself (BPE models)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer if _plain_rust_decode(tokenizer) else None

    def __call__(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def _plain_rust_decode(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether tokenizer.decode is the Rust tokenizer's decode with no change to its text (see TextDecoder)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    cls = type(tokenizer)
    if (not isinstance(tokenizer, TokenizersBackend) or cls._decode is not TokenizersBackend._decode
            or cls.decode is not PreTrainedTokenizerBase.decode):
        return False
    if not tokenizer.clean_up_tokenization_spaces:
        return True
    # transformers skips the clean-up for BPE models unless this flag says otherwise (absent: not known to skip)
    flag = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", True)
    return type(tokenizer.backend_tokenizer.model).__name__ == "BPE" and flag is False


class Detokenizer:
    def __init__(self, decode: TextDecoder, prompt_token_ids: list[int], stop: list[str]):
        self.decode = decode
        self.stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0                    # decoding window start
        self._read = len(self._tokens)      # tokens before this are already in `text`
        self.text = ""                      # completion text so far (stop string cut off)
        self._emitted = 0

    def add(self, token_id: int, hidden: bool) -> bool:
        """Append a generated token (`hidden`: a stop token, kept out of the text); True if a stop string ended."""
        if hidden:
            return False
        self._tokens.append(token_id)
        before = self.decode(self._tokens[self._prefix : self._read], skip_special_tokens=True)
        full = self.decode(self._tokens[self._prefix :], skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return False                    # an incomplete multi-byte character: wait for its other bytes
        new = full[len(before):]
        self._prefix, self._read = self._read, len(self._tokens)
        search_from = max(0, len(self.text) - self._holdback)
        self.text += new
        found = [at for at in (self.text.find(s, search_from) for s in self.stop) if at != -1]
        if found:
            self.text = self.text[: min(found)]
        return bool(found)

    def take(self, finished: bool) -> str:
        """Text not yet handed out that is safe to hand out now (everything once finished)."""
        end = len(self.text) if finished else max(self._emitted, len(self.text) - self._holdback)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out
