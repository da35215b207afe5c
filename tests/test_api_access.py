"""Who may do what through the API: every endpoint and method against a token's domains,
read or write scope, expiry, revocation and source networks; failed authentications and
their per-source limit."""

from datetime import timedelta

import pytest
from django.utils import timezone

from mailadmin.api.models import ApiToken
from mailadmin.hosting import aliases, services, store
from mailadmin.hosting.actors import Actor
from mailadmin.models import Alias, AuditEntry, AuthFailure, Mailbox
from tests.api_helpers import PASSWORD_HASH, Api, make_token
from tests.conftest import open_session_row

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_domains(make_mailbox):
    """alice@a.test and bob@b.test, each with an open POP3 session and an audit entry; the
    alias info@b.test to bob."""
    alice, bob = make_mailbox("alice@a.test"), make_mailbox("bob@b.test")
    services.update_mailbox(Actor.cli(), "bob@b.test", quota_messages=5)
    aliases.create_alias(Actor.cli(), "info@b.test", ["bob@b.test"])
    return {
        "alice": alice,
        "bob": bob,
        "bob_session": open_session_row(bob),
        "bob_entry": AuditEntry.objects.get(object_name="bob@b.test", action="update"),
    }


def every_request(objects) -> list[tuple[str, str, object]]:
    """One request per endpoint and method, each about b.test or its objects."""
    session, entry = objects["bob_session"].pk, objects["bob_entry"].pk
    return [
        ("GET", "mailboxes/bob@b.test", None),
        ("PUT", "mailboxes/bob@b.test", {"quota_bytes": 1}),
        ("PUT", "mailboxes/new@b.test", {"password_hash": PASSWORD_HASH}),
        ("PATCH", "mailboxes/bob@b.test", {"quota_bytes": 1}),
        ("DELETE", "mailboxes/bob@b.test", None),
        ("POST", "mailboxes/bob@b.test/kick", None),
        ("POST", "mailboxes/import", [{"address": "new@b.test", "password_hash": PASSWORD_HASH}]),
        ("GET", "domains/b.test", None),
        ("PUT", "domains/b.test", {"active": False}),
        ("PUT", "domains/c.test", {}),
        ("PATCH", "domains/b.test", {"quota_warning_percents": [50]}),
        ("DELETE", "domains/b.test?force=true", None),
        ("GET", "aliases/info@b.test", None),
        ("PUT", "aliases/info@b.test", {"destinations": ["bob@b.test"], "active": False}),
        ("PUT", "aliases/new@b.test", {"destinations": ["bob@b.test"]}),
        ("PUT", "aliases/@b.test", {"destinations": ["bob@b.test"]}),
        ("PATCH", "aliases/info@b.test", {"active": False}),
        ("DELETE", "aliases/info@b.test", None),
        ("GET", f"sessions/{session}", None),
        ("POST", f"sessions/{session}/kick", None),
        ("GET", f"audit/{entry}", None),
    ]


LISTS = ["mailboxes/", "domains/", "aliases/", "sessions/", "audit/"]


def unchanged(objects) -> None:
    bob = Mailbox.objects.get(user__username="bob@b.test")
    assert (bob.quota_bytes, bob.active, bob.domain.active) == (0, True, True)
    assert not Mailbox.objects.filter(user__username="new@b.test").exists()
    assert list(Alias.objects.values_list("source", "active")) == [("info@b.test", True)]
    objects["bob_session"].refresh_from_db()
    assert objects["bob_session"].kick_requested_at is None


def test_a_token_for_one_domain_gets_404_for_every_object_of_another(two_domains):
    api = Api(make_token("a.test"))
    for method, path, body in every_request(two_domains):
        response = api.call(method, path, body)
        assert (method, path, response.status_code, response.json()["code"]) == (
            method,
            path,
            404,
            "not_found",
        )
    unchanged(two_domains)


def test_a_token_for_one_domain_lists_only_that_domain(two_domains):
    api = Api(make_token("a.test", scope="read"))
    assert [row["address"] for row in api.get("mailboxes/").json()["results"]] == ["alice@a.test"]
    assert [row["name"] for row in api.get("domains/").json()["results"]] == ["a.test"]
    assert api.get("aliases/").json()["count"] == 0
    assert api.get("sessions/").json()["count"] == 0
    assert {row["domain"] for row in api.get("audit/").json()["results"]} == {"a.test"}


