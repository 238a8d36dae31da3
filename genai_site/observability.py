"""`/metrics`: the Prometheus exposition of web and worker processes, for staff or a scraper."""

import secrets

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from models_admin.metrics import metrics_exposition


def _scraper_token_ok(request: HttpRequest) -> bool:
    expected = settings.METRICS_TOKEN
    sent = request.headers.get("Authorization", "")
    return bool(expected) and secrets.compare_digest(sent, f"Bearer {expected}")


def metrics_view(request: HttpRequest) -> HttpResponse:
    if not (request.user.is_authenticated and request.user.is_staff) and not _scraper_token_ok(
        request
    ):
        status = 403 if request.user.is_authenticated else 401
        response = HttpResponse(
            "Metrics are for staff or a scraper with the token.\n", status=status
        )
        if status == 401:
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    body, content_type = metrics_exposition()
    return HttpResponse(body, content_type=content_type)
