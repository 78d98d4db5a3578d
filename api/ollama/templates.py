"""Ollama's `template` on /api/generate: the prompt template of a request, in the part of Go's
text/template syntax that a generate prompt needs.

Taken: text; `{{ .System }}`, `{{ .Prompt }}` and `{{ .Response }}`; `{{ if .Field }}`,
`{{ else if .Field }}`, `{{ else }}`, `{{ end }}` (a field is true when it is not empty);
comments `{{/* ... */}}`; and `{{-` / `-}}`, which trim the white space before or after an
action. Anything else (`range`, functions, pipelines, variables) is refused by name. As in
Ollama, the prompt ends where `{{ .Response }}` is: the model writes the response.
"""

import re

from api.errors import BadRequest

ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.DOTALL)
FIELDS = ("System", "Prompt", "Response")
FIELD = re.compile(r"\.(\w+)")
TAKEN = "{{ .System }}, {{ .Prompt }}, {{ .Response }}, if / else if / else / end, comments"


class _Response(Exception):
    """Rendering reached {{ .Response }}: the prompt ends there."""


def _malformed(what: str) -> BadRequest:
    return BadRequest(f"field 'template': {what}", param="template")


def _refuse(what: str) -> BadRequest:
    return BadRequest(
        f"field 'template': {what} is not supported (taken: {TAKEN})", param="template"
    )


def _tokens(template: str) -> list[tuple[str, str]]:
    """("text", text) and ("action", body) in order, white space trimmed where asked."""
    tokens: list[tuple[str, str]] = []
    at, trim_next = 0, False
    for match in ACTION.finditer(template):
        text = template[at : match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        tokens.append(("text", text))
        tokens.append(("action", match.group(2)))
        at, trim_next = match.end(), bool(match.group(3))
    rest = template[at:]
    tokens.append(("text", rest.lstrip() if trim_next else rest))
    if "{{" in rest:
        raise _malformed("an action that is not closed ('{{' without '}}')")
    return tokens


def _field(expression: str) -> str:
    found = FIELD.fullmatch(expression)
    if found is None:
        raise _refuse(f"'{{{{ {expression} }}}}'")
    if found.group(1) not in FIELDS:
        raise _refuse(f"the field '.{found.group(1)}'")
    return found.group(1)


def render(template: str, system: str, prompt: str) -> str:
    """The prompt `template` makes of `system` and `prompt`, up to `{{ .Response }}`; the
    whole template is checked first."""
    tokens = _tokens(template)
    _render(tokens, {"System": "", "Prompt": "", "Response": ""}, stop=False)
    return _render(tokens, {"System": system, "Prompt": prompt, "Response": ""}, stop=True)


def _render(tokens: list[tuple[str, str]], values: dict[str, str], stop: bool) -> str:
    out: list[str] = []
    # each open `if`: (whether its output is on, whether a branch of it was taken)
    stack: list[tuple[bool, bool]] = []

    def on() -> bool:
        return all(shown for shown, _ in stack)

    try:
        for kind, body in tokens:
            if kind == "text":
                if on():
                    out.append(body)
            elif body.startswith("/*") and body.endswith("*/"):
                continue
            elif body.startswith("if "):
                taken = bool(values[_field(body[3:].strip())])
                stack.append((taken, taken))
            elif body.startswith("else if "):
                if not stack:
                    raise _malformed("'else if' outside an 'if'")
                _, before = stack.pop()
                taken = not before and bool(values[_field(body[8:].strip())])
                stack.append((taken, before or taken))
            elif body == "else":
                if not stack:
                    raise _malformed("'else' outside an 'if'")
                _, before = stack.pop()
                stack.append((not before, True))
            elif body == "end":
                if not stack:
                    raise _malformed("'end' without an 'if'")
                stack.pop()
            else:
                name = _field(body)
                if on():
                    if name == "Response" and stop:
                        raise _Response
                    out.append(values[name])
    except _Response:
        return "".join(out)
    if stack:
        raise _malformed("an 'if' without its 'end'")
    return "".join(out)
