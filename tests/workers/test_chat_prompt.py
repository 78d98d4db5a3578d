"""A chat job's prompt with tools: the model's template shows them when it takes a `tools`
variable; the tiny LLaVA's does not, so the fallback system turn does."""

import json

from transformers import AutoProcessor

from workers.contract import ToolSpec
from workers.engines.chat_prompt import render

TOOL = ToolSpec(
    name="get_time",
    description="The time now",
    parameters=json.dumps({"type": "object", "properties": {"zone": {"type": "string"}}}),
)
TURNS = [{"role": "user", "content": [{"type": "text", "text": "What time is it?"}]}]


def test_without_tools_support_the_fallback_turn_shows_them(models_dir):
    processor = AutoProcessor.from_pretrained(models_dir / "llava-llama3")
    plain = render(processor, TURNS, [])
    prompt = render(processor, TURNS, [TOOL])
    assert "get_time" not in plain
    assert prompt.endswith(plain.removeprefix(processor.tokenizer.bos_token))
    assert '"name": <the function\'s name>, "parameters"' in prompt
    assert '"name": "get_time", "description": "The time now"' in prompt
    assert prompt.index("system") < prompt.index("What time is it?")


def test_a_template_that_takes_tools_shows_them_itself(models_dir):
    processor = AutoProcessor.from_pretrained(models_dir / "llava-llama3")
    processor.chat_template = (
        "{% for t in tools %}TOOL {{ t['function']['name'] }}: "
        "{{ t['function']['parameters'] | tojson }}\n{% endfor %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'][0]['text'] }}\n{% endfor %}"
    )
    prompt = render(processor, TURNS, [TOOL])
    assert prompt.startswith('TOOL get_time: {"type": "object"')
    assert "call one, answer with nothing but" not in prompt
