"""Sampling penalties (engine/sampler.penalize) against a per-row loop of their definitions."""
from __future__ import annotations

import secrets

import pytest
import torch

from deltaserve.engine.config import SamplingParams
from deltaserve.engine.sampler import penalize


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
    return out


def test_penalties_match_their_definitions():
    seed = secrets.randbits(32)
    g = torch.Generator().manual_seed(seed)
    vocab = 50
    params = [SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3),
              SamplingParams(),                                   # no penalty: the row stays as it is
              SamplingParams(frequency_penalty=-1.5),             # negative: repeats are favoured
              SamplingParams(repetition_penalty=0.8, temperature=0),
              SamplingParams(presence_penalty=2.0)]
    token_ids = [torch.randint(0, vocab, (int(n),), generator=g).tolist()
                 for n in torch.randint(1, 30, (len(params),), generator=g)]
    prompt_lens = [int(torch.randint(0, len(ids) + 1, (1,), generator=g)) for ids in token_ids]
    params.append(SamplingParams(presence_penalty=1.0))   # a row with nothing to penalize yet
    token_ids.append([])
    prompt_lens.append(0)
    logits = torch.randn(len(params), vocab, generator=g) * 3
    got = penalize(logits, params, token_ids, prompt_lens)
    torch.testing.assert_close(got, _reference(logits, params, token_ids, prompt_lens), msg=f"seed {seed}")
    assert torch.equal(got[1], logits[1])


def test_no_penalty_returns_the_logits_untouched():
    logits = torch.randn(2, 8)
    assert penalize(logits, [SamplingParams(), SamplingParams(temperature=0)], [[1, 2], [3]], [1, 1]) is logits


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                          ("repetition_penalty", 0.0)])
def test_out_of_range_penalties_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
