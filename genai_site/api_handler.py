"""The ASGI handler for `/v1/`: the same Django project and URLs, without the browser's middleware.

Programs call `/v1/` with an API key; they use no session, CSRF token, message, logged-in user
or static file. Under ASGI each of those middleware (classic `MiddlewareMixin` classes) runs
its request and response hooks in a worker thread, two thread switches apiece: about 1.3 ms a
call on 2 cores (GET /v1/models in process: 2.74 -> 1.44 ms). API calls keep what applies to
them: the security headers and HTTPS redirect, the Host check against ALLOWED_HOSTS and
Content-Length (`CommonMiddleware`), and X-Frame-Options (the docs page is HTML), and they get a
`Server-Timing` header (`ServerTiming`). Those do no I/O, so their hooks run on the event loop.
"""

import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest, HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.utils.deprecation import MiddlewareMixin

API_PREFIX = "/v1/"


class _OnTheLoop:
    """Runs a middleware's hooks in the request's own coroutine: for those that do no I/O."""

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        if response is None:
            response = await self.get_response(request)  # type: ignore[attr-defined]
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response  # type: ignore[return-value]


class _Security(_OnTheLoop, SecurityMiddleware):
    pass


class _Common(_OnTheLoop, CommonMiddleware):
    pass


class _XFrameOptions(_OnTheLoop, XFrameOptionsMiddleware):
    pass


# Where `ApiHandler` notes, in the request's ASGI scope, when it received the request.
RECEIVED = "genai.received"


class ServerTiming(_OnTheLoop, MiddlewareMixin):
    """`Server-Timing` on every answer that is not streamed: `total`, the time from this
    handler's receipt of the request to its answer, in ms. When the view noted the model's time
    (`request.model_seconds`: a completion's model call, from the worker's end event), also
    `model` and `platform`, the rest of the total: what the platform added to the model's call
    (authentication, admission, the queue and the worker's steps, the way back). Time the
    request spent before this process's event loop took it up is in none of them."""

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> Any:
        received = request.scope.get(RECEIVED)  # type: ignore[attr-defined]
        if response.streaming or received is None:
            return response
        total = (time.perf_counter() - received) * 1000
        metrics = [f"total;dur={total:.2f}"]
        model_seconds = getattr(request, "model_seconds", None)
        if model_seconds is not None:
            model = model_seconds * 1000
            metrics += [f"model;dur={model:.2f}", f"platform;dur={total - model:.2f}"]
        response["Server-Timing"] = ", ".join(metrics)
        return response


# Outermost first, in the order the site's MIDDLEWARE has them; the timing's outside them all.
API_MIDDLEWARE: list[type[MiddlewareMixin]] = [ServerTiming, _Security, _Common, _XFrameOptions]


class ApiHandler(ASGIHandler):
    """Each request's sync code (the key check, admission, the enqueue) runs in one thread, as
    under Django's own handler, but in a thread kept from an earlier request rather than one
    started for it: what the libraries set up per thread is set up once (Celery's publish took
    0.9 ms from a fresh thread, 0.6 ms from a kept one)."""

    # Idle threads kept; more requests at once start more, and those beyond this end after.
    IDLE_THREADS = 32

    def __init__(self) -> None:
        super().__init__()
        self._idle: list[ThreadPoolExecutor] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"The API serves HTTP only, not {scope['type']}.")
        scope[RECEIVED] = time.perf_counter()
        executor = (
            self._idle.pop()
            if self._idle
            else ThreadPoolExecutor(max_workers=1, thread_name_prefix="api")
        )
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        except BaseException:
            # Cancelled (the server gave up on a client that left) or failed: sync work may
            # still be running in the thread, and no later request may queue behind it.
            executor.shutdown(wait=False)
            raise
        if len(self._idle) < self.IDLE_THREADS:
            self._idle.append(executor)
        else:
            executor.shutdown(wait=False)

    def load_middleware(self, is_async: bool = False) -> None:
        assert is_async, "the API handler serves ASGI only"
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        handler = convert_exception_to_response(self._get_response_async)  # type: ignore[attr-defined]
        for middleware in reversed(API_MIDDLEWARE):
            handler = convert_exception_to_response(middleware(handler))  # type: ignore[arg-type]
        self._middleware_chain = handler


def api_path(scope: dict[str, Any]) -> bool:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.startswith(API_PREFIX)


def http_router(
    site: Callable[..., Awaitable[None]], api: Callable[..., Awaitable[None]]
) -> Callable[..., Awaitable[None]]:
    """HTTP under `/v1/` to `api`, the rest to `site`."""

    async def route(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await (api if api_path(scope) else site)(scope, receive, send)

    return route
