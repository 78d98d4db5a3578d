"""A JSON schema for structured-output tests, in both engines' suites: every kind of constraint
a short answer can meet (bounded strings and integers, an enum, an array, a nullable $ref, a
date), so that the tiny random-weight model ends its answer well within its token budget."""

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/Pet"}]},
        "born": {"type": "string", "format": "date"},
    },
    "required": ["name", "age", "colour", "tags", "pet", "born"],
    "additionalProperties": False,
    "$defs": {
        "Pet": {
            "type": "object",
            "properties": {"legs": {"type": "integer", "minimum": 0, "maximum": 8}},
            "required": ["legs"],
            "additionalProperties": False,
        }
    },
}
