"""Request bodies and query strings, checked against the OpenAPI schemas; a failure names each field
(`params.width`, `items[3].prompt`) and says what is wrong with it.

A body is first checked by a validator that fastjsonschema compiled to Python (~10 us for a render
request; jsonschema takes ~300 us, a tenth of the gateway's whole CPU per submit). Only a body it
refuses goes through jsonschema, which names every fault (fastjsonschema stops at the first) and
is the reference: a body jsonschema accepts is accepted whatever the fast check said.
`tests/unit/test_validation_fast_path.py` holds the two to the same verdicts."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import fastjsonschema
from aiohttp import web
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway.openapi import SPEC, query_parameters
from gateway.schemas import ERROR_MESSAGE, Schema
from gateway.state import SETTINGS
from shared.errors import FieldError, PayloadTooLarge, ValidationFailed

_SPEC_URI = "urn:renderflow:openapi"
_REGISTRY: Registry[Any] = Registry().with_resource(
    _SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT202012)
)
_TYPE_NAMES = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


def field_path(parts: Iterable[str | int]) -> str:
    """`params.width`, `items[3].prompt`: a path into a JSON document, as people write it."""
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _describe(error: ValidationError) -> Iterator[FieldError]:
    where = list(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    value: Any = error.validator_value
    instance: Any = error.instance
    match error.validator:
        case "required":
            for name in value:
                if isinstance(instance, dict) and name not in instance:
                    yield FieldError(field_path([*where, name]), "is required")
            return
        case "additionalProperties":
            known = schema.get("properties", {})
            for name in instance:
                if name not in known:
                    yield FieldError(field_path([*where, name]), "is not a known field")
            return
        case "type":
            types = value if isinstance(value, list) else [value]
            message = "must be " + " or ".join(_TYPE_NAMES.get(str(t), str(t)) for t in types)
        case "minimum":
            message = f"must be at least {value}"
        case "maximum":
            message = f"must be at most {value}"
        case "exclusiveMinimum":
            message = f"must be greater than {value}"
        case "exclusiveMaximum":
            message = f"must be less than {value}"
        case "minLength":
            message = "must not be empty" if value == 1 else f"must have at least {value} characters"
        case "maxLength":
            message = f"must have at most {value} characters"
        case "pattern":
            message = schema.get(ERROR_MESSAGE) or f"must match {value}"
        case "enum":
            message = "must be one of " + ", ".join(str(v) for v in value)
        case _:
            message = schema.get(ERROR_MESSAGE) or error.message
    yield FieldError(field_path(where), message)


def _field_errors(errors: Iterable[ValidationError]) -> list[FieldError]:
    found: dict[FieldError, None] = {}  # ordered and without repeats
    for error in sorted(errors, key=lambda e: [str(p) for p in e.absolute_path]):
        for field_error in _describe(error):
            found[field_error] = None
    return list(found)


def _invalid(errors: list[FieldError]) -> ValidationFailed:
    summary = "; ".join(f"{e.field or 'body'}: {e.message}" for e in errors[:5])
    return ValidationFailed(f"The request is invalid ({summary}).", errors)


@functools.cache
def _schema_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{_SPEC_URI}#/components/schemas/{name}"}, registry=_REGISTRY)


_ANNOTATIONS = frozenset({"description", "default", "format", "example", ERROR_MESSAGE})
"""Keywords that do not constrain a value under jsonschema's defaults (no format checks): left out of
the fast validator, which would fill in defaults or check formats."""


def _inlined(node: Any, seen: tuple[str, ...] = ()) -> Any:
    """A schema with its `$ref`s replaced by what they name, and without annotations."""
    if isinstance(node, list):
        return [_inlined(item, seen) for item in node]
    if not isinstance(node, dict):
        return node
    inlined: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":  # names of fields, not keywords
            inlined[key] = {name: _inlined(schema, seen) for name, schema in value.items()}
        elif key not in _ANNOTATIONS and key != "$ref":
            inlined[key] = _inlined(value, seen)
    if "$ref" not in node:
        return inlined
    name = node["$ref"].rsplit("/", 1)[1]
    if name in seen:
        raise ValueError(f"cannot inline the recursive {node['$ref']}")
    target = _inlined(SPEC["components"]["schemas"][name], (*seen, name))
    return {"allOf": [target, inlined]} if inlined else target


@functools.cache
def fast_check(schema_name: str) -> Callable[[Any], bool]:
    """Whether `document` fits the component schema `schema_name`, by the compiled validator."""
    compiled = fastjsonschema.compile(_inlined(SPEC["components"]["schemas"][schema_name]), use_default=False)

    def fits(document: Any) -> bool:
        try:
            compiled(document)
        except fastjsonschema.JsonSchemaException:
            return False
        return True

    return fits


def validate(document: Any, schema_name: str) -> None:
    """Raises ValidationFailed naming every field of `document` that does not fit `schema_name`."""
    if fast_check(schema_name)(document):
        return
    errors = _field_errors(_schema_validator(schema_name).iter_errors(document))
    if errors:
        raise _invalid(errors)


def prepare_validators() -> None:
    """Builds the validators of every request body now (~25 ms), not in the first request of each."""
    for name in SPEC["components"]["schemas"]:
        if name.endswith("Request"):
            fast_check(name)
            _schema_validator(name).is_valid({})  # resolves its references


_JSON_BODY = web.RequestKey("json_body", object)


async def json_body(request: web.Request) -> Any:
    """The request's body parsed as JSON, not yet validated; parsed once however often asked
    (the rate limiter counts a batch's items before its handler validates them)."""
    if _JSON_BODY in request:
        return request[_JSON_BODY]
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The body must be at most {limit} bytes.")
    raw = await request.read()  # the application's client_max_size stops a longer chunked body
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationFailed(
            "The body is not valid JSON.", [FieldError("", f"is not valid JSON ({exc})")]
        ) from None
    except RecursionError:
        # Deeper than the parser goes, which is far deeper than the walk below allows.
        raise _invalid([FieldError("", f"is nested more than {MAX_JSON_DEPTH} levels deep")]) from None
    errors = _unstorable(document)
    if errors:
        raise _invalid(errors)
    request[_JSON_BODY] = document
    return document


MAX_JSON_DEPTH = 32
"""How deeply arrays and objects of a request body may nest (the deepest schema needs 5 levels);
deeper documents would exhaust the recursion of the schema validator and the request hash."""


def _unstorable(document: Any) -> list[FieldError]:
    """What of a parsed body no later step could handle: nesting past MAX_JSON_DEPTH, and strings
    (keys included) with lone surrogates (`"\\ud800"` is valid JSON, but not text UTF-8 can carry to
    a service or a hash). Walks without recursion, so that no depth can crash it."""
    pending: list[tuple[Any, tuple[str | int, ...]]] = [(document, ())]
    while pending:
        value, path = pending.pop()
        if isinstance(value, str):
            if not _encodable(value):
                return [FieldError(field_path(path), "is not valid Unicode text (a lone surrogate)")]
            continue
        if not isinstance(value, dict | list):
            continue
        if len(path) >= MAX_JSON_DEPTH:
            return [FieldError(field_path(path), f"is nested more than {MAX_JSON_DEPTH} levels deep")]
        if isinstance(value, list):
            pending.extend((item, (*path, index)) for index, item in enumerate(value))
            continue
        for key, item in value.items():
            if not _encodable(key):
                return [FieldError(field_path(path), "has a key that is not valid Unicode text")]
            pending.append((item, (*path, key)))
    return []


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


async def read_json(request: web.Request, schema_name: str) -> dict[str, Any]:
    """The request's JSON body, checked against the component schema `schema_name`."""
    document = await json_body(request)
    validate(document, schema_name)
    result: dict[str, Any] = document
    return result


_INTEGER = re.compile("-?[0-9]{1,18}")
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


@functools.cache
def _query_validator(operation_id: str) -> tuple[dict[str, Schema], Draft202012Validator]:
    parameters = query_parameters(operation_id)
    schema = {"type": "object", "properties": parameters, "additionalProperties": False}
    return parameters, Draft202012Validator(schema)


def read_query(request: web.Request, operation_id: str) -> dict[str, Any]:
    """The query parameters of `operation_id` given in the request (empty ones count as absent),
    converted to their schema's type and checked."""
    parameters, validator = _query_validator(operation_id)
    values: dict[str, Any] = {}
    errors: list[FieldError] = []
    for name in dict.fromkeys(request.query):
        given = request.query.getall(name)
        if len(given) > 1:
            errors.append(FieldError(name, "must be given at most once"))
            continue
        raw = given[0]
        if raw == "":
            continue
        if parameters.get(name, {}).get("type") == "integer":
            # ASCII digits only: int() would also read `٣` as 3 and spaces around the number.
            if _INTEGER.fullmatch(raw):
                values[name] = int(raw)
            else:
                errors.append(FieldError(name, "must be an integer"))
            continue
        if parameters.get(name, {}).get("type") == "boolean":
            if raw.lower() in _BOOLEANS:
                values[name] = _BOOLEANS[raw.lower()]
            else:
                errors.append(FieldError(name, "must be true or false"))
            continue
        values[name] = raw
    errors.extend(_field_errors(validator.iter_errors(values)))
    if errors:
        raise _invalid(errors)
    return values
