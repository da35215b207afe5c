"""The API's list filters and pages on domains, sessions and the audit log, token expiry from
createtoken and the admin, the methods of every schema path, and mailbox PUTs and imports."""

import base64
import hashlib
import io
import json
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import check_password
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from mailadmin.api.models import ApiToken
from mailadmin.hosting import aliases, services
from mailadmin.hosting.actors import Actor
from mailadmin.models import AuditEntry, Mailbox
from tests.api_helpers import PASSWORD, PASSWORD_HASH, Api, make_token
from tests.conftest import open_session_row

pytestmark = pytest.mark.django_db

CLIENT = "198.51.100.30"
BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def names(api: Api, path: str, key: str) -> list[str]:
    response = api.get(path)
    assert response.status_code == 200, response.content
    return [row[key] for row in response.json()["results"]]


def page_of(api: Api, path: str, key: str) -> tuple[int, list[str], str | None, str | None]:
    """The count, the rows' ``key``s, and the next and previous links of one page."""
    page = api.get(path).json()
    return page["count"], [row[key] for row in page["results"]], page["next"], page["previous"]


def stored_hash(address: str) -> str:
    return get_user_model().objects.get(username=address).password


def dovecot_ssha(password: str) -> str:
    salt = b"8bytesal"
    return "{SSHA}" + base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


# --- Domains ---------------------------------------------------------------------------------


@pytest.fixture
def operator() -> Api:
    """A write token for every domain."""
    return Api(make_token(), address=CLIENT)


def test_the_domain_list_filters_by_active(operator):
    for name in ["a.test", "b.test", "c.test"]:
        assert operator.put(f"domains/{name}", {}).status_code == 201
    assert operator.patch("domains/b.test", {"active": False}).status_code == 200
    assert names(operator, "domains/?active=true", "name") == ["a.test", "c.test"]
    assert names(operator, "domains/?active=false", "name") == ["b.test"]
    assert names(operator, "domains/", "name") == ["a.test", "b.test", "c.test"]


def test_the_domain_list_takes_1_and_0_for_active(operator):
    for name in ["a.test", "b.test"]:
        operator.put(f"domains/{name}", {})
    operator.patch("domains/b.test", {"active": False})
    assert names(operator, "domains/?active=1", "name") == ["a.test"]
    assert names(operator, "domains/?active=0", "name") == ["b.test"]


def test_the_domain_list_refuses_an_active_value_that_is_not_a_boolean(operator):
    operator.put("domains/a.test", {})
    response = operator.get("domains/?active=maybe")
    body = response.json()
    assert (response.status_code, body.get("code"), sorted(body.get("fields", {}))) == (
        400,
        "invalid",
        ["active"],
    )


def test_the_domain_list_pages(operator):
    for name in ["a.test", "b.test", "c.test", "d.test", "e.test"]:
        operator.put(f"domains/{name}", {})
    base = "http://testserver/api/v1/domains/"
    assert page_of(operator, "domains/?page_size=2", "name") == (
        5,
        ["a.test", "b.test"],
        f"{base}?page=2&page_size=2",
        None,
    )
    assert page_of(operator, "domains/?page_size=2&page=2", "name") == (
        5,
        ["c.test", "d.test"],
        f"{base}?page=3&page_size=2",
        f"{base}?page_size=2",
    )
    assert page_of(operator, "domains/?page_size=2&page=3", "name") == (
        5,
        ["e.test"],
        None,
        f"{base}?page=2&page_size=2",
    )
    assert page_of(operator, "domains/?active=true&page_size=4&page=2", "name") == (
        5,
        ["e.test"],
        None,
        f"{base}?active=true&page_size=4",
    )
    assert page_of(operator, "domains/", "name") == (
        5,
        ["a.test", "b.test", "c.test", "d.test", "e.test"],
        None,
        None,
    )
    beyond = operator.get("domains/?page_size=2&page=4")
    assert (beyond.status_code, beyond.json()) == (404, {"code": "not_found", "detail": "Invalid page."})


# --- Sessions --------------------------------------------------------------------------------


def at(minutes: int) -> datetime:
    return BASE + timedelta(minutes=minutes)


def when(moment: datetime) -> str:
    return moment.isoformat()


