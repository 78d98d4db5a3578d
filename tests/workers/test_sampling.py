"""Choosing tokens: extreme but valid options give a token, never a NaN."""

import pytest
import torch

from workers.contract import SamplingOptions
from workers.engines.sampling import Sampler

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
