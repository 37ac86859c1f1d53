"""How a request shapes its logits before sampling (engine/sampler.process_logits: penalties, logit_bias,
min_tokens) against a per-row loop of the definitions."""
from __future__ import annotations

import secrets

import pytest
import torch

from deltaserve.engine.config import SamplingParams
from deltaserve.engine.sampler import process_logits

EOS = [2, 7]


def _reference(logits: torch.Tensor, params: list[SamplingParams], token_ids: list[list[int]],
               prompt_lens: list[int]) -> torch.Tensor:
    """vLLM's order, one row and one token at a time."""
    out = logits.clone()
    for row, (p, ids, n) in enumerate(zip(params, token_ids, prompt_lens)):
        output = ids[n:]
        for token in set(ids):
            value = out[row, token]
            out[row, token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(output):
            out[row, token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
        for token, bias in p.logit_bias.items():
            out[row, token] += bias
        if len(output) < p.min_tokens:
            for token in p.stop_token_ids + ([] if p.ignore_eos else EOS):
                out[row, token] = float("-inf")
    return out


def test_processed_logits_match_their_definitions():
    seed = secrets.randbits(32)
    g = torch.Generator().manual_seed(seed)
    vocab = 50
    params = [SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3),
              SamplingParams(),                                   # nothing asked: the row stays as it is
              SamplingParams(frequency_penalty=-1.5, logit_bias={3: 5.0, 40: -100.0}),
              SamplingParams(repetition_penalty=0.8, temperature=0, min_tokens=16, stop_token_ids=[11]),
              SamplingParams(presence_penalty=2.0, min_tokens=16, ignore_eos=True, stop_token_ids=[12]),
              SamplingParams(logit_bias={2: 1.5}, min_tokens=1)]
    token_ids = [torch.randint(0, vocab, (int(n),), generator=g).tolist()
                 for n in torch.randint(1, 30, (len(params),), generator=g)]
    prompt_lens = [int(torch.randint(0, len(ids) + 1, (1,), generator=g)) for ids in token_ids]
    params.append(SamplingParams(presence_penalty=1.0))   # a row with nothing to penalize yet
    token_ids.append([])
    prompt_lens.append(0)
    logits = torch.randn(len(params), vocab, generator=g) * 3
    got = process_logits(logits, params, token_ids, prompt_lens, EOS)
    torch.testing.assert_close(got, _reference(logits, params, token_ids, prompt_lens), msg=f"seed {seed}")
    assert torch.equal(got[1], logits[1])


def test_min_tokens_masks_eos_until_reached():
    logits = torch.zeros(2, 10)
    params = [SamplingParams(max_tokens=8, min_tokens=3)] * 2
    got = process_logits(logits, params, [[1, 4, 5], [1, 4, 5, 6]], [1, 1], EOS)
    assert got[0, EOS].tolist() == [float("-inf")] * 2, "two completion tokens of three: EOS stays masked"
    assert torch.equal(got[1], logits[1]), "three completion tokens: EOS may come"


def test_nothing_asked_returns_the_logits_untouched():
    logits = torch.randn(2, 8)
    assert process_logits(logits, [SamplingParams(), SamplingParams(temperature=0)], [[1, 2], [3]], [1, 1],
                          EOS) is logits


@pytest.mark.parametrize("fields, match", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(logit_bias={5: 101.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(max_tokens=4, min_tokens=5), "min_tokens")])
def test_out_of_range_fields_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**fields)
