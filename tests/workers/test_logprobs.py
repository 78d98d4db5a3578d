"""Log probabilities of the chosen tokens in the transformers engine, with both decode
batches: scored on the model's distribution, sent with the text they make, for the rows that
asked, without changing what any row samples."""

import math

import torch

from tests.workers.test_engine import job, run_together
from workers.engines.llava_requests import prepare


class ScoringSink:
    def __init__(self):
        self.parts: list[str] = []
        self.scored: list = []
        self.unscored_chunks = 0

    def token(self, text: str, logprobs=None) -> None:
        self.parts.append(text)
        if logprobs is None:
            self.unscored_chunks += 1
        else:
            self.scored.extend(logprobs)

    def should_stop(self) -> bool:
        return False

    @property
    def text(self) -> str:
        return "".join(self.parts)


def scoring(content: str, alternatives: int, **kwargs):
    spec = job(content, **kwargs)
    spec.options.logprobs = alternatives
    return spec


def test_each_token_comes_with_its_log_probability_and_likeliest_alternatives(engine):
    greedy, sampled = (
        scoring("hello there", 3, tokens=12),
        scoring("a longer prompt", 5, tokens=12, temperature=0.9, seed=4),
    )
    plain = job("a longer prompt", tokens=12, temperature=0.9, seed=4)
    sinks = [ScoringSink() for _ in range(3)]
    results = run_together(engine, [greedy, sampled, plain], sinks)
    for sink, result, alternatives in zip(sinks[:2], results[:2], (3, 5), strict=True):
        assert sink.unscored_chunks == 0
        assert len(sink.scored) == result.output_tokens  # no stop string: every token's text
        # the tokens' bytes make the text (a token's own text may hold part of a character)
        assert b"".join(bytes(e.bytes) for e in sink.scored).decode(errors="replace") == sink.text
        for entry in sink.scored:
            assert entry.logprob <= 0 and len(entry.top) == alternatives
            values = [t.logprob for t in entry.top]
            assert values == sorted(values, reverse=True)
            assert sum(math.exp(v) for v in values) <= 1 + 1e-4
            assert entry.logprob <= values[0] + 1e-6
    for entry in sinks[0].scored:  # greedy: the likeliest token is the one chosen
        assert entry.top[0].token == entry.token
        assert entry.top[0].logprob == entry.logprob
    # asking for them changes nothing sampled: the row without them drew the same answer
    assert sinks[1].text == sinks[2].text
    assert sinks[2].scored == [] and sinks[2].unscored_chunks > 0


def test_the_first_tokens_log_probability_is_the_models_own(engine):
    """Checked against a forward pass of the prompt outside the engine (the tokens the
    engine may never choose taken out, as for the choice)."""
    spec = scoring("what is in the picture?", 2, tokens=1)
    sink = ScoringSink()
    engine.generate(spec, sink)
    request = prepare(spec, sink, engine.processor, 8192, 8, engine.device)
    with torch.inference_mode():
        logits = engine.model(**request.inputs, logits_to_keep=1).logits[0, -1].float()
        logits[engine.suppressed] = float("-inf")
        expected = torch.log_softmax(logits, dim=-1)
    [entry] = sink.scored
    chosen = int(torch.argmax(expected))
    assert entry.token == engine.processor.tokenizer.decode([chosen])
    assert abs(entry.logprob - float(expected[chosen])) < 1e-4
    second = float(torch.topk(expected, 2).values[1])
    assert abs(entry.top[1].logprob - second) < 1e-4