@pytest.fixture
def sessions(make_mailbox) -> dict[str, str]:
    """Five sessions by name: ``lost`` (no mailbox) before BASE, then ``ann1`` (example.test, ended)
    at BASE, ``bo1`` (other.test, ended) an hour later, ``ann2`` (open) two hours later and
    ``bo2`` (open) three hours later."""
    ann, bo = make_mailbox("ann@example.test"), make_mailbox("bo@other.test")
    rows = {
        "lost": open_session_row(
            username="nobody@nowhere.test", started_at=at(-30), ended_at=at(-29), end_reason="quit"
        ),
        "ann1": open_session_row(ann, started_at=at(0), ended_at=at(5), end_reason="quit"),
        "bo1": open_session_row(bo, started_at=at(60), ended_at=at(65), end_reason="quit"),
        "ann2": open_session_row(ann, started_at=at(120)),
        "bo2": open_session_row(bo, started_at=at(180)),
    }
    return {name: str(row.pk) for name, row in rows.items()}


@pytest.fixture
def reader() -> Api:
    """A read token for every domain."""
    return Api(make_token(scope="read"))


def session_names(api: Api, ids: dict[str, str], **query) -> list[str]:
    by_id = {value: name for name, value in ids.items()}
    return [by_id[row_id] for row_id in names(api, f"sessions/?{urlencode(query)}", "id")]


def test_the_session_list_filters_by_domain(sessions, reader):
    assert session_names(reader, sessions) == ["bo2", "ann2", "bo1", "ann1", "lost"]
    assert session_names(reader, sessions, domain="example.test") == ["ann2", "ann1"]
    assert session_names(reader, sessions, domain="other.test") == ["bo2", "bo1"]
    assert session_names(reader, sessions, domain="nowhere.test") == []


def test_a_domain_token_filtering_sessions_by_another_domain_gets_none(sessions):
    assert session_names(Api(make_token("example.test", scope="read")), sessions, domain="other.test") == []


def test_the_session_list_filters_by_start_since_inclusive_and_until_exclusive(sessions, reader):
    assert session_names(reader, sessions, since=when(at(60))) == ["bo2", "ann2", "bo1"]
    assert session_names(reader, sessions, since=when(at(61))) == ["bo2", "ann2"]
    assert session_names(reader, sessions, until=when(at(120))) == ["bo1", "ann1", "lost"]
    assert session_names(reader, sessions, until=when(at(0))) == ["lost"]
    assert session_names(reader, sessions, since=when(at(60)), until=when(at(180))) == ["ann2", "bo1"]
    assert session_names(reader, sessions, since="2026-03-01T14:00:00+02:00") == [
        "bo2",
        "ann2",
        "bo1",
        "ann1",
    ]
    assert session_names(reader, sessions, until="2026-03-01T12:00:00Z") == ["lost"]


def test_the_session_list_combines_domain_time_and_open_filters(sessions, reader, settings):
    settings.TIME_ZONE = "UTC"
    assert session_names(reader, sessions, domain="example.test", since=when(at(1))) == ["ann2"]
    assert session_names(reader, sessions, domain="other.test", until=when(at(180))) == ["bo1"]
    assert session_names(reader, sessions, domain="example.test", open="false", since=when(at(-60))) == [
        "ann1"
    ]
    only = reader.get(
        f"sessions/?{urlencode({'domain': 'other.test', 'since': when(at(30)), 'open': 'false'})}"
    )
    assert only.json()["results"] == [
        {
            "id": sessions["bo1"],
            "mailbox": "bo@other.test",
            "domain": "other.test",
            "client_address": "192.0.2.1",
            "client_port": 1,
            "server": "n:1",
            "implicit_tls": False,
            "tls_version": "",
            "started": "2026-03-01T13:00:00Z",
            "authenticated": None,
            "ended": "2026-03-01T13:05:00Z",
            "end_reason": "quit",
            "kick_requested": None,
            "retr_count": 0,
            "retr_bytes": 0,
            "deleted_count": 0,
            "deleted_bytes": 0,
            "bytes_in": 0,
            "bytes_out": 0,
        }
    ]


@pytest.mark.parametrize("name", ["since", "until"])
def test_a_session_time_filter_that_is_not_a_time_is_refused(sessions, reader, name):
    response = reader.get(f"sessions/?{name}=yesterday")
    assert (response.status_code, response.json()) == (
        400,
        {
            "code": "invalid",
            "detail": "Some fields are not valid.",
            "fields": {name: ["Enter a valid date/time."]},
        },
    )


