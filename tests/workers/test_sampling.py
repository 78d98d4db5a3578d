"""Choosing tokens: extreme but valid options give a token, never a NaN; rows picked together
get what each gets alone; draws follow the probabilities."""

import pytest
import torch

from workers.contract import SamplingOptions
from workers.engines.sampling import Sampler, pick

LOGITS = torch.tensor([0.5, 3.0, -1.0, 2.5, float("-inf")])


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 1e-300},  # overflowed to NaN before: now greedy
        {"temperature": 0.0},
        {"temperature": 0.7, "top_p": 1e-261},  # only the likeliest token survives
        {"temperature": 0.7, "top_k": 1},
    ],
)
def test_degenerate_options_pick_the_likeliest_token(options):
    sampler = Sampler(SamplingOptions(**options), seed=3, device=torch.device("cpu"))
    assert sampler(LOGITS.clone()) == 1


def test_huge_temperature_and_top_k_still_sample_a_real_token():
    sampler = Sampler(
        SamplingOptions(temperature=100.0, top_k=1_000_000, top_p=1.0),
        seed=3,
        device=torch.device("cpu"),
    )
    picks = {sampler(LOGITS.clone()) for _ in range(50)}
    assert picks <= {0, 1, 2, 3} and len(picks) > 1  # never the -inf one; not always the same


def sampler(seed=3, **options) -> Sampler:
    return Sampler(SamplingOptions(**options), seed=seed, device=torch.device("cpu"))


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    top_k = sampler(temperature=5.0, top_k=2)
    assert {top_k(LOGITS.clone()) for _ in range(200)} == {1, 3}
    # Softmax of LOGITS: token 1 has 0.55, token 3 0.33: top_p 0.6 needs both, 0.5 only one.
    both = sampler(temperature=1.0, top_k=0, top_p=0.6)
    assert {both(LOGITS.clone()) for _ in range(200)} == {1, 3}
    only_first = sampler(temperature=1.0, top_k=0, top_p=0.5)
    assert {only_first(LOGITS.clone()) for _ in range(100)} == {1}


def test_draws_follow_the_probabilities():
    draw = sampler(seed=11, temperature=1.0, top_k=0, top_p=1.0)
    counts = torch.bincount(torch.tensor([draw(LOGITS.clone()) for _ in range(4000)]), minlength=5)
    expected = torch.softmax(LOGITS, dim=-1) * 4000
    assert counts[4] == 0
    assert torch.allclose(counts.float(), expected, atol=4000 * 0.03)


def test_rows_picked_together_get_what_each_gets_alone():
    options = [
        dict(temperature=0.0),
        dict(temperature=0.8, top_k=3, seed=5),
        dict(temperature=1.3, top_p=0.9, seed=6),
        dict(temperature=0.5, seed=7),
    ]
    logits = torch.randn(len(options), 1000, generator=torch.Generator().manual_seed(0))
    alone = [sampler(**o) for o in options]
    together = [sampler(**o) for o in options]
    for _ in range(20):
        expected = [s(logits[i].clone()) for i, s in enumerate(alone)]
        assert pick(together, logits.clone()).tolist() == expected
