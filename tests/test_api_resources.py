"""The API's resources: create-or-update and partial updates, validation errors by field,
lists with filters and pages, kicks, imports all or nothing, Idempotency-Key, the audit trail
and the schema."""

import base64
import hashlib

import pytest
import yaml
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import check_password
from django.utils import timezone
from openapi_spec_validator import validate

from mailadmin.api.models import IdempotencyRecord
from mailadmin.hosting import aliases, services
from mailadmin.hosting.actors import Actor
from mailadmin.models import Alias, AliasDomain, AuditEntry, Domain, Mailbox
from tests.api_helpers import PASSWORD, PASSWORD_HASH, Api, make_token
from tests.conftest import open_session_row

pytestmark = pytest.mark.django_db

CLIENT = "198.51.100.20"


@pytest.fixture
def api(make_mailbox) -> Api:
    """A write token for example.test (which exists, empty) from CLIENT."""
    services.create_domain(Actor.cli(), "example.test", default_mailbox_quota_bytes=5000)
    return Api(make_token("example.test"), address=CLIENT)


def login_works(address: str, password: str) -> bool:
    """Whether the password checks, leaving the stored hash as it is (no upgrade)."""
    return check_password(password, stored_hash(address))


# --- Mailboxes -------------------------------------------------------------------------------


def test_the_same_put_twice_creates_then_updates_to_the_same_state(api):
    body = {"password_hash": PASSWORD_HASH, "quota_bytes": 10_000, "quota_messages": 50, "active": True}
    first = api.put("mailboxes/Carol@Example.test", body)
    second = api.put("mailboxes/carol@example.test", body)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json() == second.json()
    assert first.json() == {
        "address": "carol@example.test",
        "domain": "example.test",
        "quota_bytes": 10_000,
        "quota_messages": 50,
        "used_bytes": 0,
        "used_messages": 0,
        "active": True,
        "last_login": None,
        "created": first.json()["created"],
    }
    assert Mailbox.objects.count() == 1
    assert login_works("carol@example.test", PASSWORD)
    assert stored_hash("carol@example.test") == PASSWORD_HASH
    assert mailbox_actions("carol@example.test") == ["create"]


def test_a_repeated_put_with_a_plain_password_writes_no_new_hash(api):
    """Re-running the call must not change the state: a new hash (a new salt) would end the
    mailbox's open sessions and audit a password change that is none."""
    body = {"password": "a fine long passphrase", "quota_bytes": 7000}
    assert api.put("mailboxes/fay@example.test", body).status_code == 201
    first_hash = stored_hash("fay@example.test")
    assert api.put("mailboxes/fay@example.test", body).status_code == 200
    assert stored_hash("fay@example.test") == first_hash
    assert mailbox_actions("fay@example.test") == ["create"]
    changed = api.put("mailboxes/fay@example.test", {"password": "another long passphrase"})
    assert changed.status_code == 200
    assert stored_hash("fay@example.test") != first_hash
    assert login_works("fay@example.test", "another long passphrase")
    assert mailbox_actions("fay@example.test") == ["create", "set password"]


def test_a_repeated_put_of_a_hash_the_first_login_upgraded_changes_nothing(api):
    """A provisioning system re-sends the hash it moved over; the login has replaced it with
    argon2 meanwhile. Writing the old hash back would end the sessions on every re-run."""
    salt = b"8bytesal"
    ssha = "{SSHA}" + base64.b64encode(hashlib.sha1(PASSWORD.encode() + salt).digest() + salt).decode()
    assert api.put("mailboxes/moved@example.test", {"password_hash": ssha}).status_code == 201
    user = get_user_model().objects.get(username="moved@example.test")
    assert user.check_password(PASSWORD)  # the login's upgrade, as runpop3's backend makes it
    upgraded = stored_hash("moved@example.test")
    assert upgraded.startswith("argon2$")
    assert (
        api.put("mailboxes/moved@example.test", {"password_hash": ssha, "quota_bytes": 9}).status_code == 200
    )
    assert stored_hash("moved@example.test") == upgraded
    assert mailbox_actions("moved@example.test") == ["create", "update"]
    other = "{SSHA}" + base64.b64encode(hashlib.sha1(b"another" + salt).digest() + salt).decode()
    assert api.put("mailboxes/moved@example.test", {"password_hash": other}).status_code == 200
    assert login_works("moved@example.test", "another")
    assert mailbox_actions("moved@example.test") == ["create", "update", "set password"]