def test_the_session_list_pages(sessions, reader):
    base = "http://testserver/api/v1/sessions/"
    by_id = {value: name for name, value in sessions.items()}

    def page(query: str) -> tuple[int, list[str], str | None, str | None]:
        count, ids, following, preceding = page_of(reader, f"sessions/?{query}", "id")
        return count, [by_id[row_id] for row_id in ids], following, preceding

    assert page("page_size=2") == (5, ["bo2", "ann2"], f"{base}?page=2&page_size=2", None)
    assert page("page_size=2&page=2") == (
        5,
        ["bo1", "ann1"],
        f"{base}?page=3&page_size=2",
        f"{base}?page_size=2",
    )
    assert page("page_size=2&page=3") == (5, ["lost"], None, f"{base}?page=2&page_size=2")
    assert page("domain=example.test&page_size=1") == (
        2,
        ["ann2"],
        f"{base}?domain=example.test&page=2&page_size=1",
        None,
    )
    assert page("domain=example.test&page_size=1&page=2") == (
        2,
        ["ann1"],
        None,
        f"{base}?domain=example.test&page_size=1",
    )


# --- Audit -----------------------------------------------------------------------------------


@pytest.fixture
def audit_log() -> dict[str, object]:
    """Eight entries a minute apart from BASE: two domains and three tokens made on the command
    line, then a mailbox created and updated by an example.test token and one created by an
    other.test token. Returns the read token's client, the two domain tokens' actor names and
    each entry as (action, object_type, object)."""
    cli = Actor.cli()
    services.create_domain(cli, "example.test")
    services.create_domain(cli, "other.test")
    reading, writing_a, writing_b = (
        make_token(scope="read"),
        make_token("example.test"),
        make_token("other.test"),
    )
    first, second = Api(writing_a, address=CLIENT), Api(writing_b, address=CLIENT)
    assert first.put("mailboxes/a@example.test", {"password_hash": PASSWORD_HASH}).status_code == 201
    assert first.patch("mailboxes/a@example.test", {"quota_bytes": 9}).status_code == 200
    assert second.put("mailboxes/b@other.test", {"password_hash": PASSWORD_HASH}).status_code == 201
    for minute, pk in enumerate(AuditEntry.objects.order_by("id").values_list("id", flat=True)):
        AuditEntry.objects.filter(pk=pk).update(created_at=at(minute))
    prefixes = [secret[4:12] for secret in (reading, writing_a, writing_b)]
    return {
        "reader": Api(reading),
        "token_a": Api(writing_a),
        "cli": cli.name,
        "actor_a": f"token:{prefixes[1]} test",
        "actor_b": f"token:{prefixes[2]} test",
        "entries": [
            ("create", "domain", "example.test"),
            ("create", "domain", "other.test"),
            ("create", "api token", prefixes[0]),
            ("create", "api token", prefixes[1]),
            ("create", "api token", prefixes[2]),
            ("create", "mailbox", "a@example.test"),
            ("update", "mailbox", "a@example.test"),
            ("create", "mailbox", "b@other.test"),
        ],
    }


def audited(api: Api, **query) -> list[tuple[str, str, str]]:
    response = api.get(f"audit/?{urlencode(query)}")
    assert response.status_code == 200, response.content
    return [(row["action"], row["object_type"], row["object"]) for row in response.json()["results"]]


def test_the_audit_list_filters_by_actor(audit_log):
    reader, entries = audit_log["reader"], audit_log["entries"]
    assert audited(reader) == entries
    assert audited(reader, actor=audit_log["actor_a"]) == entries[5:7]
    assert audited(reader, actor=audit_log["actor_b"]) == entries[7:]
    assert audited(reader, actor=audit_log["cli"]) == entries[:5]
    assert audited(reader, actor="token:") == []


def test_the_audit_list_filters_by_action_and_object_type(audit_log):
    reader, entries = audit_log["reader"], audit_log["entries"]
    assert audited(reader, action="update") == [entries[6]]
    assert audited(reader, action="create", object_type="mailbox") == [entries[5], entries[7]]
    assert audited(reader, object_type="api token") == entries[2:5]
    assert audited(reader, action="delete") == []


def test_the_audit_list_filters_by_domain(audit_log):
    reader, entries = audit_log["reader"], audit_log["entries"]
    assert audited(reader, domain="example.test") == [entries[0], entries[3], entries[5], entries[6]]
    assert audited(reader, domain="other.test") == [entries[1], entries[4], entries[7]]


