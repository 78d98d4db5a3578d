"""Tokens' log probabilities (workers.contract.TokenLogprob) in OpenAI's two shapes: chat
completions' `logprobs.content` and legacy completions' parallel lists."""

from workers.contract import TokenLogprob


def chat_logprobs(scored: list[TokenLogprob]) -> dict:
    """Chat completions' `logprobs`: each token with its likeliest alternatives."""

    def one(entry) -> dict:
        return {"token": entry.token, "logprob": entry.logprob, "bytes": entry.bytes}

    return {
        "content": [one(e) | {"top_logprobs": [one(t) for t in e.top]} for e in scored],
        "refusal": None,
    }


def completion_logprobs(scored: list[TokenLogprob], start: int) -> dict:
    """Legacy completions' `logprobs`, its tokens' text starting at character `start`."""
    offsets, at = [], start
    for entry in scored:
        offsets.append(at)
        at += len(entry.token)
    return {
        "tokens": [e.token for e in scored],
        "token_logprobs": [e.logprob for e in scored],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in scored],
        "text_offset": offsets,
    }
