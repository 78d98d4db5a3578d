"""Structured output in the transformers engine, on the tiny model: under a JSON schema every
answer validates, whatever the seed, alone or batched beside unconstrained rows, with both
decode batches; a schema the grammar cannot take is the request's fault."""

import json

import jsonschema
import pytest

from tests.person_schema import PERSON
from tests.workers.test_engine import Sink, job, one_by_one, run_together
from workers.contract import OutputFormat
from workers.engines.base import InvalidRequest


def constrained(schema: dict | None, seed: int, temperature: float = 1.0, tokens: int = 200):
    made = job("describe a person as JSON", tokens=tokens, temperature=temperature, seed=seed)
    fmt = (
        OutputFormat(kind="json_schema", schema_text=json.dumps(schema))
        if schema is not None
        else OutputFormat(kind="json")
    )
    return made.model_copy(update={"output_format": fmt})


def test_every_answer_validates_whatever_the_seed(engine):
    for seed in range(12):
        sink = Sink()
        result = engine.generate(constrained(PERSON, seed), sink)
        assert result.done_reason == "stop", (seed, sink.text)
        jsonschema.validate(
            json.loads(sink.text), PERSON, format_checker=jsonschema.FormatChecker()
        )


def test_batched_beside_free_rows_each_row_gives_what_it_gives_alone(engine):
    jobs = [
        constrained(PERSON, 1),
        job("hello there", tokens=30),
        constrained(PERSON, 2, temperature=0.0),
        job("short", tokens=9, temperature=1.2, seed=99),
        constrained(PERSON, 3),
    ]
    alone = one_by_one(engine, jobs)
    sinks = [Sink() for _ in jobs]
    together = run_together(engine, jobs, sinks)
    for (single, text), batched, sink, made in zip(alone, together, sinks, jobs, strict=True):
        assert sink.text == text
        assert batched.output_tokens == single.output_tokens
        if made.output_format is not None:
            jsonschema.validate(json.loads(text), PERSON)
        else:  # the unconstrained rows still cannot end (the tiny model's stop is suppressed)
            assert batched.done_reason == "length"


def test_a_json_object_is_an_object_as_far_as_it_went(engine):
    for seed in range(4):
        sink = Sink()
        result = engine.generate(constrained(None, seed, tokens=40), sink)
        assert sink.text.startswith("{")
        if result.done_reason == "stop":
            assert isinstance(json.loads(sink.text), dict)


def test_a_schema_the_grammar_cannot_take_is_refused_by_field(engine):
    broken = constrained(PERSON, 0).model_copy(
        update={
            "output_format": OutputFormat(
                kind="json_schema",
                schema_text=json.dumps({"$ref": "#/$defs/Missing"}),
                field="response_format.json_schema.schema",
            )
        }
    )
    with pytest.raises(InvalidRequest) as refused:
        engine.generate(broken, Sink())
    message = str(refused.value)
    assert message.startswith("field 'response_format.json_schema.schema': the JSON schema")
    assert "Missing" in message and "/project/" not in message
