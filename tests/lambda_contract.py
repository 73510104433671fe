"""Lambda Cloud's published contract, for tests: does a request our code sent exist in the spec (path and method),
does its body match the spec's request schema, and does an emulator reply match the spec's reply schema.

tests/contracts/lambda-cloud-openapi.json is a verbatim copy of shared/reference/lambda-cloud-openapi.json: Lambda's
cloud.lambda.ai/api/v1/openapi.json v1.8.3, as stored by alexandervaneck/lambda-ai-cloud-api-client
(openapi-1.8.3.json, commit b6023bc07c09 of 2025-11-20)."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from jsonschema import Draft202012Validator

SPEC_PATH = Path(__file__).parent / "contracts" / "lambda-cloud-openapi.json"


@functools.cache
def spec() -> dict:
    return json.loads(SPEC_PATH.read_text())


def _operation(method: str, path: str) -> tuple[str, dict] | None:
    for template, operations in spec()["paths"].items():
        pattern = "^" + re.sub(r"\{\w+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in operations:
            return template, operations[method.lower()]
    return None


def _validator(schema: dict) -> Draft202012Validator:
    return Draft202012Validator({**schema, "components": spec()["components"]})


def problems(method: str, path: str, body: object) -> list[str]:
    """What is wrong with one request against the spec (empty: nothing)."""
    found = _operation(method, path)
    if found is None:
        return [f"{method} {path}: no such path and method in the spec"]
    template, operation = found
    request_body = operation.get("requestBody")
    if request_body is None:
        return [] if body is None else [f"{method} {template}: the spec takes no body, got {body!r}"]
    if body is None:
        return [f"{method} {template}: the spec requires a body"] if request_body.get("required") else []
    schema = request_body["content"]["application/json"]["schema"]
    return [f"{method} {template}: {error.json_path}: {error.message}" for error in _validator(schema).iter_errors(body)]


def response_problems(method: str, path: str, status: int, body: object) -> list[str]:
    """What is wrong with one of the emulator's replies against the spec's schema for that status."""
    found = _operation(method, path)
    if found is None:
        return [f"{method} {path}: no such path and method in the spec"]
    template, operation = found
    reply = operation["responses"].get(str(status))
    if reply is None:
        return [f"{method} {template}: the spec has no {status} reply"]
    schema = reply["content"]["application/json"]["schema"]
    return [f"{method} {template} {status}: {error.json_path}: {error.message}" for error in _validator(schema).iter_errors(body)]
