"""Errors in the OpenAI error schema: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the API reports (validation, a prompt too long, a full queue, a wrong API key, an
unknown route) has this body, so OpenAI clients raise their usual exception classes with our message.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["APIError", "error_body", "install_error_handlers"]

log = logging.getLogger("diffusion_lm.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


class APIError(Exception):
    """An error to answer with ``status`` and an OpenAI error body; ``param`` names the request field."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# pydantic puts the member type of a union into the error location ("str", "list[TextPart]").
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$")


def _param(loc: tuple) -> Optional[str]:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``."""
    parts = [p for p in loc if p != "body" and not (isinstance(p, str) and _UNION_TAG.match(p))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _validation_message(err: dict) -> str:
    kind, msg = err.get("type", ""), err.get("msg", "invalid value")
    if kind == "extra_forbidden":
        return "unknown field (not part of this API; diffusion options go under \"diffusion\")"
    if kind == "json_invalid":
        ctx = err.get("ctx") or {}
        return f"the request body is not valid JSON ({ctx.get('error', msg)})"
    if kind == "missing":
        return "this field is required"
    if kind == "model_attributes_type" or kind == "dict_type":
        return "the request body must be a JSON object"
    return msg.removeprefix("Value error, ")


def install_error_handlers(app: FastAPI) -> None:
    """Answer validation errors with 400 and the first offending field, and every other error with
    the OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        # The deepest location is the most specific (a union reports one error per member type).
        first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"loc": ("body",),
                                                                                 "msg": "invalid"}
        # A JSON syntax error's location is a character offset, not a field.
        param = None if first.get("type") == "json_invalid" else _param(tuple(first.get("loc", ())))
        message = _validation_message(first)
        if param:
            message = f"{param}: {message}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = (f"no route {request.method} {request.url.path}; see GET /v1/models, "
                       "POST /v1/chat/completions")
        return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()