def stored_hash(address: str) -> str:
    return get_user_model().objects.get(username=address).password


def mailbox_actions(address: str) -> list[str]:
    entries = AuditEntry.objects.filter(object_name=address).order_by("id")
    return list(entries.values_list("action", flat=True))


def test_put_takes_a_dovecot_hash_as_imports_do(api):
    salt = b"8bytesal"
    ssha = "{SSHA}" + base64.b64encode(hashlib.sha1(PASSWORD.encode() + salt).digest() + salt).decode()
    assert api.put("mailboxes/dove@example.test", {"password_hash": ssha}).status_code == 201
    assert login_works("dove@example.test", PASSWORD)
    assert not login_works("dove@example.test", "not the password")


def test_put_with_a_plain_password_hashes_it_and_never_shows_it(api):
    response = api.put("mailboxes/dave@example.test", {"password": "a fine long passphrase"})
    assert response.status_code == 201
    assert "password" not in response.json() and "password_hash" not in response.json()
    assert response.json()["quota_bytes"] == 5000  # the domain's default
    assert login_works("dave@example.test", "a fine long passphrase")
    assert api.put("mailboxes/dave@example.test", {"password": "another long passphrase"}).status_code == 200
    assert login_works("dave@example.test", "another long passphrase")


def test_a_put_that_creates_needs_a_password(api):
    response = api.put("mailboxes/erin@example.test", {"quota_bytes": 1})
    assert response.status_code == 400
    assert response.json()["fields"] == {"password": ["a new mailbox needs a password or a password hash"]}
    assert not Mailbox.objects.exists()


def test_put_creating_a_disabled_mailbox_leaves_it_disabled(api):
    response = api.put("mailboxes/erin@example.test", {"password_hash": PASSWORD_HASH, "active": False})
    assert (response.status_code, response.json()["active"]) == (201, False)
    assert Mailbox.objects.get().active is False


def test_patch_changes_only_the_fields_named(api):
    api.put(
        "mailboxes/frank@example.test",
        {"password_hash": PASSWORD_HASH, "quota_bytes": 7, "quota_messages": 3},
    )
    response = api.patch("mailboxes/frank@example.test", {"quota_bytes": 9})
    assert response.status_code == 200
    assert (response.json()["quota_bytes"], response.json()["quota_messages"], response.json()["active"]) == (
        9,
        3,
        True,
    )
    assert login_works("frank@example.test", PASSWORD)


def test_patch_never_creates(api):
    response = api.patch("mailboxes/ghost@example.test", {"quota_bytes": 9})
    assert (response.status_code, response.json()["code"]) == (404, "not_found")
    assert not Mailbox.objects.exists()


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"quota_bytes": -1}, {"quota_bytes": ["quota bytes must be between 0 and 9223372036854775807"]}),
        ({"quota_messages": 2**31}, {"quota_messages": ["quota messages must be between 0 and 2147483647"]}),
        ({"quota_bytes": "lots"}, {"quota_bytes": ["A valid integer is required."]}),
        ({"active": "maybe"}, {"active": ["Must be a valid boolean."]}),
        ({"quota": 5}, {"quota": ["Unknown field."]}),
        (
            {"password_hash": "md5$nope"},
            {"password_hash": ["password hash is not in a format the configured hashers accept"]},
        ),
        (
            {"password": "a\x01b long enough"},
            {
                "password": [
                    "password rejected: it contains the control character U+0001, "
                    "which no POP3 client can send"
                ]
            },
        ),
        (
            {"password": "x", "password_hash": PASSWORD_HASH},
            {"password_hash": ["give a password or a password hash, not both"]},
        ),
    ],
)
def test_validation_errors_name_their_fields(api, body, fields):
    api.put("mailboxes/hana@example.test", {"password_hash": PASSWORD_HASH})
    response = api.patch("mailboxes/hana@example.test", body)
    assert response.status_code == 400
    assert (response.json()["code"], response.json()["fields"]) == ("invalid", fields)
    mailbox = Mailbox.objects.get()
    assert (mailbox.quota_bytes, mailbox.quota_messages, mailbox.active) == (5000, 0, True)


