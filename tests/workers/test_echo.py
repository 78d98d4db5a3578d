"""The no-op engine the gateway benchmark uses: it answers at once and bills nothing."""

from harness.jobs import chat_job
from workers.contract import ChatTurn, SamplingOptions
from workers.engines.echo import EchoEngine


class Sink:
    def __init__(self):
        self.text = ""

    def token(self, text: str) -> None:
        self.text += text

    def should_stop(self) -> bool:
        return False


def test_echo_repeats_the_first_words_and_uses_no_device():
    turns = [
        ChatTurn(role="user", content="ignored earlier turn"),
        ChatTurn(role="assistant", content="sure"),
        ChatTurn(role="user", content="hello there general kenobi you are a bold one"),
    ]
    job = chat_job(turns, options=SamplingOptions(max_tokens=3))
    sink = Sink()
    done = EchoEngine("llava-llama3").generate(job, sink)
    assert sink.text == "hello there general "
    assert (done.output_tokens, done.gpu_seconds, done.done_reason) == (3, 0.0, "stop")
