"""The continuous-batching LLaVA engine, in process, on the tiny model: every behaviour with
both decode batches, the growing cache (`dynamic`, the CPU's default) and the fixed cache
(`slots`, the GPU's default, here without CUDA graphs)."""

import threading
import time

import pytest

from harness.helpers import png
from harness.jobs import chat_job
from tests.workers.conftest import DECODES
from workers.contract import ChatJob
from workers.engines.base import InvalidRequest
from workers.engines.kv_cache import FixedCache, Unsupported
from workers.engines.llava_transformers import TransformersLlava, idle_time


class Sink:
    def __init__(self, stop_after: int | None = None):
        self.parts: list[str] = []
        self.stop_after = stop_after

    def token(self, text: str) -> None:
        self.parts.append(text)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.parts) >= self.stop_after

    @property
    def text(self) -> str:
        return "".join(self.parts)


def job(content: str, images=(), tokens=20, temperature=0.0, seed=1, keep_alive=None) -> ChatJob:
    return chat_job(content, tokens, temperature, seed, images, keep_alive_seconds=keep_alive)


def one_by_one(engine, jobs) -> list[tuple]:
    """Each job alone, one after another: (its result, its streamed text)."""
    out = []
    for j in jobs:
        sink = Sink()
        out.append((engine.generate(j, sink), sink.text))
    return out


