"""One request model for every route: pydantic models that validate a body and document it.

Each route family declares its body as a :class:`RequestModel`; the model validates the JSON a
client sent and the OpenAPI document (:mod:`.docs`) is generated from the same class, so the
two cannot drift. Clients are sloppy in known ways (KoboldAI's own examples send ``"False"``
strings, SillyTavern sends stop strings as a JSON-encoded string, older UIs send comma lists,
many send ``null`` for "not set"): the lenient types below take those forms and hand the model
the canonical value, while the document describes the canonical form. Every failure is
reported at once, per field, in marshmallow's words (KoboldAI United's 422 shape).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Mapping, TypeVar

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

from .. import jsontext
from .errors import ApiError, ValidationError

Model = TypeVar("Model", bound="RequestModel")

_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n", ""}


def json_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """Parse a request body as a JSON object whatever the content type says (clients vary)."""
    if not raw.strip():
        return {}
    try:
        body = jsontext.loads(raw)
    except ValueError as exc:
        raise ApiError(400, {"msg": f"Error parsing input: request body is not valid JSON ({exc}).",
                             "type": "bad_input"}) from exc
    if not isinstance(body, dict):
        raise ApiError(400, {"msg": "Error parsing input: the JSON body must be an object.", "type": "bad_input"})
    return body


def _document(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Every spelling of a field documented as a property of its own (pydantic writes only the
    first of ``AliasChoices``), plus the model's cross-field ``SCHEMA_RULES``."""
    properties = schema.get("properties", {})
    for field in model.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names = [choice for choice in alias.choices if isinstance(choice, str)]
            for name in names[1:]:
                properties.setdefault(name, properties.get(names[0], {}))
    rules = getattr(model, "SCHEMA_RULES", ())
    if rules:
        schema["allOf"] = list(rules)


class RequestModel(BaseModel):
    """A request body: unknown keys ignored (as KoboldAI United does since API 1.2.5), ``null``
    read as "not sent", every failure a 422 naming its field."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_document)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @classmethod
    def parse(cls: type[Model], body: Mapping[str, Any]) -> Model:
        """The validated body; raises :class:`ValidationError` (422) listing every bad field."""
        try:
            return cls.model_validate(body)
        except PydanticValidationError as exc:
            raise ValidationError(field_errors(exc)) from None


def field_errors(exc: PydanticValidationError) -> dict[str, list[str]]:
    """pydantic's errors as ``{field: [message]}``, named by the spelling the client used."""
    errors: dict[str, list[str]] = {}
    for error in exc.errors(include_url=False):
        location = error["loc"]
        field = str(location[0]) if location else "body"
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location[1:])
        message = _message(error)
        errors.setdefault(field, []).append(f"{field}{path}: {message}" if path else message)
    return errors


def _message(error: Any) -> str:
    kind, context = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return "Missing data for required field."
    if kind == "greater_than_equal":
        return f"Must be greater than or equal to {context['ge']}."
    if kind == "less_than_equal":
        return f"Must be less than or equal to {context['le']}."
    if kind == "too_short":
        return f"Shorter than minimum length {context.get('min_length')}."
    if kind == "too_long":
        return f"Longer than maximum length {context.get('max_length')}."
    if kind == "string_type":
        return "Not a valid string."
    if kind.startswith("bool"):
        return "Not a valid boolean."
    if kind in ("literal_error", "enum"):
        return f"Must be one of {context.get('expected')}."
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "Must be an object."
    if kind == "list_type":
        return "Must be a list."
    return str(error["msg"])


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("lenient", message)


# --- lenient readers: the forms clients send, to the canonical value ----------------------
def to_bool(value: Any) -> bool:
    """``true``/``false``, 0/1, and the strings KoboldAI's examples send (``"False"``, ``"yes"``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _fail("Not a valid boolean.")


def _number(value: Any, integer: bool) -> float | int | None:
    """A finite number from a number or a numeric string (40.0 counts as an integer)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:  # integers first: float() would round ids and seeds above 2**53
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if integer and isinstance(value, int):
        return value
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if integer:
        return int(value) if float(value) == int(value) else None
    return float(value)


def to_float(value: Any) -> float:
    number = _number(value, integer=False)
    if number is None:
        raise _fail("Not a valid number.")
    return float(number)


def to_int(value: Any) -> int:
    number = _number(value, integer=True)
    if number is None:
        raise _fail("Not a valid integer.")
    return int(number)


def to_string_list(value: Any) -> list[str]:
    """A list of strings, or one string: a JSON-encoded list (as SillyTavern sends) when it
    starts with ``[``, else a single item. Empty items are dropped."""
    if isinstance(value, str):
        stripped = value.strip()
        if not stripped.startswith("["):
            return [value] if value else []
        try:
            value = jsontext.loads(stripped)
        except ValueError:
            raise _fail("Not a valid list of strings.") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _fail("Not a valid list of strings.")
    return [item for item in value if item]


