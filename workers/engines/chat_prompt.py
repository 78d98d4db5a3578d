"""A chat job's prompt, in the model's own chat template, for both LLaVA engines: the tools it
offers shown by the template when the template takes them (its `tools` variable, as Llama
3.1's does), else by a system turn of ours (`FALLBACK`), asking for Llama 3.1's JSON call
form, which api/inputs/tools.py reads back."""

import functools
import json
import re

from workers.contract import ChatJob, ToolSpec
from workers.engines.base import InvalidRequest

FALLBACK = (
    "You can call these functions. To call one, answer with nothing but a JSON object "
    '{{"name": <the function\'s name>, "parameters": <its arguments, as its schema says>}}; '
    "otherwise answer as usual.\n\n{tools}"
)


def tool_list(tools: list[ToolSpec]) -> list[dict]:
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": json.loads(tool.parameters),
            },
        }
        for tool in tools
    ]


# Put after the first character of a special token's text found in a message, so that the
# tokenizer reads it as text: a zero-width space, which a reader does not see.
BREAK = "\u200b"


def prompt_text(processor, conversation: list[dict], job: ChatJob) -> str:
    """The job's prompt: its text as given when it is raw (Ollama's raw, /v1/completions),
    else its turns (`conversation`) in the chat template, with its tools. A message's text is
    data, never markup: a special token's text in it (`<image>`, `<|eot_id|>`) stays text
    (`as_text`). A raw prompt is the model's whole input, special tokens included, but carries
    no image: the image placeholder's text in it is text too."""
    if not job.raw:
        conversation = [
            turn | {"content": _texts(processor, turn["content"])} for turn in conversation
        ]
        text = render(processor, conversation, job.tools)
        return earlier(processor, job.context, text) if job.context else text
    text = job.messages[-1].content
    if not text:
        raise InvalidRequest("the prompt is empty; a raw prompt is the model's whole input")
    image = getattr(processor, "image_token", None)
    return text.replace(image, image[0] + BREAK + image[1:]) if image else text


def as_text(processor, text: str) -> str:
    """`text` with every special token's text in it broken (BREAK after its first character),
    so that the tokenizer reads it as the characters it is."""
    pattern = _special_texts(getattr(processor, "tokenizer", processor))
    return pattern.sub(lambda found: found[0][0] + BREAK + found[0][1:], text) if pattern else text


@functools.cache
def _special_texts(tokenizer) -> re.Pattern | None:
    """A pattern of the texts the tokenizer reads as special tokens (its added tokens)."""
    texts = sorted(getattr(tokenizer, "added_tokens_encoder", {}), key=len, reverse=True)
    texts = [text for text in texts if len(text) > 1]
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def _texts(processor, content):
    """A turn's content (a string, or parts) with its texts `as_text`."""
    if isinstance(content, str):
        return as_text(processor, content)
    return [
        part | {"text": as_text(processor, part["text"])} if part.get("type") == "text" else part
        for part in content
    ]


def earlier(processor, context: list[int], prompt: str) -> str:
    """`prompt` after the text of an earlier exchange's token ids (Ollama's `context`, as
    Ollama itself puts it back), the prompt's own beginning-of-text token dropped."""
    tokenizer = getattr(processor, "tokenizer", processor)
    vocabulary = len(tokenizer)
    wrong = next((token for token in context if not 0 <= token < vocabulary), None)
    if wrong is not None:
        raise InvalidRequest(
            f"field 'context': {wrong} is not a token of this model (0-{vocabulary - 1}); "
            "send back the context a response of this model gave"
        )
    text = tokenizer.decode(context, skip_special_tokens=False)
    return text + prompt.removeprefix(tokenizer.bos_token or "")


def context_ids(processor, ids: list[int]) -> tuple[int, ...]:
    """Token ids to give back as `context`: an image's placeholder tokens left out (its pixels
    do not come back with them)."""
    image = getattr(processor, "image_token_id", None)
    return tuple(token for token in ids if token != image)


def render(processor, conversation: list[dict], tools: list[ToolSpec]) -> str:
    """The prompt text, ready for the model's next (assistant) turn. `conversation`: the
    turns as the template takes them (content a string, or a list of parts)."""
    if tools:
        template = getattr(processor, "chat_template", None) or ""
        if "tools" in template or "tools" in (_tokenizer_template(processor) or ""):
            return processor.apply_chat_template(
                conversation, tools=tool_list(tools), add_generation_prompt=True, tokenize=False
            )
        text = FALLBACK.format(tools=json.dumps([t["function"] for t in tool_list(tools)]))
        parts = isinstance(conversation[0]["content"], list)
        content = [{"type": "text", "text": text}] if parts else text
        conversation = [{"role": "system", "content": content}, *conversation]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def _tokenizer_template(processor) -> str | None:
    tokenizer = getattr(processor, "tokenizer", None)
    return getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