def test_a_read_token_reads_but_gets_403_on_every_write(two_domains):
    api = Api(make_token(scope="read"))
    for method, path, body in every_request(two_domains):
        response = api.call(method, path, body)
        expected = (200, None) if method == "GET" else (403, "read_only_token")
        assert (path, response.status_code, response.json().get("code")) == (path, *expected)
    unchanged(two_domains)


@pytest.mark.parametrize("state", ["wrong", "expired", "revoked", "missing", "malformed"])
def test_a_wrong_expired_revoked_or_missing_token_gets_401_everywhere(two_domains, state, settings):
    settings.API_AUTH_FAILURE_LIMIT = 100
    token = make_token()
    prefix = token[4:12]
    if state == "expired":
        ApiToken.objects.filter(prefix=prefix).update(expires_at=timezone.now() - timedelta(seconds=1))
    elif state == "revoked":
        services.revoke_token(Actor.cli(), prefix)
    api = Api({"wrong": token[:-2] + "xx", "missing": None, "malformed": "not-a-token"}.get(state, token))
    codes = {"wrong": "wrong_token", "expired": "expired_token", "revoked": "revoked_token"}
    for method, path, body in [*every_request(two_domains), *(("GET", path, None) for path in LISTS)]:
        response = api.call(method, path, body)
        assert (path, response.status_code) == (path, 401)
        assert response["WWW-Authenticate"] == 'Bearer realm="api"'
        expected = codes.get(state, "wrong_token" if state == "malformed" else "not_authenticated")
        assert response.json()["code"] == expected
    unchanged(two_domains)


def test_a_token_used_from_outside_its_networks_gets_403(two_domains, settings):
    settings.API_AUTH_FAILURE_LIMIT = 100
    token = make_token(allowed_networks=["198.51.100.0/24", "2001:db8::/32"])
    for method, path, body in [*every_request(two_domains), *(("GET", path, None) for path in LISTS)]:
        response = Api(token, address="192.0.2.10").call(method, path, body)
        assert (path, response.status_code, response.json()["code"]) == (path, 403, "outside_networks")
    unchanged(two_domains)
    assert Api(token, address="198.51.100.7").get("mailboxes/bob@b.test").status_code == 200
    assert Api(token, address="2001:db8::1").get("mailboxes/bob@b.test").status_code == 200


def test_the_forwarded_address_counts_only_behind_a_trusted_proxy(two_domains, settings):
    token = make_token(allowed_networks=["198.51.100.0/24"])
    forwarded = {"HTTP_X_FORWARDED_FOR": "198.51.100.7"}
    assert Api(token, address="10.0.0.1").call("GET", "domains/", **forwarded).status_code == 403
    settings.API_TRUSTED_PROXIES = ["10.0.0.0/8"]
    assert Api(token, address="10.0.0.1").call("GET", "domains/", **forwarded).status_code == 200
    spoofed = {"HTTP_X_FORWARDED_FOR": "198.51.100.7, 203.0.113.9"}
    assert Api(token, address="10.0.0.1").call("GET", "domains/", **spoofed).status_code == 403


def test_a_domain_token_cannot_change_an_operator_setting_of_its_domain(two_domains):
    api = Api(make_token("a.test"))
    response = api.patch("domains/a.test", {"max_mailboxes": 3})
    assert (response.status_code, response.json()["code"]) == (403, "not_permitted")
    assert api.patch("domains/a.test", {"quota_warning_percents": [70, 90]}).json()[
        "quota_warning_percents"
    ] == [70, 90]


def test_last_use_is_written_once_a_minute_at_most(two_domains):
    token = make_token()
    prefix = token[4:12]
    assert Api(token, address="198.51.100.1").get("domains/").status_code == 200
    first = ApiToken.objects.get(prefix=prefix)
    assert first.last_used_from == "198.51.100.1"
    Api(token, address="198.51.100.2").get("domains/")
    assert ApiToken.objects.get(prefix=prefix).last_used_from == "198.51.100.1"
    ApiToken.objects.filter(prefix=prefix).update(last_used_at=timezone.now() - timedelta(seconds=61))
    Api(token, address="198.51.100.2").get("domains/")
    assert ApiToken.objects.get(prefix=prefix).last_used_from == "198.51.100.2"