def run_together(engine, jobs, sinks):
    results = [None] * len(jobs)

    def run(i):
        results[i] = engine.generate(jobs[i], sinks[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


class Holding(Sink):
    """A sink that holds the engine thread at its first cancellation check (the one before
    its request is prefilled) until released: jobs sent meanwhile are all waiting when the
    engine resumes, as a burst of arrivals would be."""

    def __init__(self):
        super().__init__()
        self.reached, self.released = threading.Event(), threading.Event()

    def should_stop(self) -> bool:
        if not self.reached.is_set():
            self.reached.set()
            assert self.released.wait(30), "the test never released the engine"
        return False


def arriving_together(engine, jobs, sinks=None):
    """Run `jobs` so that the engine finds them all waiting at once; their results."""
    sinks = sinks or [Sink() for _ in jobs]
    holding = Holding()
    results = [None] * len(jobs)

    def run(i, sink):
        results[i] = engine.generate(jobs[i], sink)

    first = threading.Thread(target=run, args=(0, holding))
    first.start()
    assert holding.reached.wait(30)
    others = [threading.Thread(target=run, args=(i, sinks[i])) for i in range(1, len(jobs))]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 30
    while engine.active() < len(jobs) - 1:  # the first is in the engine's hands, not counted
        assert time.monotonic() < deadline, "the jobs never reached the engine"
        time.sleep(0.001)
    holding.released.set()
    for thread in [first, *others]:
        thread.join()
    sinks[0].parts = holding.parts
    return results


JOBS = [
    dict(content="hello there", tokens=30),
    dict(content="what is this?", images=[png(color="red")], tokens=25),
    dict(
        content="a longer prompt, to make the rows' lengths differ a lot",
        tokens=40,
        temperature=0.9,
        seed=3,
    ),
    dict(content="two pictures", images=[png(color="blue"), png(color="green")], tokens=12),
    dict(content="short", tokens=5, temperature=1.2, seed=99),
]


class TestBatching:
    def test_batched_rows_give_exactly_what_each_gives_alone(self, engine):
        jobs = [job(**spec) for spec in JOBS]
        alone = one_by_one(engine, jobs)
        steps_before, tokens_before = engine.decode_steps, engine.decode_tokens
        sinks = [Sink() for _ in jobs]
        together = run_together(engine, jobs, sinks)
        for (single, text), batched, sink in zip(alone, together, sinks, strict=True):
            assert sink.text == text
            assert batched.output_tokens == single.output_tokens
            assert batched.done_reason == single.done_reason == "length"
        occupancy = (engine.decode_tokens - tokens_before) / (engine.decode_steps - steps_before)
        assert occupancy > 1.5, "the concurrent requests should have decoded in shared steps"

    def test_cancelling_one_leaves_the_others_intact(self, engine):
        specs = [JOBS[0], JOBS[1] | {"tokens": 2000}, JOBS[2]]
        jobs = [job(**spec) for spec in specs]
        expected = [text for _, text in one_by_one(engine, jobs)]
        sinks = [Sink(), Sink(stop_after=3), Sink()]
        results = run_together(engine, jobs, sinks)
        assert results[1].done_reason == "cancelled"
        assert results[1].output_tokens < 2000
        for i in (0, 2):
            assert results[i].done_reason == "length"
            assert sinks[i].text == expected[i]


class TestPrefillTogether:
    """Requests that arrive together are prefilled in one forward pass (prompts left-padded
    to the longest, images through the vision tower as one batch), and each gets exactly what
    it gets alone."""

    def test_a_burst_is_prefilled_in_one_pass_and_each_answer_is_its_own(self, engine):
        jobs = [job(**spec) for spec in JOBS]
        alone = one_by_one(engine, jobs)
        passes, rows = engine.prefill_batches, engine.prefill_rows
        sinks = [Sink() for _ in jobs]
        together = arriving_together(engine, jobs, sinks)
        assert (engine.prefill_batches - passes, engine.prefill_rows - rows) == (1, len(jobs))
        for (single, text), batched, sink in zip(alone, together, sinks, strict=True):
            assert sink.text == text
            assert batched.output_tokens == single.output_tokens
            assert batched.prompt_tokens == single.prompt_tokens

    def test_a_group_stays_within_its_padded_tokens(self, models_dir, engine):
        same = [job("the same prompt for each of them", tokens=8) for _ in range(5)]
        expected = [text for _, text in one_by_one(engine, same)]
        prompt = engine.generate(same[0], Sink()).prompt_tokens
        small = TransformersLlava(
            "llava-llama3",
            models_dir / "llava-llama3",
            device="cpu",
            decode=engine.decode,
            prefill_tokens=2 * prompt,
        )
        try:
            sinks = [Sink() for _ in same]
            arriving_together(small, same, sinks)
            assert (small.prefill_batches, small.prefill_rows) == (3, 5)  # 2 + 2 + 1
            assert [sink.text for sink in sinks] == expected
            longer = small.generate(job("word " * (3 * prompt), tokens=4), Sink())
            assert longer.prompt_tokens > small.prefill_tokens and longer.output_tokens == 4
            assert small.prefill_batches == 4  # a prompt past the budget goes alone
        finally:
            small.close()

    def test_the_prefill_is_billed_by_the_prompts_tokens(self, engine):
        short, long = job("hi", tokens=1), job("word " * 400, tokens=1)
        busy = engine.meter.busy_seconds
        results = arriving_together(engine, [short, long])
        spent = engine.meter.busy_seconds - busy
        assert sum(r.gpu_seconds for r in results) == pytest.approx(spent, rel=1e-9)
        share = results[0].prompt_tokens / (results[0].prompt_tokens + results[1].prompt_tokens)
        assert results[0].gpu_seconds == pytest.approx(spent * share, rel=1e-6)

    def test_a_request_cancelled_while_waiting_is_never_prefilled(self, engine):
        jobs = [job("first"), job("gone before its turn"), job("third")]
        passes, rows = engine.prefill_batches, engine.prefill_rows
        results = arriving_together(engine, jobs, [Sink(), Sink(stop_after=0), Sink()])
        assert results[1].done_reason == "cancelled" and results[1].gpu_seconds == 0
        assert [r.done_reason for r in (results[0], results[2])] == ["length", "length"]
        assert (engine.prefill_batches - passes, engine.prefill_rows - rows) == (1, 2)


class TestMetering:
    def test_billed_adds_up_to_busy_time(self, engine):
        busy, billed = engine.meter.busy_seconds, engine.meter.billed_seconds
        jobs = [job(**spec) for spec in JOBS]
        results = run_together(engine, jobs, [Sink() for _ in jobs])
        spent = engine.meter.busy_seconds - busy
        assert sum(r.gpu_seconds for r in results) == pytest.approx(spent, rel=0.01)
        assert engine.meter.billed_seconds - billed == pytest.approx(spent, rel=1e-9)
        assert all(r.gpu_seconds > 0 for r in results)

    def test_a_request_in_a_batch_costs_less_than_its_wall_time(self, engine):
        jobs = [job("same length prompt here", tokens=60) for _ in range(4)]
        results = run_together(engine, jobs, [Sink() for _ in jobs])
        for r in results:
            assert r.gpu_seconds < r.prompt_eval_seconds + r.eval_seconds


class TestLimits:
    def test_prompt_past_the_context_window_names_the_limit(self, engine):
        with pytest.raises(InvalidRequest, match="context window is 8192 tokens"):
            engine.generate(job("word " * 9000, images=[png()]), Sink())

    def test_answer_is_capped_by_the_context_window(self, engine):
        per_word = len(engine.processor.tokenizer("word ", add_special_tokens=False).input_ids)
        long_prompt = "word " * (8100 // per_word)
        result = engine.generate(job(long_prompt, tokens=1000), Sink())
        assert result.prompt_tokens + result.output_tokens <= engine.context_window
        assert result.done_reason == "length"


class TestEndOfTurn:
    def test_an_end_of_turn_token_stops_the_answer(self, models_dir):
        engine = TransformersLlava("llava-llama3", models_dir / "llava-llama3", device="cpu")
        try:
            # Make every token an end-of-turn token: the first one must end the answer.
            engine.eos_ids = set(range(engine.config.text_config.vocab_size))
            result = engine.generate(job("stop here", tokens=5), Sink())
            assert result.done_reason == "stop"
            assert result.output_tokens == 1
        finally:
            engine.close()


class TestKeepAlive:
    @pytest.mark.parametrize("decode", DECODES)
    def test_the_operators_keep_alive_zero_unloads_and_the_next_request_reloads(
        self, models_dir, decode
    ):
        engine = TransformersLlava(
            "llava-llama3", models_dir / "llava-llama3", device="cpu", decode=decode, keep_alive=0
        )
        try:
            first = engine.generate(job("hi", tokens=2), Sink())
            assert first.load_seconds == 0  # loaded at start, not for this request
            deadline = time.monotonic() + 10
            while engine.status()["loaded"]:
                assert time.monotonic() < deadline, "the model was not unloaded"
                time.sleep(0.05)
            busy = engine.meter.busy_seconds
            second = engine.generate(job("hi", tokens=2), Sink())
            assert second.load_seconds > 0
            assert engine.status()["loaded"]
            # Loading is reported, never billed: only the request's own steps were metered.
            assert engine.meter.busy_seconds - busy == pytest.approx(second.gpu_seconds)
        finally:
            engine.close()

    @pytest.mark.parametrize(
        "operator, asked, stays",
        [
            (-1.0, 0.0, None),  # resident for good: no tenant unloads it
            (-1.0, 600.0, None),
            (300.0, 0.0, 300.0),  # a tenant cannot unload it sooner...
            (300.0, 600.0, 600.0),  # ...may keep it longer...
            (300.0, -1.0, 300.0),  # ...but not for good
        ],
    )
    def test_a_requests_keep_alive_is_a_hint_within_the_operators(self, operator, asked, stays):
        assert idle_time(operator, asked) == (-1.0 if stays is None else stays)
        assert idle_time(operator, None) == operator


class TestSlotDecode:
    def test_slots_decode_exactly_what_the_growing_cache_decodes(self, models_dir):
        """Alone and batched (rows joining and leaving at different lengths, so slots move
        down), greedy and seeded sampling: the same text token for token."""
        texts = {}
        for decode in DECODES:
            engine = TransformersLlava(
                "llava-llama3", models_dir / "llava-llama3", device="cpu", decode=decode
            )
            try:
                jobs = [job(**spec) for spec in JOBS]
                alone = [text for _, text in one_by_one(engine, jobs)]
                sinks = [Sink() for _ in jobs]
                run_together(engine, jobs, sinks)
                texts[decode] = (alone, [sink.text for sink in sinks])
                expected = FixedCache if decode == "fixed" else object
                assert isinstance(engine._batch, expected)
            finally:
                engine.close()
        assert texts["fixed"] == texts["dynamic"]
        assert all(texts["fixed"][0]), "every request should have produced text"

    def test_a_rope_that_changes_with_length_keeps_the_growing_cache(self, models_dir):
        engine = TransformersLlava(
            "llava-llama3", models_dir / "llava-llama3", device="cpu", decode="dynamic"
        )
        try:
            config = engine.model.model.language_model.config
            config.rope_parameters = {**config.rope_parameters, "rope_type": "dynamic"}
            with pytest.raises(Unsupported, match="rope type 'dynamic'"):
                FixedCache(engine.model, 2, 512, graphs=False)
        finally:
            engine.close()

    def test_the_cache_is_the_size_it_is_said_to_be_before_it_is_made(self, models_dir):
        engine = TransformersLlava(
            "llava-llama3", models_dir / "llava-llama3", device="cpu", decode="fixed"
        )
        try:
            batch = engine._batch
            expected = FixedCache.bytes_for(engine.model, engine.max_batch, engine.context_window)
            assert batch.cache_bytes == expected > 0
        finally:
            engine.close()

    def test_an_unknown_decode_is_refused_by_name(self, models_dir):
        with pytest.raises(ValueError, match="decode must be auto, fixed or dynamic"):
            TransformersLlava("llava-llama3", models_dir / "llava-llama3", decode="fast")
