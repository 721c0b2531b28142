"""OpenAI's error body for every failure: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tandem.engine.async_engine import EngineDeadError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error",
          413: "invalid_request_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def from_value_error(e: ValueError) -> APIError:
    """Engine validation errors start with the field they name ("top_p: must be ...")."""
    msg = str(e)
    m = re.match(r"([a-z_][a-z_0-9.]*): ", msg)
    code = "context_length_exceeded" if "context length" in msg else None
    return APIError(400, msg, m.group(1) if m else None, code)


_UNION_TAG = re.compile(r"str|int|float|bool|.*\[.*\]")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(ValueError)
    async def _value(_: Request, e: ValueError):
        a = from_value_error(e)
        return error_response(a.status, a.message, a.param, a.code)

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError):
        return error_response(503, str(e), headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _schema(_: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if err.get("type") == "json_invalid":
            return error_response(400, f"body: invalid JSON ({err.get('msg')})")
        # drop "body" / "query", and the member tags pydantic adds inside a union ("stop.str")
        loc = [str(x) for x in err.get("loc", ())[1:] if not _UNION_TAG.fullmatch(str(x))]
        param = ".".join(loc) or None
        msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg")
        return error_response(400, f"{param or 'body'}: {msg}", param)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _any(_: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}")
