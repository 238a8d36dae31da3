import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genai_site.settings")

# Django must be set up before the consumers (and the models they import) are loaded.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import get_resolver  # noqa: E402

from chat.routing import websocket_urlpatterns  # noqa: E402
from genai_site.api_handler import ApiHandler, http_router  # noqa: E402
from genai_site.process import long_lived_freeze  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": http_router(django_asgi_app, ApiHandler()),
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)

# The URLs and their views (the API's schemas among them) are loaded now rather than by the
# first request, so that they are among the objects that full collections no longer walk.
_ = get_resolver().url_patterns
long_lived_freeze()
