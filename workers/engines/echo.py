"""A no-op chat engine: it answers at once, repeating the last user message's first words, and
uses no device. For measuring what the rest of the service costs (gateway, queue, worker,
ledger) apart from any model: `GPUHOST_ENGINE=echo` (bench/gateway.py). Never for tenants:
its GPU-seconds are zero."""

import time

from workers.contract import ChatJob
from workers.engines.base import Generation, TokenSink

WORDS = 4


class EchoEngine:
    context_window = 8192

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.load_seconds = 0.0
        self.served = 0

    def generate(self, job: ChatJob, sink: TokenSink) -> Generation:
        started = time.perf_counter()
        last = next((t.content for t in reversed(job.messages) if t.role == "user"), "")
        words = last.split()[:WORDS] or ["ok"]
        limit = job.options.max_tokens or len(words)
        for word in words[:limit]:
            sink.token(word + " ")
        self.served += 1
        return Generation(
            done_reason="stop",
            prompt_tokens=len(last.split()),
            output_tokens=min(len(words), limit),
            prompt_eval_seconds=0.0,
            eval_seconds=time.perf_counter() - started,
            gpu_seconds=0.0,
        )

    def active(self) -> int:
        return 0

    def status(self) -> dict:
        return {
            "model": self.model_name,
            "loaded": True,
            "expires_at": None,
            "parameters": 0,
            "size_bytes": 0,
            "device": "none",
            "dtype": "none",
            "context_length": self.context_window,
            "load_seconds": 0.0,
            "busy_seconds": 0.0,
            "billed_seconds": 0.0,
            "active": 0,
        }

    def close(self) -> None:
        pass
