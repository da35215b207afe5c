"""API requests under daphne in one thread hop (``mailadmin.onehop``): the same answers as
Django's ASGI handler gives, without asgiref's relays between the loop and the thread."""

import asyncio
import json

import asgiref.sync
import pytest
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.db import connections

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.models import AuditEntry, Mailbox
from mailadmin.onehop import BROWSER_MIDDLEWARE, OneHopHandler, api_middleware
from mailadmin.requestthreads import RequestThreads
from tests.api_helpers import PASSWORD_HASH, make_token

pytestmark = pytest.mark.django_db(transaction=True)

CLIENT = "198.51.100.31"


def scope(method: str, path: str, token: str | None, body: bytes = b"") -> dict:
    headers = [(b"host", b"testserver"), (b"x-forwarded-proto", b"https")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": [CLIENT, 50000],
        "server": ["testserver", 443],
    }


def serve(application, request_scope: dict, body: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through an ASGI application: its status, headers and body as sent."""
    sent: list[dict] = []
    bodies = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if bodies:
            return bodies.pop()
        await asyncio.Event().wait()  # the client stays connected

    async def send(message):
        sent.append(message)

    async def main():
        await application(request_scope, receive, send)
        # The connections the request threads opened, closed on those threads.
        for executor in getattr(application, "_idle", []):
            await asyncio.get_running_loop().run_in_executor(executor, connections.close_all)

    asyncio.run(main())
    start = sent[0]
    assert start["type"] == "http.response.start"
    content = b"".join(message.get("body", b"") for message in sent[1:])
    return start["status"], dict(start["headers"]), content


@pytest.fixture
def token() -> str:
    services.create_domain(Actor.cli(), "example.test")
    services.create_mailbox(Actor.cli(), "a@example.test", password_hash=PASSWORD_HASH)
    return make_token("example.test")


def one_hop() -> RequestThreads:
    def not_here(scope, receive, send):
        raise AssertionError("an API request went to Django's ASGI handler")

    return RequestThreads(not_here, size=2, direct=OneHopHandler())


@pytest.mark.parametrize(
    ("path", "with_token", "status"),
    [
        ("/api/v1/mailboxes/a@example.test", True, 200),
        ("/api/v1/mailboxes/nobody@example.test", True, 404),
        ("/api/v1/mailboxes/a@example.test", False, 401),
        ("/api/v1/mailboxes/", True, 200),
    ],
)
def test_a_get_is_answered_as_djangos_asgi_handler_answers_it(token, path, with_token, status):
    request_scope = scope("GET", path, token if with_token else None)
    expected = serve(ASGIHandler(), request_scope)
    answered = serve(one_hop(), request_scope)
    assert expected[0] == status
    assert answered == expected


def test_a_put_creates_the_mailbox_and_its_audit_entry(token):
    body = json.dumps({"password_hash": PASSWORD_HASH, "quota_bytes": 10**6}).encode()
    status, headers, content = serve(
        one_hop(), scope("PUT", "/api/v1/mailboxes/b@example.test", token, body), body
    )
    assert status == 201, content
    assert headers[b"Content-Type"] == b"application/json"
    assert json.loads(content)["quota_bytes"] == 10**6
    assert Mailbox.objects.get(user__username="b@example.test").quota_bytes == 10**6
    entry = AuditEntry.objects.get(object_name="b@example.test")
    assert (entry.action, entry.actor_kind, entry.client_address) == ("create", "token", CLIENT)


def test_a_refused_put_is_answered_like_djangos(token):
    body = json.dumps({"password_hash": PASSWORD_HASH, "colour": "blue"}).encode()
    request_scope = scope("PUT", "/api/v1/mailboxes/c@example.test", token, body)
    expected = serve(ASGIHandler(), request_scope, body)
    assert expected[0] == 400
    assert serve(one_hop(), request_scope, body) == expected


def test_an_api_request_makes_no_asgiref_hop(token, monkeypatch):
    hops: list[str] = []
    to_thread, to_loop = asgiref.sync.SyncToAsync.__call__, asgiref.sync.AsyncToSync.__call__

    def counting_to_thread(self, *args, **kwargs):
        hops.append("to a thread")
        return to_thread(self, *args, **kwargs)

    def counting_to_loop(self, *args, **kwargs):
        hops.append("to the loop")
        return to_loop(self, *args, **kwargs)

    monkeypatch.setattr(asgiref.sync.SyncToAsync, "__call__", counting_to_thread)
    monkeypatch.setattr(asgiref.sync.AsyncToSync, "__call__", counting_to_loop)
    status, headers, _ = serve(one_hop(), scope("GET", "/api/v1/mailboxes/a@example.test", token))
    assert status == 200
    assert headers[b"X-Frame-Options"] == b"DENY"  # the middleware ran
    assert hops == []


def test_api_requests_skip_only_the_browsers_middleware():
    assert BROWSER_MIDDLEWARE < set(settings.MIDDLEWARE)  # names that are in use
    assert api_middleware() == [
        "django.middleware.security.SecurityMiddleware",
        "django.middleware.locale.LocaleMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
        "mailadmin.middleware.SyncMiddlewareChain",
    ]
    OneHopHandler()
    assert len(settings.MIDDLEWARE) == len(api_middleware()) + len(BROWSER_MIDDLEWARE)


def test_an_api_answer_in_another_language_sets_no_cookie(token):
    request_scope = scope("GET", "/api/v1/mailboxes/nobody@example.test", token)
    request_scope["headers"].append((b"accept-language", b"id"))
    expected = serve(ASGIHandler(), request_scope)
    status, headers, content = serve(one_hop(), request_scope)
    assert (status, headers, content) == expected
    assert headers[b"Content-Language"] == b"id"
    assert b"Set-Cookie" not in headers


def test_other_paths_keep_djangos_handler():
    seen: list[str] = []

    async def django(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    threads = RequestThreads(django, size=1, direct=OneHopHandler())
    for path in ("/admin/", "/console/", "/api/docs/", "/static/admin/css/base.css"):
        assert serve(threads, scope("GET", path, None))[0] == 204
    assert seen == ["/admin/", "/console/", "/api/docs/", "/static/admin/css/base.css"]
