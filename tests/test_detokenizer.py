"""TextDecoder (engine/detokenizer.py): the Rust tokenizer's decode where it gives transformers' text, the wrapper
otherwise; the same text either way, on fresh random token ids (special tokens among them)."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from deltaserve.engine.detokenizer import Detokenizer, TextDecoder
from tiny_models import make_tokenizer


def _word_tokenizer(clean_up: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose words include punctuation, which transformers' clean-up of spaces changes."""
    words = ["<unk>", "</s>", "a", "b", ".", ",", "?", "n't", "'s", "!"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # spaces left for transformers to clean up
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   clean_up_tokenization_spaces=clean_up)


@pytest.mark.parametrize("make, fast", [(make_tokenizer, True), (lambda: _word_tokenizer(False), True),
                                        (lambda: _word_tokenizer(True), False)],
                         ids=["bpe", "wordlevel", "wordlevel-clean-up"])
def test_text_decoder_matches_transformers(make, fast: bool) -> None:
    tokenizer = make()
    decode = TextDecoder(tokenizer)
    assert (decode._backend is not None) == fast      # the fast path only where it keeps the text
    if not fast:    # the case is real: the Rust decode alone would leave the spaces transformers takes out
        assert tokenizer.backend_tokenizer.decode([2, 4, 3, 7]) != tokenizer.decode([2, 4, 3, 7])
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 12))]
        for skip in (False, True):
            assert decode(ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip), f"seed {seed}: {ids}"


def test_detokenizer_text_matches_whole_decode() -> None:
    """Token by token, the incremental text equals decoding the whole completion at once (random words, so every
    character's bytes arrive: random byte-level tokens may end inside a character, which the detokenizer holds)."""
    tokenizer = make_tokenizer()
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    words = ["the", "token", "é", "naïve", "日本", "delta", "42", "tenant", "!", "?", "ünïcode", "serve"]
    prompt = tokenizer.encode(" ".join(rng.choice(words) for _ in range(6)))
    completion = tokenizer.encode(" " + " ".join(rng.choice(words) for _ in range(20)))
    detok = Detokenizer(TextDecoder(tokenizer), prompt, [])
    for token in completion:
        detok.add(token, hidden=False)
    context = tokenizer.decode(prompt[-5:], skip_special_tokens=True)
    whole = tokenizer.decode(prompt[-5:] + completion, skip_special_tokens=True)
    assert detok.text and detok.text == whole[len(context):], f"seed {seed}"
