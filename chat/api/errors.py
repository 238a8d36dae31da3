"""Errors of the /v1 API, in the shape OpenAI's clients read: status, type, code, message."""

from dataclasses import dataclass


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after: int | None = None

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, code=code, param=param)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, type="authentication_error", code="invalid_api_key")


def forbidden(
    message: str, *, code: str = "insufficient_permissions", param: str | None = None
) -> ApiError:
    return ApiError(403, message, type="permission_error", code=code, param=param)


def not_found(message: str, *, code: str = "not_found", param: str | None = None) -> ApiError:
    return ApiError(404, message, code=code, param=param)


def too_large(message: str) -> ApiError:
    return ApiError(413, message, code="request_too_large")


def rate_limited(message: str, *, retry_after: int, quota: bool) -> ApiError:
    return ApiError(
        429,
        message,
        type="insufficient_quota" if quota else "rate_limit_error",
        code="insufficient_quota" if quota else "rate_limit_exceeded",
        retry_after=max(1, retry_after),
    )


def unavailable(message: str, *, retry_after: int = 5) -> ApiError:
    return ApiError(
        503, message, type="server_error", code="model_unavailable", retry_after=retry_after
    )