def test_the_audit_list_filters_by_time_since_inclusive_and_until_exclusive(audit_log):
    reader, entries = audit_log["reader"], audit_log["entries"]
    assert audited(reader, since=when(at(5))) == entries[5:]
    assert audited(reader, until=when(at(2))) == entries[:2]
    assert audited(reader, since=when(at(3)), until=when(at(6))) == entries[3:6]
    assert audited(reader, since="2026-03-01T14:07:00+02:00") == entries[7:]
    assert audited(reader, since=when(at(8))) == []


def test_the_audit_list_combines_filters(audit_log):
    reader, entries = audit_log["reader"], audit_log["entries"]
    assert audited(reader, domain="example.test", actor=audit_log["cli"], since=when(at(1))) == [entries[3]]
    assert audited(reader, actor=audit_log["actor_a"], action="create", until=when(at(6))) == [entries[5]]
    assert audited(reader, object_type="mailbox", domain="other.test", since=when(at(7))) == [entries[7]]


def test_a_domain_token_filters_only_its_own_domains_audit_entries(audit_log):
    token_a, entries = audit_log["token_a"], audit_log["entries"]
    assert audited(token_a, actor=audit_log["cli"]) == [entries[0], entries[3]]
    assert audited(token_a, actor=audit_log["actor_b"]) == []
    assert audited(token_a, domain="other.test") == []


@pytest.mark.parametrize("name", ["since", "until"])
def test_an_audit_time_filter_that_is_not_a_time_is_refused(audit_log, name):
    response = audit_log["reader"].get(f"audit/?{name}=2026-13-01")
    assert (response.status_code, response.json()["fields"]) == (400, {name: ["Enter a valid date/time."]})


def test_the_audit_list_pages(audit_log):
    reader, entries = audit_log["reader"], audit_log["entries"]
    base = "http://testserver/api/v1/audit/"

    def page(query: str) -> tuple[int, list, str | None, str | None]:
        body = reader.get(f"audit/?{query}").json()
        rows = [(row["action"], row["object_type"], row["object"]) for row in body["results"]]
        return body["count"], rows, body["next"], body["previous"]

    assert page("page_size=3") == (8, entries[:3], f"{base}?page=2&page_size=3", None)
    assert page("page_size=3&page=2") == (
        8,
        entries[3:6],
        f"{base}?page=3&page_size=3",
        f"{base}?page_size=3",
    )
    assert page("page_size=3&page=3") == (8, entries[6:], None, f"{base}?page=2&page_size=3")
    assert page("domain=example.test&page_size=2") == (
        4,
        [entries[0], entries[3]],
        f"{base}?domain=example.test&page=2&page_size=2",
        None,
    )
    assert page("domain=example.test&page_size=2&page=2") == (
        4,
        [entries[5], entries[6]],
        None,
        f"{base}?domain=example.test&page_size=2",
    )


# --- Token expiry ----------------------------------------------------------------------------


def test_createtoken_expires_sets_the_expiry_that_many_days_from_now():
    out = io.StringIO()
    before = timezone.now()
    call_command("createtoken", "--expires", "30", stdout=out)
    after = timezone.now()
    token = ApiToken.objects.get()
    assert before + timedelta(days=30) <= token.expires_at <= after + timedelta(days=30)
    assert out.getvalue().splitlines()[0] == (
        f"created read token {token.prefix} for every domain, "
        f"expires {token.expires_at.isoformat(timespec='seconds')}"
    )
    entry = AuditEntry.objects.get(object_type="api token")
    assert entry.changes["expires"] == [None, token.expires_at.isoformat()]


def test_createtoken_refuses_an_expiry_of_zero_days():
    with pytest.raises(CommandError, match="^a token must be valid for 1 day or more$"):
        call_command("createtoken", "--expires", "0")
    assert not ApiToken.objects.exists()


def add_token(client, **fields):
    form = {"name": "panel", "scope": "read", "domains": [], "expires_days": "", "networks": "", **fields}
    return client.post("/admin/api/apitoken/add/", form)


def test_the_admin_sets_the_expiry_that_many_days_from_now(admin_client):
    before = timezone.now()
    response = add_token(admin_client, expires_days="30")
    after = timezone.now()
    assert response.status_code == 200
    token = ApiToken.objects.get()
    assert before + timedelta(days=30) <= token.expires_at <= after + timedelta(days=30)