def test_failed_authentications_are_recorded_without_the_token(two_domains):
    token = make_token()
    Api(token[:-4] + "abcd", address="203.0.113.5").get("domains/")
    [failure] = AuthFailure.objects.all()
    assert (failure.mechanism, failure.reason, failure.username, failure.source, failure.penalised) == (
        "bearer",
        "wrong token",
        token[4:12],
        "203.0.113.5",
        False,
    )


def test_a_use_from_outside_the_networks_is_recorded_and_counts_to_the_limit(two_domains, settings):
    """A token used from elsewhere may have leaked: the operator sees it, and its user is slowed."""
    settings.API_AUTH_FAILURE_LIMIT = 2
    token = make_token(allowed_networks=["198.51.100.0/24"])
    elsewhere = Api(token, address="192.0.2.10")
    assert [elsewhere.get("domains/").status_code for _ in range(3)] == [403, 403, 429]
    failures = AuthFailure.objects.values_list("reason", "username", "source", "mechanism")
    assert list(failures) == [("outside networks", token[4:12], "192.0.2.10", "bearer")] * 2
    assert Api(token, address="198.51.100.7").get("domains/").status_code == 200


def test_a_flood_of_bad_tokens_from_one_source_is_throttled_while_another_is_served(two_domains, settings):
    settings.API_AUTH_FAILURE_LIMIT = 3
    settings.API_AUTH_FAILURE_WINDOW = 300
    good = make_token()
    flood = Api("mat_00000000_guess", address="203.0.113.5")
    statuses = [flood.get("domains/").status_code for _ in range(6)]
    assert statuses == [401, 401, 401, 429, 429, 429]
    throttled = flood.get("domains/")
    assert throttled.json()["code"] == "throttled"
    assert 1 <= int(throttled["Retry-After"]) <= 300
    assert AuthFailure.objects.filter(source="203.0.113.5").count() == 3
    assert Api("mat_00000000_guess", address="198.51.100.9").get("domains/").status_code == 401
    assert Api(good, address="198.51.100.9").get("domains/").status_code == 200


def test_the_limit_lifts_when_old_failures_leave_the_window(two_domains, settings):
    settings.API_AUTH_FAILURE_LIMIT = 2
    flood = Api("mat_00000000_guess", address="203.0.113.5")
    flood.get("domains/"), flood.get("domains/")
    assert flood.get("domains/").status_code == 429
    AuthFailure.objects.update(
        created_at=timezone.now() - timedelta(seconds=settings.API_AUTH_FAILURE_WINDOW)
    )
    assert flood.get("domains/").status_code == 401


def test_only_an_operator_of_every_domain_makes_a_token_for_every_domain(two_domains, django_user_model):
    services.save_domain_administrator(Actor.cli(), "ann", ["a.test"], "long enough password 1")
    ann = Actor.for_user(django_user_model.objects.get(username="ann"))
    with pytest.raises(services.NotPermitted):
        services.create_token(ann)
    with pytest.raises(services.OutOfScope):
        services.create_token(ann, domain_names=["b.test"])
    made = services.create_token(ann, domain_names=["a.test"], scope="write")
    assert made.secret.startswith(f"mat_{made.token.prefix}_")
    assert made.token.digest != made.secret and made.secret not in made.token.digest
    assert list(services.tokens_visible_to(ann)) == [made.token]


def test_tokens_refuse_bad_networks_scopes_and_expiry():
    with pytest.raises(store.InvalidInput) as network:
        services.create_token(Actor.cli(), allowed_networks=["300.1.2.3/8"])
    with pytest.raises(store.InvalidInput) as scope:
        services.create_token(Actor.cli(), scope="admin")
    with pytest.raises(store.InvalidInput) as expiry:
        services.create_token(Actor.cli(), expires_days=0)
    assert (network.value.field, scope.value.field, expiry.value.field) == (
        "allowed_networks",
        "scope",
        "expires_days",
    )
    assert ApiToken.objects.count() == 0
