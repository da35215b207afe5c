"""Django's HTTP requests under daphne in one thread hop: the API's path.

Django's ASGI handler runs a sync project as a relay between the event loop and a request
thread: the request-started signal's receivers, the middleware stack, the view (after a hop
back to the loop for the async dispatch in between), the response's ``close()`` and the
request-finished signal are each a ``sync_to_async`` or ``async_to_sync`` call, five or six
hops per request through asgiref's executors and futures. Under load most of a web worker's
CPU per API call went to those hops, not to the view.

``OneHopHandler`` answers a request as Django's WSGI handler does, on one of the worker's
request threads: the loop reads the body, one call on the thread runs the request-started
signal, the same ``MIDDLEWARE`` (loaded in sync mode), URL resolution and view, renders and
closes the response (which sends request-finished, and so hands the database connection back),
and the loop writes the response. What the client sees is what Django's ASGI handler sends.

The API's requests skip the middleware only a browser's pages need (``BROWSER_MIDDLEWARE``):
a token, not a session, authenticates them, they set no CSRF cookie, show no messages and are
no static files; each of those cost a request about a tenth of a millisecond for nothing.
Every other entry of ``MIDDLEWARE`` (security headers, language, framing) runs as for a page.

It serves paths whose views are sync and answer quickly (``PATHS``: the API). A streaming
response is read whole on the thread, and a client that disconnects is noticed only when its
answer is written, so long-running pages (the console) keep Django's own handler.
"""

import asyncio
from concurrent.futures import Executor

from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers import base
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.http import HttpResponse
from django.urls import set_script_prefix

# Path prefixes served in one hop; every view under them is sync and answers in one piece.
PATHS = ("/api/v1/",)
# What only pages in a browser use; left out of the chain for the paths above.
BROWSER_MIDDLEWARE = frozenset(
    {
        "whitenoise.middleware.WhiteNoiseMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
    }
)


def api_middleware() -> list[str]:
    return [path for path in settings.MIDDLEWARE if path not in BROWSER_MIDDLEWARE]


class OneHopHandler(ASGIHandler):
    """Django's handler for one request in one hop onto a given thread."""

    def __init__(self) -> None:
        base.BaseHandler.__init__(self)  # not ASGIHandler's: the middleware in sync mode
        self.load_middleware(is_async=False)

    def load_middleware(self, is_async: bool = False) -> None:
        """Django's loading of ``MIDDLEWARE``, given ``api_middleware()`` for the time it reads it
        (once, when the worker starts, before it serves)."""
        every = settings.MIDDLEWARE
        settings.MIDDLEWARE = api_middleware()
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = every

    @staticmethod
    def serves(scope) -> bool:
        return scope["type"] == "http" and scope["path"].startswith(PATHS)

    async def handle_on(self, executor: Executor, scope, receive, send) -> None:
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        loop = asyncio.get_running_loop()
        response = await loop.run_in_executor(executor, self.respond, scope, body_file)
        await self.send_response(response, send)

    def respond(self, scope, body_file) -> HttpResponse:
        """The request's response, complete and closed (on a request thread)."""
        try:
            set_script_prefix(get_script_prefix(scope))
            signals.request_started.send(sender=self.__class__, scope=scope)
            request, response = self.create_request(scope, body_file)
            if request is not None:
                response = self.get_response(request)
                response._handler_class = self.__class__
            if response.streaming:
                whole = HttpResponse(b"".join(response), status=response.status_code)
                whole.headers, whole.cookies = response.headers, response.cookies
                response.close()  # request_finished: the connection goes back to the pool
                return whole
            response.close()
            return response
        finally:
            body_file.close()