def test_the_admin_makes_a_token_without_expiry_when_the_days_are_blank(admin_client):
    assert add_token(admin_client).status_code == 200
    assert ApiToken.objects.get().expires_at is None


def test_the_admin_refuses_an_expiry_of_zero_days(admin_client):
    response = add_token(admin_client, expires_days="0")
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["expires_days"] == [
        "Ensure this value is greater than or equal to 1."
    ]
    assert not ApiToken.objects.exists()


# --- The schema's paths ----------------------------------------------------------------------

EVERY_PATH = {
    "/api/v1/aliases/": {"get"},
    "/api/v1/aliases/{source}/": {"get", "put", "patch", "delete"},
    "/api/v1/audit/": {"get"},
    "/api/v1/audit/{id}/": {"get"},
    "/api/v1/domains/": {"get"},
    "/api/v1/domains/{name}/": {"get", "put", "patch", "delete"},
    "/api/v1/mailboxes/": {"get"},
    "/api/v1/mailboxes/{address}/": {"get", "put", "patch", "delete"},
    "/api/v1/mailboxes/{address}/kick/": {"post"},
    "/api/v1/mailboxes/import/": {"post"},
    "/api/v1/sessions/": {"get"},
    "/api/v1/sessions/{id}/": {"get"},
    "/api/v1/sessions/{id}/kick/": {"post"},
}


def test_every_path_of_the_schema_has_exactly_its_methods(client):
    response = client.get("/api/v1/schema/?format=json")
    assert response.status_code == 200
    paths = json.loads(response.content)["paths"]
    assert {path: set(item) for path, item in paths.items()} == EVERY_PATH


@pytest.fixture
def concrete_paths(make_mailbox) -> dict[str, str]:
    """Each path of the schema with its placeholder filled in by a row that exists."""
    mailbox = make_mailbox("a@example.test")
    aliases.create_alias(Actor.cli(), "sales@example.test", ["a@example.test"])
    session_id = str(open_session_row(mailbox).pk)
    audit_id = str(AuditEntry.objects.order_by("id").first().pk)
    values = {"{address}": "a@example.test", "{name}": "example.test", "{source}": "sales@example.test"}
    concrete = {}
    for path in EVERY_PATH:
        filled = path.replace("{id}", audit_id if path.startswith("/api/v1/audit/") else session_id)
        for placeholder, value in values.items():
            filled = filled.replace(placeholder, value)
        concrete[path] = filled
    return concrete


@pytest.mark.parametrize("path", sorted(EVERY_PATH))
def test_each_path_answers_the_methods_the_schema_gives_it(concrete_paths, path):
    response = Api(make_token()).call("OPTIONS", concrete_paths[path].removeprefix("/api/v1/"))
    assert response.status_code == 200
    allowed = {method.strip().lower() for method in response["Allow"].split(",")}
    extra = {"options", "head"} if "get" in EVERY_PATH[path] else {"options"}
    assert allowed == EVERY_PATH[path] | extra


def test_options_on_a_mailbox_outside_the_token_or_not_there_answers_without_its_actions(make_mailbox):
    make_mailbox("a@example.test")
    make_mailbox("b@other.test")
    api = Api(make_token("example.test"))
    for path in ["mailboxes/nobody@example.test", "mailboxes/b@other.test"]:
        response = api.call("OPTIONS", path)
        assert (path, response.status_code, "actions" in response.json()) == (path, 200, False)
    assert "PUT" in api.call("OPTIONS", "mailboxes/a@example.test").json()["actions"]


def test_the_session_list_refuses_an_open_value_that_is_not_a_boolean(operator):
    response = operator.get("sessions/?open=perhaps")
    assert (response.status_code, response.json()["fields"]) == (400, {"open": ["Give true or false."]})


# --- Mailboxes: PUT without a password, imports ----------------------------------------------


@pytest.fixture
def api() -> Api:
    """A write token for example.test (which exists, empty) from CLIENT."""
    services.create_domain(Actor.cli(), "example.test", default_mailbox_quota_bytes=5000)
    return Api(make_token("example.test"), address=CLIENT)


def mailbox_audit(address: str) -> list[tuple[str, dict]]:
    entries = AuditEntry.objects.filter(object_name=address).order_by("id")
    return list(entries.values_list("action", "changes"))


