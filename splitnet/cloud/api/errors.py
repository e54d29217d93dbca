"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

:class:`APIError` is what route handlers raise; :func:`from_splitnet` maps the splitnet error
family (a stage's typed error travels back through the SDK as the same type) onto statuses a
client can act on: its own mistake (400), the pipeline down or busy (503), a stage failing (502).
"""

from __future__ import annotations

from splitnet.errors import AuthError, ConfigError, LimitExceeded, PlanMismatch, SplitnetError, StageUnavailable


class APIError(Exception):
    """An error answered to the HTTP client as OpenAI does."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", code, param)


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' with a key this server lists "
                         "(splitnet api --api-key / --api-keys-file).", "invalid_request_error", "invalid_api_key")


def from_splitnet(e: SplitnetError) -> APIError:
    """The HTTP answer to an error the SDK raised while serving a request."""
    if isinstance(e, LimitExceeded):  # before ConfigError: a stage's queue or cache limit
        return APIError(503, f"the pipeline is at a limit, retry later: {e}", "server_error", "pipeline_busy")
    if isinstance(e, ConfigError):
        return invalid(str(e))
    if isinstance(e, StageUnavailable):
        return APIError(503, f"the pipeline is unavailable: {e}", "server_error", "pipeline_unavailable")
    if isinstance(e, (AuthError, PlanMismatch)):
        return APIError(502, f"the pipeline refused this server: {e}", "server_error", e.code)
    return APIError(502, f"a stage failed: {type(e).__name__}: {e}", "server_error", e.code)
