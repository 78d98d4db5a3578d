"""Ollama's `template` (api.ollama.templates): the part of Go's text/template syntax a
generate prompt needs, and a clear refusal of the rest."""

import pytest

from api.errors import BadRequest
from api.ollama.templates import render

LLAMA3 = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
    "{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}"
    "<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{{ .Response }}<|eot_id|>"
)


@pytest.mark.parametrize(
    "template, system, expected",
    [
        (
            LLAMA3,
            "",
            "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        (
            LLAMA3,
            "be brief",
            "<|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        ("{{- /* a comment */ -}}\n  A: {{ .Prompt -}}  \n B:", "", "A: hiB:"),
        ("{{ if .System }}S{{ else if .Prompt }}P{{ else }}N{{ end }}", "", "P"),
        ("{{ if .System }}S{{ else if .Prompt }}P{{ else }}N{{ end }}", "x", "S"),
        ("{{ if .Response }}R{{ else }}none{{ end }}!", "", "none!"),
        ("no actions at all", "", "no actions at all"),
    ],
)
def test_what_a_template_makes(template, system, expected):
    assert render(template, system, "hi") == expected


@pytest.mark.parametrize(
    "template, message",
    [
        (
            "{{ range .Messages }}{{ .Content }}{{ end }}",
            "'{{ range .Messages }}' is not supported",
        ),
        ("{{ .Tools }}", "the field '.Tools' is not supported"),
        ("{{ json .Prompt }}", "'{{ json .Prompt }}' is not supported"),
        ("{{ if .System }}S", "an 'if' without its 'end'"),
        ("S{{ end }}", "'end' without an 'if'"),
        ("{{ else }}", "'else' outside an 'if'"),
        ("{{ .Prompt }}{{ .Response }}{{ if .System }}", "an 'if' without its 'end'"),
        ("{{ .Prompt", "an action that is not closed"),
    ],
)
def test_what_it_cannot_take_is_refused_by_name(template, message):
    with pytest.raises(BadRequest) as caught:
        render(template, "", "hi")
    assert caught.value.param == "template"
    assert message in caught.value.message