def to_comma_strings(value: Any) -> list[str]:
    """text-generation-webui's old UI form too: ``'"\\nUser:", "###"'`` (quoted items, JSON escapes)."""
    if isinstance(value, str) and not value.strip().startswith("["):
        parts = [_unquote(part.strip()) for part in value.split(",")]
        return [part for part in parts if part]
    return to_string_list(value)


def to_int_list(value: Any) -> list[int]:
    """A list of integers, a JSON-encoded list, or KoboldCpp's ``"1,2,3"``."""
    if isinstance(value, str):
        try:
            value = jsontext.loads(value) if value.strip().startswith("[") else [
                int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise _fail("Not a valid list of integers.") from None
    numbers = [_number(item, integer=True) for item in value] if isinstance(value, list) else [None]
    if any(number is None for number in numbers):
        raise _fail("Not a valid list of integers.")
    return [int(number) for number in numbers]  # type: ignore[arg-type]


def to_token_ids(value: Any) -> list[int]:
    ids = to_int_list(value)
    if any(token_id < 0 for token_id in ids):
        raise _fail("Token ids must be 0 or greater.")
    return ids


def to_token_bias(value: Any) -> dict[int, float]:
    """``{"<token id>": bias}`` (KoboldCpp, OpenAI), each bias clamped to +-100."""
    if not isinstance(value, dict):
        raise _fail("Not a valid mapping of token ids to numbers.")
    bias: dict[int, float] = {}
    for key, amount in value.items():
        token_id, number = _number(key, True), _number(amount, False)
        if token_id is None or number is None or token_id < 0:
            raise _fail(f"Invalid entry {key!r}: {amount!r}.")
        bias[int(token_id)] = max(-100.0, min(100.0, float(number)))
    return bias


def _unquote(text: str) -> str:
    """Strip matching quotes and resolve JSON escapes such as ``\\n`` inside them."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        inner = text[1:-1]
        try:
            return jsontext.loads('"' + inner.replace('"', '\\"') + '"')
        except ValueError:
            return inner
    return text


# --- the types request models declare ---------------------------------------------------
_STRINGS_SCHEMA = {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]}
#: A token id; bounded by the loaded model's vocabulary in the served document.
TOKEN_ID_SCHEMA = {"type": "integer", "minimum": 0, "x-token-id": True}

_JSON_TYPES = ["object", "array", "string", "number", "integer", "boolean", "null"]
#: How a JSON schema the server compiles into a grammar is documented: the common core (any
#: Draft 2020-12 schema the grammar engine supports is accepted, and an unsupported keyword is a
#: 4xx naming it, but no finite document could list them all).
JSON_SCHEMA_DOC = {
    "type": "object", "additionalProperties": False,
    "properties": {"type": {"enum": _JSON_TYPES},
                   "properties": {"type": "object", "additionalProperties": {
                       "type": "object", "properties": {"type": {"enum": _JSON_TYPES}}, "additionalProperties": False}},
                   "required": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
    "description": "a JSON schema (Draft 2020-12; the common keywords are listed here)"}
#: A GBNF grammar: its own format, since not every string is one (a bad one is a 422 that says why).
GRAMMAR_DOC = {"type": "string", "format": "gbnf",
               "description": "GBNF (llama.cpp's format; a JSON schema as text is read as one)"}

Bool = Annotated[bool, BeforeValidator(to_bool)]
StringList = Annotated[list[str], BeforeValidator(to_string_list), WithJsonSchema(_STRINGS_SCHEMA)]
CommaStrings = Annotated[list[str], BeforeValidator(to_comma_strings), WithJsonSchema(_STRINGS_SCHEMA)]
TokenIds = Annotated[list[int], BeforeValidator(to_token_ids), WithJsonSchema(
    {"type": "array", "items": TOKEN_ID_SCHEMA, "description": "KoboldCpp's \"id,id,...\" string is read too"})]
Grammar = Annotated[str, WithJsonSchema(GRAMMAR_DOC)]
JsonSchema = Annotated[dict[str, Any], WithJsonSchema(JSON_SCHEMA_DOC)]
TokenBias = Annotated[dict[int, float], BeforeValidator(to_token_bias), WithJsonSchema(
    {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"}, "additionalProperties": {"type": "number"},
     "description": "token id -> bias (clamped to +-100)"})]


def number(minimum: float | None = None, maximum: float | None = None, *, integer: bool = False,
           description: str | None = None, schema_extra: dict[str, Any] | None = None) -> Any:
    """A number (numeric strings accepted) held to ``minimum``..``maximum``; ``schema_extra``: what
    the document states beyond those bounds."""
    field = Field(ge=minimum, le=maximum, description=description, json_schema_extra=schema_extra)
    return Annotated[int if integer else float, field, BeforeValidator(to_int if integer else to_float)]


#: A count of tokens (at least 1).
Count = number(1, integer=True)


def spellings(*names: str, description: str | None = None) -> Any:
    """An optional field that clients send under any of ``names`` (the first one found wins)."""
    return Field(None, validation_alias=AliasChoices(*names), description=description)