def test_a_put_without_a_password_updates_only_the_fields_named(api):
    body = {"password_hash": PASSWORD_HASH, "quota_bytes": 7000, "quota_messages": 40}
    created = api.put("mailboxes/pat@example.test", body)
    assert created.status_code == 201
    session = open_session_row(Mailbox.objects.get(user__username="pat@example.test"))
    response = api.put("mailboxes/pat@example.test", {"quota_bytes": 9000})
    assert response.status_code == 200
    assert response.json() == {
        "address": "pat@example.test",
        "domain": "example.test",
        "quota_bytes": 9000,
        "quota_messages": 40,
        "used_bytes": 0,
        "used_messages": 0,
        "active": True,
        "last_login": None,
        "created": created.json()["created"],
    }
    suspended = api.put("mailboxes/pat@example.test", {"active": False})
    assert suspended.status_code == 200
    assert (
        suspended.json()["quota_bytes"],
        suspended.json()["quota_messages"],
        suspended.json()["active"],
    ) == (9000, 40, False)
    assert stored_hash("pat@example.test") == PASSWORD_HASH
    assert check_password(PASSWORD, stored_hash("pat@example.test"))
    assert [action for action, _ in mailbox_audit("pat@example.test")] == ["create", "update", "suspend"]
    assert mailbox_audit("pat@example.test")[1] == ("update", {"quota_bytes": [7000, 9000]})
    session.refresh_from_db()
    assert (session.ended_at, session.kick_requested_at) == (None, None)


def csv_body(*rows: str) -> str:
    return "address,password,password_hash,quota\n" + "".join(f"{row}\n" for row in rows)


def test_a_csv_import_dry_run_answers_what_it_would_create_and_writes_nothing(api):
    body = csv_body(f'a@example.test,,"{PASSWORD_HASH}",10M', "b@example.test,a fine long passphrase,,")
    entries_before = list(AuditEntry.objects.order_by("id").values_list("id", flat=True))
    response = api.call("POST", "mailboxes/import?dry_run=true", body, content_type="text/csv")
    assert (response.status_code, response.json()) == (
        200,
        {"dry_run": True, "count": 2, "addresses": ["a@example.test", "b@example.test"]},
    )
    assert list(Mailbox.objects.all()) == []
    assert list(get_user_model().objects.filter(username__endswith="@example.test")) == []
    assert list(AuditEntry.objects.order_by("id").values_list("id", flat=True)) == entries_before
    real = api.call("POST", "mailboxes/import", body, content_type="text/csv")
    assert (real.status_code, real.json()["addresses"]) == (201, ["a@example.test", "b@example.test"])


def test_a_csv_import_dry_run_refuses_a_bad_line_as_the_import_would(api):
    body = csv_body(f'a@example.test,,"{PASSWORD_HASH}",', f'b@nowhere.test,,"{PASSWORD_HASH}",')
    response = api.call("POST", "mailboxes/import?dry_run=true", body, content_type="text/csv")
    assert (response.status_code, response.json()) == (
        404,
        {
            "code": "not_found",
            "detail": "line 3: not permitted: nowhere.test is not a domain you administer",
            "row": 3,
        },
    )
    assert list(Mailbox.objects.all()) == []


def test_an_import_dry_run_flag_that_is_not_a_boolean_is_refused(api):
    body = csv_body(f'a@example.test,,"{PASSWORD_HASH}",')
    response = api.call("POST", "mailboxes/import?dry_run=maybe", body, content_type="text/csv")
    assert (response.status_code, response.json()["fields"]) == (400, {"dry_run": ["Give true or false."]})
    assert list(Mailbox.objects.all()) == []


@pytest.mark.parametrize("form", ["json", "csv"])
def test_an_import_stores_a_dovecot_ssha_hash_so_the_password_checks(api, form):
    ssha = dovecot_ssha(PASSWORD)
    if form == "json":
        response = api.post("mailboxes/import", [{"address": "dove@example.test", "password_hash": ssha}])
    else:
        body = csv_body(f'dove@example.test,,"{ssha}",')
        response = api.call("POST", "mailboxes/import", body, content_type="text/csv")
    assert (response.status_code, response.json()) == (
        201,
        {"dry_run": False, "count": 1, "addresses": ["dove@example.test"]},
    )
    assert stored_hash("dove@example.test") == f"dovecot${ssha}"
    assert check_password(PASSWORD, stored_hash("dove@example.test"))
    assert not check_password("not the password", stored_hash("dove@example.test"))
