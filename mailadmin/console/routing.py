"""The console's websocket routes (mounted by ``mailadmin.asgi``)."""

from django.urls import path

from mailadmin.console.consumers import LiveSessionsConsumer

LIVE_SESSIONS_SOCKET_PATH = "/admin/sessions/live/socket/"

websocket_urlpatterns = [
    path(LIVE_SESSIONS_SOCKET_PATH.lstrip("/"), LiveSessionsConsumer.as_asgi()),
]
