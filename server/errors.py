"""Every failure leaves the server as OpenAI's error body ``{"error": {message, type, param, code}}``.

OpenAI clients parse that shape to raise their typed exceptions (BadRequestError, NotFoundError, ...), so
FastAPI's own bodies (``{"detail": ...}`` with 422 for validation) are replaced, including for malformed
JSON, unknown routes and unexpected crashes.
"""
from __future__ import annotations

import logging
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("deltaserve.server")

_TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error with the status and OpenAI error fields it is answered with."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_FOR_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def model_not_found(model: str) -> APIError:
    # OpenAI answers an unknown model with 404, type invalid_request_error, code model_not_found.
    return APIError(404, f"The model '{model}' does not exist or you do not have access to it.",
                    code="model_not_found", param="model", type="invalid_request_error")


def internal_error(exc: BaseException) -> APIError:
    log.error("internal error", exc_info=exc)
    return APIError(500, f"Internal server error: {type(exc).__name__}: {exc}", type="server_error")


def error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first problem pydantic found, phrased the way OpenAI phrases it."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return bad_request("We could not parse the JSON body of your request. Send valid JSON "
                           f"({first.get('ctx', {}).get('error', 'invalid JSON')}).", code="invalid_json")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return bad_request(f"Invalid value for '{param}': {message}" if param else message, param=param,
                       code="invalid_value")


def install_error_handlers(app: FastAPI, on_error: Callable[[Request, APIError], None]) -> None:
    """Answer every failure with OpenAI's body; ``on_error`` sees each one (the error counters)."""

    def respond(request: Request, error: APIError) -> JSONResponse:
        on_error(request, error)
        return error_response(error)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"Unknown URL {request.method} {request.url.path}"
        return respond(request, APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return respond(request, internal_error(exc))
