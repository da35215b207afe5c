"""ASGI entry point served by daphne: HTTP, and the console's websockets.

Websockets are for signed-in users (the admin's session cookie) from pages of ours: a
connection whose Origin is not one of ALLOWED_HOSTS is refused before any consumer runs.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailadmin.settings")

django_asgi_app = get_asgi_application()

# These need the app registry that get_asgi_application() has just loaded.
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from mailadmin.console.routing import websocket_urlpatterns  # noqa: E402
from mailadmin.onehop import OneHopHandler  # noqa: E402
from mailadmin.requestthreads import RequestThreads  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": RequestThreads(django_asgi_app, settings.WEB_THREADS, direct=OneHopHandler()),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
