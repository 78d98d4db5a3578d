"""What a grammar, or log probabilities, cost a decode: the same streams with and without.

    python bench/structured_output.py                        # tiny random-weight model, CPU
    python bench/structured_output.py --model DIR --device cuda --streams 1 8

Runs the engine the workers use in process. Per concurrency, runs of the same number of
streams: all free (no schema), all constrained (a schema whose answers are about as long as
the free ones' budget), half and half (each row of a batch with its own constraint or none),
and all scored (log probabilities with `--logprobs` alternatives each, OpenAI's
top_logprobs). Reports decode tokens/s over all streams and the constrained (or scored)
rows' mean time per token (`ms_per_token_with`). The free rows' figure in the mixed run says
what a constrained neighbour costs them.
"""

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from harness.jobs import chat_job  # noqa: E402
from workers.contract import ChatJob, OutputFormat, SamplingOptions
from workers.engines.llava_transformers import TransformersLlava

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "count": {"type": "integer", "minimum": 0, "maximum": 999},
                    "ok": {"type": "boolean"},
                },
                "required": ["name", "count", "ok"],
                "additionalProperties": False,
            },
            "minItems": 4,
            "maxItems": 4,
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}


class Sink:
    def __init__(self):
        self.tokens = 0

    def token(self, text: str, logprobs=None) -> None:
        self.tokens += 1

    def should_stop(self) -> bool:
        return False


def job(constrained: bool, tokens: int, seed: int, logprobs: int | None = None) -> ChatJob:
    fmt = OutputFormat(kind="json_schema", schema_text=json.dumps(SCHEMA)) if constrained else None
    options = SamplingOptions(max_tokens=tokens, temperature=1.0, seed=seed, logprobs=logprobs)
    return chat_job(
        "List four things as JSON.",
        options=options,
        output_format=fmt,
    )


def run(engine, jobs: list[ChatJob]) -> dict:
    results = [None] * len(jobs)

    def one(i):
        results[i] = engine.generate(jobs[i], Sink())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    per_token = {True: [], False: []}
    for made, result in zip(jobs, results, strict=True):
        special = made.output_format is not None or made.options.logprobs is not None
        per_token[special].append(result.eval_seconds / max(1, result.output_tokens - 1))
    return {
        "tokens_per_second": round(sum(r.output_tokens for r in results) / wall, 1),
        "ms_per_token_with": _mean_ms(per_token[True]),  # the constrained or scored rows
        "ms_per_token_free": _mean_ms(per_token[False]),
    }


def _mean_ms(values: list[float]) -> float | None:
    return round(1000 * sum(values) / len(values), 3) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="LLaVA weights (default: tiny, made now)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tokens", type=int, default=120, help="free rows' budget")
    parser.add_argument("--logprobs", type=int, default=5, help="scored rows' alternatives")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = args.model
        if path is None:
            from workers.tiny import make_llava

            path = make_llava(Path(scratch) / "llava")
        engine = TransformersLlava("llava-llama3", path, device=args.device, max_batch=8)
        try:
            run(engine, [job(True, args.tokens, 0), job(False, 8, 0)])  # warm-up
            for streams in args.streams:
                half = streams // 2
                for label, flags in (
                    ("free", [False] * streams),
                    ("constrained", [True] * streams),
                    ("mixed", [True] * half + [False] * (streams - half)),
                ):
                    made = [job(c, 400 if c else args.tokens, s) for s, c in enumerate(flags)]
                    print(json.dumps({"streams": streams, "rows": label} | run(engine, made)))
                scored = [job(False, args.tokens, s, args.logprobs) for s in range(streams)]
                print(json.dumps({"streams": streams, "rows": "scored"} | run(engine, scored)))
        finally:
            engine.close()


if __name__ == "__main__":
    main()
