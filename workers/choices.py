"""A chat job's n answers (OpenAI's `n`): each one a request of its own to the engine, all at
once, so that the engine batches them like any concurrent requests; engine-agnostic.

Answer i samples with seed + i (the job's seed given), so that a seed gives the same n
answers again, and streams its text as choice i. The job is billed as one request: its
device time is its answers' together, its prompt counted once and every answer's tokens.
"""

from concurrent.futures import ThreadPoolExecutor

from workers.contract import ChatJob, TokenLogprob
from workers.engines.base import ChatEngine, Generation

SEEDS = 2**63


class ChoiceSink:
    """One answer's stream: the job's, its chunks marked with the answer's index."""

    def __init__(self, channel, choice: int):
        self.channel, self.choice = channel, choice

    def token(self, text: str, logprobs: list[TokenLogprob] | None = None) -> None:
        self.channel.token(text, logprobs=logprobs, choice=self.choice)

    def should_stop(self) -> bool:
        return self.channel.should_stop()


def answer(job: ChatJob, choice: int) -> ChatJob:
    """The job of the job's answer `choice`."""
    options = job.options
    seed = None if options.seed is None else (options.seed + choice) % SEEDS
    return job.model_copy(
        update={
            "request_id": f"{job.request_id}.{choice}",
            "options": options.model_copy(update={"seed": seed}),
            "n": 1,
        }
    )


def generate(engine: ChatEngine, job: ChatJob, channel) -> Generation:
    """The job's answers, streamed on `channel` (a TokenSink that takes `choice`)."""
    if job.n == 1:
        return engine.generate(job, channel)
    with ThreadPoolExecutor(job.n, thread_name_prefix=f"choices-{job.request_id}") as pool:
        running = [
            pool.submit(engine.generate, answer(job, i), ChoiceSink(channel, i))
            for i in range(job.n)
        ]
        answers = [future.result() for future in running]
    first = answers[0]
    return Generation(
        done_reason=first.done_reason,
        prompt_tokens=first.prompt_tokens,
        output_tokens=sum(a.output_tokens for a in answers),
        prompt_eval_seconds=max(a.prompt_eval_seconds for a in answers),
        eval_seconds=max(a.eval_seconds for a in answers),
        gpu_seconds=sum(a.gpu_seconds for a in answers),
        load_seconds=max(a.load_seconds for a in answers),
        choices=tuple(a.done_reason for a in answers),
    )
