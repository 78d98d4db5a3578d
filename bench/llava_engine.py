"""LLaVA engine throughput and metering overhead at 1, 2, 4, 8 concurrent streams.

    python bench/llava_engine.py                      # tiny random-weight model, CPU
    python bench/llava_engine.py --model DIR --device cuda --tokens 256 --image

Runs the engine the workers use (continuous batching, per-request metering) in process.
Reports, per concurrency: aggregate decode tokens/s, per-stream tokens/s, mean batch
occupancy, and the share of busy time spent in metering (goal < 1 %). With --image every
request carries one 336x336 picture (576 image tokens to prefill, as LLaVA's real requests do).
"""

import argparse
import base64
import io
import json
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

from harness.jobs import chat_job  # noqa: E402
from workers.contract import ChatJob
from workers.engines.llava_transformers import TransformersLlava
from workers.metering import Meter


class TimedMeter(Meter):
    """A Meter that also counts the time spent in itself."""

    def __init__(self) -> None:
        super().__init__()
        self.own_seconds = 0.0

    def charge(self, seconds, work) -> None:
        started = time.perf_counter()
        super().charge(seconds, work)
        self.own_seconds += time.perf_counter() - started

    def open(self, account) -> None:
        started = time.perf_counter()
        super().open(account)
        self.own_seconds += time.perf_counter() - started

    def close(self, account) -> float:
        started = time.perf_counter()
        billed = super().close(account)
        self.own_seconds += time.perf_counter() - started
        return billed


class Sink:
    """Notes when the first token reached it (time to first token, from arrival)."""

    def __init__(self) -> None:
        self.first_at: float | None = None

    def token(self, text: str) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()

    def should_stop(self) -> bool:
        return False


def picture(seed: int) -> str:
    """A 336x336 PNG of noise, base64: a different image for every request."""
    buffer = io.BytesIO()
    Image.effect_noise((336, 336), 40 + seed).convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def job(tokens: int, i: int, image: bool = False) -> ChatJob:
    text = f"Request {i}: describe this picture at length."
    return chat_job(text, tokens, 0.8, i, [picture(i)] if image else [])


def run(engine: TransformersLlava, streams: int, tokens: int, image: bool = False) -> dict:
    results = [None] * streams
    jobs = [job(tokens, i, image) for i in range(streams)]
    sinks = [Sink() for _ in range(streams)]

    def one(i: int) -> None:
        results[i] = engine.generate(jobs[i], sinks[i])

    meter: TimedMeter = engine.meter
    busy0, own0 = meter.busy_seconds, meter.own_seconds
    steps0, decoded0 = engine.decode_steps, engine.decode_tokens
    prefills0 = engine.prefill_batches
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    produced = sum(r.output_tokens for r in results)
    busy = meter.busy_seconds - busy0
    first = sorted(s.first_at - started for s in sinks)
    return {
        "streams": streams,
        "image_per_request": image,
        "tokens_per_stream": tokens,
        "wall_seconds": round(wall, 3),
        "aggregate_tokens_per_second": round(produced / wall, 1),
        "per_stream_tokens_per_second": round(produced / wall / streams, 1),
        "prompt_tokens": results[0].prompt_tokens,
        "mean_prefill_seconds": round(sum(r.prompt_eval_seconds for r in results) / streams, 4),
        # from arrival (all arrive together): the median and the last request's
        "first_token_p50_seconds": round(first[(streams - 1) // 2], 4),
        "first_token_last_seconds": round(first[-1], 4),
        "prefill_batches": engine.prefill_batches - prefills0,
        "decode_tokens_per_second_per_stream": round(
            sum(r.output_tokens / r.eval_seconds for r in results) / streams, 1
        ),
        "mean_batch": round(
            (engine.decode_tokens - decoded0) / max(1, engine.decode_steps - steps0), 2
        ),
        "billed_over_busy": round(sum(r.gpu_seconds for r in results) / busy, 6),
        "metering_share_of_busy_percent": round(100 * (meter.own_seconds - own0) / busy, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="LLaVA weights (default: make tiny ones)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--image", action="store_true", help="one image with every request")
    parser.add_argument(
        "--decode", default="auto", choices=("auto", "fixed", "dynamic"), help="decode batch"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            from workers.tiny import make_llava

            model = make_llava(Path(scratch) / "llava-llama3")
        concurrency = [int(n) for n in args.streams.split(",")]
        engine = TransformersLlava(
            "llava-llama3",
            model,
            device=args.device,
            max_batch=max(concurrency),
            decode=args.decode,
        )
        engine.meter = TimedMeter()
        try:
            run(engine, 1, 8, args.image)  # warm-up
            for streams in concurrency:
                print(json.dumps(run(engine, streams, args.tokens, args.image)), flush=True)
        finally:
            engine.close()


if __name__ == "__main__":
    main()
