"""Incremental detokenization and stop strings for one sequence.

Text is decoded a few tokens at a time, starting from a short window before the new tokens so tokenizers
that merge a leading space or split a character over several byte tokens decode correctly. Text that
could be the start of a stop string is held back until it is known not to be one, so a client never sees
part of a stop string.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 5     # prompt tokens kept as decoding context for the first generated tokens


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
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
        before = self.tokenizer.decode(self._tokens[self._prefix : self._read], skip_special_tokens=True)
        full = self.tokenizer.decode(self._tokens[self._prefix :], skip_special_tokens=True)
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