def test_a_body_that_is_not_json_is_a_json_error(api):
    response = api.call("PUT", "mailboxes/ivy@example.test", b"{nope", content_type="application/json")
    assert (response.status_code, response.json()["code"]) == (400, "parse_error")


def test_a_body_over_the_limit_is_refused_before_it_is_parsed(api, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    rows = [{"address": f"u{n}@example.test", "password_hash": PASSWORD_HASH} for n in range(2)]
    response = api.post("mailboxes/import", rows)
    assert (response.status_code, response.json()["code"]) == (413, "body_too_large")
    assert not Mailbox.objects.exists()


def test_the_last_login_comes_from_the_mailbox_row(api):
    api.put("mailboxes/jo@example.test", {"password_hash": PASSWORD_HASH})
    moment = timezone.now().replace(microsecond=0)
    Mailbox.objects.filter(user__username="jo@example.test").update(
        last_login_at=moment, last_login_from="203.0.113.4"
    )
    last_login = api.get("mailboxes/jo@example.test").json()["last_login"]
    assert last_login == {"time": moment.isoformat().replace("+00:00", "Z"), "client_address": "203.0.113.4"}


def test_mailbox_lists_filter_and_page(api, make_mailbox):
    for name, quota in [("a", 100), ("b", 100), ("c", 0)]:
        api.put(f"mailboxes/{name}@example.test", {"password_hash": PASSWORD_HASH, "quota_bytes": quota})
    Mailbox.objects.filter(user__username="a@example.test").update(used_bytes=80)
    Mailbox.objects.filter(user__username="b@example.test").update(used_bytes=79)
    api.patch("mailboxes/c@example.test", {"active": False})
    make_mailbox("z@other.test")
    every = Api(make_token(scope="read"))

    def addresses(query: str, client: Api = api) -> list[str]:
        return [row["address"] for row in client.get(f"mailboxes/?{query}").json()["results"]]

    assert addresses("over_percent=80") == ["a@example.test"]
    assert addresses("active=false") == ["c@example.test"]
    assert addresses("domain=other.test", every) == ["z@other.test"]
    page = api.get("mailboxes/?page_size=2&page=2").json()
    assert (page["count"], [row["address"] for row in page["results"]]) == (3, ["c@example.test"])
    assert page["previous"].endswith("/api/v1/mailboxes/?page_size=2")


def test_delete_removes_the_mailbox(api):
    api.put("mailboxes/kim@example.test", {"password_hash": PASSWORD_HASH})
    assert api.delete("mailboxes/kim@example.test").status_code == 204
    assert api.get("mailboxes/kim@example.test").status_code == 404


# --- Domains ---------------------------------------------------------------------------------


def test_domains_put_creates_then_updates_and_delete_needs_force_with_mailboxes(make_mailbox):
    api = Api(make_token())
    body = {
        "quota_bytes": 10**9,
        "max_mailboxes": 5,
        "default_mailbox_quota_bytes": 10**6,
        "quota_warning_percents": [90, 75],
        "active": True,
    }
    first, second = api.put("domains/New.test", body), api.put("domains/new.test", body)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json() == {
        "name": "new.test",
        "active": True,
        "quota_bytes": 10**9,
        "max_mailboxes": 5,
        "default_mailbox_quota_bytes": 10**6,
        "quota_warning_percents": [90, 75],
        "used_bytes": 0,
        "mailbox_count": 0,
        "created": first.json()["created"],
    }
    api.put("mailboxes/x@new.test", {"password_hash": PASSWORD_HASH})
    refused = api.delete("domains/new.test")
    assert (refused.status_code, refused.json()["code"]) == (409, "still_in_use")
    assert api.get("domains/new.test").json()["mailbox_count"] == 1
    assert api.delete("domains/new.test?force=true").status_code == 204
    assert not Domain.objects.filter(name="new.test").exists()
    deleted = AuditEntry.objects.filter(action="delete").values_list("object_type", "object_name")
    assert list(deleted.order_by("id")) == [("mailbox", "x@new.test"), ("domain", "new.test")]


def test_a_forced_domain_delete_takes_its_aliases_and_alias_domains_too(make_mailbox):
    api = Api(make_token())
    api.put("domains/gone.test", {})
    api.put("mailboxes/x@gone.test", {"password_hash": PASSWORD_HASH})
    aliases.create_alias(Actor.cli(), "sales@gone.test", ["x@gone.test"])
    aliases.set_catch_all(Actor.cli(), "gone.test", ["x@gone.test"])
    aliases.create_alias_domain(Actor.cli(), "gone.example", "gone.test")
    refused = api.delete("domains/gone.test")
    assert (refused.status_code, refused.json()["code"]) == (409, "still_in_use")
    assert api.delete("domains/Gone.TEST?force=true").status_code == 204  # the name in any case
    assert not Domain.objects.filter(name="gone.test").exists()
    assert (Alias.objects.count(), AliasDomain.objects.count()) == (0, 0)
    deleted = AuditEntry.objects.filter(action="delete").values_list("object_type", "object_name")
    assert list(deleted.order_by("id")) == [
        ("mailbox", "x@gone.test"),
        ("catch-all", "@gone.test"),
        ("alias", "sales@gone.test"),
        ("alias domain", "gone.example"),
        ("domain", "gone.test"),
    ]


def test_a_domain_token_cannot_create_a_domain(make_mailbox):
    make_mailbox("a@a.test")
    response = Api(make_token("a.test")).put("domains/fresh.test", {})
    assert (response.status_code, response.json()["code"]) == (404, "not_found")
    assert not Domain.objects.filter(name="fresh.test").exists()


def test_bad_warning_percentages_are_named(make_mailbox):
    make_mailbox("a@a.test")
    response = Api(make_token("a.test")).patch("domains/a.test", {"quota_warning_percents": [0]})
    assert (response.status_code, response.json()["fields"]) == (
        400,
        {"quota_warning_percents": ["warning percentages must be between 1 and 100"]},
    )


# --- Sessions --------------------------------------------------------------------------------


def test_sessions_list_filters_and_kicks_by_id_and_by_mailbox(api):
    api.put("mailboxes/lea@example.test", {"password_hash": PASSWORD_HASH})
    api.put("mailboxes/max@example.test", {"password_hash": PASSWORD_HASH})
    lea = Mailbox.objects.get(user__username="lea@example.test")
    maxi = Mailbox.objects.get(user__username="max@example.test")
    one, two = open_session_row(lea, peer_host="203.0.113.1"), open_session_row(maxi, peer_host="203.0.113.2")
    open_session_row(lea, ended_at=timezone.now(), end_reason="quit")
    listed = api.get("sessions/?open=true&mailbox=lea@example.test").json()
    assert [row["id"] for row in listed["results"]] == [str(one.pk)]
    assert listed["results"][0]["client_address"] == "203.0.113.1"
    assert api.get("sessions/?client_address=203.0.113.2").json()["results"][0]["id"] == str(two.pk)
    assert api.post(f"sessions/{two.pk}/kick").json() == {"kicked": 1}
    assert api.post("mailboxes/lea@example.test/kick").json() == {"kicked": 1}
    assert api.post("mailboxes/lea@example.test/kick").json() == {"kicked": 0}
    one.refresh_from_db(), two.refresh_from_db()
    assert one.kick_requested_at is not None and two.kick_requested_at is not None


# --- Import ----------------------------------------------------------------------------------


def csv_body(*rows: str) -> str:
    return "address,password,password_hash,quota\n" + "".join(f"{row}\n" for row in rows)


def test_csv_import_creates_every_row(api):
    body = csv_body(f'a@example.test,,"{PASSWORD_HASH}",10M', f'b@example.test,,"{PASSWORD_HASH}",')
    response = api.call("POST", "mailboxes/import", body, content_type="text/csv")
    assert (response.status_code, response.json()) == (
        201,
        {"dry_run": False, "count": 2, "addresses": ["a@example.test", "b@example.test"]},
    )
    quotas = dict(Mailbox.objects.values_list("user__username", "quota_bytes"))
    assert quotas == {"a@example.test": 10 * 1024**2, "b@example.test": 5000}


def test_csv_import_is_all_or_nothing_and_names_the_line(api):
    body = csv_body(f'a@example.test,,"{PASSWORD_HASH}",', f'b@nowhere.test,,"{PASSWORD_HASH}",')
    response = api.call("POST", "mailboxes/import", body, content_type="text/csv")
    assert response.status_code == 404
    assert (response.json()["row"], response.json()["detail"]) == (
        3,
        "line 3: not permitted: nowhere.test is not a domain you administer",
    )
    assert not Mailbox.objects.exists()


def test_json_import_is_all_or_nothing_and_names_the_row(api):
    rows = [
        {"address": "a@example.test", "password_hash": PASSWORD_HASH},
        {"address": "b@example.test", "password_hash": PASSWORD_HASH, "quota_bytes": -5},
    ]
    response = api.post("mailboxes/import", rows)
    assert response.status_code == 400
    assert response.json() == {
        "code": "invalid",
        "detail": "row 2: quota_bytes must be a whole number, 0 or more",
        "fields": {"quota_bytes": ["row 2: quota_bytes must be a whole number, 0 or more"]},
        "row": 2,
    }
    rows[1]["quota_bytes"] = 100
    rows.append({"address": "a@example.test", "password_hash": PASSWORD_HASH})
    duplicate = api.post("mailboxes/import", rows).json()
    assert (duplicate["row"], duplicate["detail"]) == (3, "row 3: a@example.test is already in row 1")
    assert not Mailbox.objects.exists()


def test_json_import_dry_run_writes_nothing(api):
    rows = [{"address": "a@example.test", "password": "a fine long passphrase"}]
    response = api.post("mailboxes/import?dry_run=true", rows)
    assert (response.status_code, response.json()) == (
        200,
        {"dry_run": True, "count": 1, "addresses": ["a@example.test"]},
    )
    assert not Mailbox.objects.exists() and not AuditEntry.objects.filter(object_type="mailbox").exists()
    assert api.post("mailboxes/import", rows).status_code == 201
    assert login_works("a@example.test", "a fine long passphrase")


# --- Idempotency-Key -------------------------------------------------------------------------


def test_the_same_idempotency_key_replays_the_first_answer(api):
    rows = [{"address": "a@example.test", "password_hash": PASSWORD_HASH}]
    first = api.post("mailboxes/import", rows, HTTP_IDEMPOTENCY_KEY="order-17")
    again = api.post("mailboxes/import", rows, HTTP_IDEMPOTENCY_KEY="order-17")
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    assert (first.get("Idempotent-Replayed"), again["Idempotent-Replayed"]) == (None, "true")
    assert AuditEntry.objects.filter(action="create", object_type="mailbox").count() == 1
    without_key = api.post("mailboxes/import", rows)
    assert (without_key.status_code, without_key.json()["code"]) == (409, "already_exists")


def test_an_idempotency_key_replays_an_error_too(api):
    rows = [{"address": "a@nowhere.test", "password_hash": PASSWORD_HASH}]
    first = api.post("mailboxes/import", rows, HTTP_IDEMPOTENCY_KEY="k1")
    again = api.post("mailboxes/import", rows, HTTP_IDEMPOTENCY_KEY="k1")
    assert (first.status_code, again.status_code, again.json()) == (404, 404, first.json())


def test_the_same_key_with_another_body_is_refused(api):
    api.post(
        "mailboxes/import",
        [{"address": "a@example.test", "password_hash": PASSWORD_HASH}],
        HTTP_IDEMPOTENCY_KEY="k2",
    )
    other = api.post(
        "mailboxes/import",
        [{"address": "b@example.test", "password_hash": PASSWORD_HASH}],
        HTTP_IDEMPOTENCY_KEY="k2",
    )
    assert (other.status_code, other.json()["code"]) == (422, "idempotency_key_reused")
    assert list(Mailbox.objects.values_list("user__username", flat=True)) == ["a@example.test"]


def test_keys_belong_to_their_token_and_lapse_after_a_day(api):
    api.put("mailboxes/a@example.test", {"password_hash": PASSWORD_HASH})
    open_session_row(Mailbox.objects.get())
    assert api.post("mailboxes/a@example.test/kick", HTTP_IDEMPOTENCY_KEY="k3").json() == {"kicked": 1}
    other_token = Api(make_token("example.test"))
    assert other_token.post("mailboxes/a@example.test/kick", HTTP_IDEMPOTENCY_KEY="k3").json() == {
        "kicked": 0
    }
    IdempotencyRecord.objects.update(created_at=timezone.now() - timezone.timedelta(hours=24, seconds=1))
    replay = api.post("mailboxes/a@example.test/kick", HTTP_IDEMPOTENCY_KEY="k3")
    assert (replay.json(), replay.get("Idempotent-Replayed")) == ({"kicked": 0}, None)


# --- Audit -----------------------------------------------------------------------------------


def test_api_changes_are_audited_as_the_token_from_the_client_address(api):
    api.put("mailboxes/nia@example.test", {"password_hash": PASSWORD_HASH, "quota_bytes": 1})
    api.patch("mailboxes/nia@example.test", {"quota_bytes": 2, "password": "a fine long passphrase"})
    entries = api.get("audit/?domain=example.test&object_type=mailbox").json()["results"]
    prefix = api.token[4:12]
    assert [
        (entry["action"], entry["actor_kind"], entry["actor"], entry["client_address"]) for entry in entries
    ] == [
        ("create", "token", f"token:{prefix} test", CLIENT),
        ("update", "token", f"token:{prefix} test", CLIENT),
        ("set password", "token", f"token:{prefix} test", CLIENT),
    ]
    assert entries[1]["changes"] == {"quota_bytes": [1, 2]}
    assert entries[2]["changes"] == {"password": "changed"}


# --- Schema and documentation ----------------------------------------------------------------


def test_the_schema_validates_and_names_every_endpoint(client):
    response = client.get("/api/v1/schema/")
    assert response.status_code == 200
    schema = yaml.safe_load(response.content)
    validate(schema)
    assert set(schema["paths"]) >= {
        "/api/v1/mailboxes/",
        "/api/v1/mailboxes/{address}/",
        "/api/v1/mailboxes/{address}/kick/",
        "/api/v1/mailboxes/import/",
        "/api/v1/domains/",
        "/api/v1/domains/{name}/",
        "/api/v1/aliases/",
        "/api/v1/aliases/{source}/",
        "/api/v1/sessions/",
        "/api/v1/sessions/{id}/",
        "/api/v1/sessions/{id}/kick/",
        "/api/v1/audit/",
        "/api/v1/audit/{id}/",
    }
    assert set(schema["paths"]["/api/v1/mailboxes/{address}/"]) >= {"get", "put", "patch", "delete"}
    assert set(schema["paths"]["/api/v1/aliases/{source}/"]) >= {"get", "put", "patch", "delete"}
    alias = schema["components"]["schemas"]["Alias"]["properties"]
    assert set(alias) == {
        "source",
        "domain",
        "destinations",
        "active",
        "catch_all",
        "received_last_30_days",
        "created",
    }
    assert schema["components"]["securitySchemes"]["bearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A token from createtoken or the admin.",
    }


@pytest.mark.parametrize("path", ["/api/v1/docs/", "/api/v1/docs/swagger/"])
def test_the_documentation_pages_load_their_scripts_from_our_static_files(client, path):
    page = client.get(path).content.decode()
    assert "/static/drf_spectacular_sidecar/" in page
    assert "cdn" not in page.lower() and "unpkg" not in page.lower()
