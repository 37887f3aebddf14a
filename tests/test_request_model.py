"""The request models are the one source of validation and documentation: every spelling a
model reads is documented and every documented field is read, ``null`` means "not set", and a
refusal names the field as the client spelled it, in the Kobold ``{field: [messages]}`` shape."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import AliasChoices

from kobold_api.api.docs import ROUTES, openapi_document
from kobold_api.api.errors import ValidationError
from kobold_api.api.request_model import RequestModel

#: The smallest body each model accepts (its required fields).
MINIMAL: dict[str, dict[str, Any]] = {
    "KoboldGenerateBody": {"prompt": "hi"},
    "ChatCompletionBody": {"messages": [{"role": "user", "content": "hi"}]},
    "CompletionBody": {"prompt": "hi"},
    "RenameBody": {"title": "A title"},
    "MessageEditBody": {"text": "edited"},
    "JsonToGrammarBody": {"schema": {"type": "object"}},
}
BODY_MODELS = sorted({route.body for route in ROUTES if isinstance(route.body, type)}, key=lambda m: m.__name__)


def spellings(model: type[RequestModel]) -> set[str]:
    """Every key ``model`` reads."""
    names = set()
    for name, field in model.model_fields.items():
        alias = field.validation_alias
        names.update(alias.choices if isinstance(alias, AliasChoices) else [alias or name])  # type: ignore[list-item]
    return names


def documented_body(path: str, method: str) -> dict[str, Any]:
    operation = openapi_document()["paths"][path][method]
    return operation["requestBody"]["content"]["application/json"]["schema"]


@pytest.mark.parametrize("model", BODY_MODELS, ids=lambda m: m.__name__)
def test_every_spelling_read_is_documented_and_nothing_else(model: type[RequestModel]) -> None:
    route = next(route for route in ROUTES if route.body is model)
    documented = set(documented_body(route.path, route.method)["properties"])
    assert documented == spellings(model)


@pytest.mark.parametrize("model", BODY_MODELS, ids=lambda m: m.__name__)
def test_null_is_the_same_as_absent(model: type[RequestModel]) -> None:
    base = MINIMAL.get(model.__name__, {})
    expected = model.parse(base)
    for name in sorted(spellings(model) - set(base)):
        assert model.parse({**base, name: None}) == expected, name


def test_generation_options_are_documented_once_for_every_family() -> None:
    # The shared options have the same schema on the Kobold, OpenAI and chat bodies.
    kobold = documented_body("/api/v1/generate", "post")["properties"]
    for path in ("/v1/completions", "/v1/chat/completions", "/api/v1/chat"):
        other = documented_body(path, "post")["properties"]
        for name in ("temperature", "top_p", "rep_pen", "repetition_penalty", "sampler_order", "stop",
                     "stop_sequence", "banned_tokens", "dry_base", "logit_bias", "custom_token_bans"):
            assert other[name] == kobold[name], (path, name)


@pytest.mark.parametrize("body, errors", [
    ({"max_length": 0}, {"max_length": ["Must be greater than or equal to 1."]}),
    ({"max_new_tokens": "many"}, {"max_new_tokens": ["Not a valid integer."]}),
    ({"temperature": -1, "typical_p": 3}, {"temperature": ["Must be greater than or equal to 0.0."],
                                           "typical_p": ["Must be less than or equal to 1.0."]}),
    ({"rep_pen": "x"}, {"rep_pen": ["Not a valid number."]}),
    ({"stop_sequence": 5}, {"stop_sequence": ["Not a valid list of strings."]}),
])
def test_a_refusal_names_the_field_as_the_client_spelled_it(body: dict[str, Any],
                                                             errors: dict[str, list[str]]) -> None:
    model = next(route.body for route in ROUTES if route.path == "/api/v1/generate")
    with pytest.raises(ValidationError) as refused:
        model.parse({"prompt": "hi", **body})
    assert refused.value.status == 422
    assert refused.value.errors == errors


def test_a_body_that_is_not_an_object_is_refused_as_a_whole() -> None:
    model = next(route.body for route in ROUTES if route.path == "/api/v1/generate")
    for body in ([], "prompt", 3, None):
        with pytest.raises(ValidationError) as refused:
            model.parse(body)
        assert refused.value.status == 422 and refused.value.errors
