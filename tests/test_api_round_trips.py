"""Round trips per API request: the statements a GET and a PUT of a mailbox send, and the
thread hops a request makes under ASGI. Counted, never timed."""

import asyncio

import asgiref.sync
import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.db import connection, connections
from django.test import AsyncClient
from django.test.utils import CaptureQueriesContext

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.models import AuditEntry
from tests.api_helpers import PASSWORD_HASH, Api, make_token

pytestmark = pytest.mark.django_db

CLIENT = "198.51.100.30"
OTHER_HASH = PBKDF2PasswordHasher().encode("another walrus", "fixedsalt", iterations=1000)


@pytest.fixture
def api() -> Api:
    services.create_domain(Actor.cli(), "example.test")
    api = Api(make_token("example.test"), address=CLIENT)
    assert api.put("mailboxes/a@example.test", {"password_hash": PASSWORD_HASH}).status_code == 201
    return api  # the token's last use is written: later requests within the interval write none


def statements(request) -> list[str]:
    with CaptureQueriesContext(connection) as queries:
        response = request()
    assert response.status_code in {200, 201}, response.content
    return [query["sql"].split(None, 1)[0].upper() for query in queries.captured_queries]


def test_get_reads_the_token_its_domains_and_the_mailbox(api):
    assert statements(lambda: api.get("mailboxes/a@example.test")) == ["SELECT", "SELECT", "SELECT"]


def test_put_of_an_existing_mailbox_locks_it_once_without_nested_savepoints(api):
    body = {"password_hash": OTHER_HASH, "quota_bytes": 10**6}
    sent = statements(lambda: api.put("mailboxes/a@example.test", body))
    # token, its domains, the mailbox; then one transaction (a savepoint inside the test's own):
    # the row and its login locked, its settings, its login's hash and the hash's digest, the two
    # audit entries.
    assert sent == [
        "SELECT",
        "SELECT",
        "SELECT",
        "SAVEPOINT",
        "SELECT",
        "UPDATE",
        "INSERT",
        "UPDATE",
        "UPDATE",
        "INSERT",
        "RELEASE",
    ]
    assert list(AuditEntry.objects.order_by("-id").values_list("action", flat=True)[:2]) == [
        "set password",
        "update",
    ]
    assert api.get("mailboxes/a@example.test").json()["quota_bytes"] == 10**6


def test_put_of_the_hash_a_mailbox_has_writes_only_the_settings(api):
    body = {"password_hash": PASSWORD_HASH, "quota_bytes": 10**6}
    sent = statements(lambda: api.put("mailboxes/a@example.test", body))
    assert sent == ["SELECT", "SELECT", "SELECT", "SAVEPOINT", "SELECT", "UPDATE", "INSERT", "RELEASE"]
    assert AuditEntry.objects.order_by("-id").values_list("action", flat=True)[0] == "update"


def test_put_creating_a_mailbox_opens_one_transaction(api):
    sent = statements(lambda: api.put("mailboxes/b@example.test", {"password_hash": PASSWORD_HASH}))
    # token, its domains, the mailbox (none), the domain in the token's scope (for the refusal,
    # then for the creation); then one transaction (a savepoint inside the test's own), the
    # store's inside it without a savepoint of its own: the domain locked, that the address is
    # neither a login nor an alias (one statement), the login, the uid_validity counter taken
    # (one UPDATE), the mailbox, the audit entry. No count of the domain's mailboxes, which has
    # no maximum (a scan, at 100,000 mailboxes).
    assert sent == [
        "SELECT",
        "SELECT",
        "SELECT",
        "SELECT",
        "SELECT",
        "SAVEPOINT",
        "SELECT",
        "SELECT",
        "INSERT",
        "UPDATE",
        "INSERT",
        "INSERT",
        "RELEASE",
    ]


def test_a_domain_with_a_maximum_counts_its_mailboxes_before_adding_one(api):
    services.update_domain(Actor.cli(), "example.test", max_mailboxes=2)  # a@example.test is there
    sent = statements(lambda: api.put("mailboxes/b@example.test", {"password_hash": PASSWORD_HASH}))
    assert len(sent) == 14
    refused = api.put("mailboxes/c@example.test", {"password_hash": PASSWORD_HASH})
    assert (refused.status_code, refused.json()["code"]) == (409, "limit_reached")


@pytest.mark.django_db(transaction=True)
def test_an_asgi_request_takes_the_middleware_in_one_thread_hop(monkeypatch):
    services.create_domain(Actor.cli(), "example.test")
    token = make_token("example.test")
    services.create_mailbox(Actor.cli(), "a@example.test", password_hash=PASSWORD_HASH)
    hops: list[str] = []
    to_thread, to_loop = asgiref.sync.SyncToAsync.__call__, asgiref.sync.AsyncToSync.__call__

    async def counting_to_thread(self, *args, **kwargs):
        hops.append(getattr(self.func, "__qualname__", type(self.func).__qualname__))
        return await to_thread(self, *args, **kwargs)

    def counting_to_loop(self, *args, **kwargs):
        hops.append("to the loop")
        return to_loop(self, *args, **kwargs)

    monkeypatch.setattr(asgiref.sync.SyncToAsync, "__call__", counting_to_thread)
    monkeypatch.setattr(asgiref.sync.AsyncToSync, "__call__", counting_to_loop)
    client = AsyncClient(REMOTE_ADDR=CLIENT)
    request = client.get(
        "/api/v1/mailboxes/a@example.test", secure=True, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        response = asyncio.run(request)
    finally:  # the connection the view opened on Django's sync thread
        asyncio.run(asgiref.sync.sync_to_async(connections.close_all)())
    assert response.status_code == 200, response.content
    assert response["X-Frame-Options"] == "DENY"  # the middleware still ran
    middleware_hops = [hop for hop in hops if "Middleware" in hop and "process_view" not in hop]
    assert middleware_hops == []
    assert hops.count("convert_exception_to_response.<locals>.inner") == 1
    assert hops.count("to the loop") == 1
