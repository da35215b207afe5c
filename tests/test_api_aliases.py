"""Aliases and catch-alls through the API: create-or-update, partial updates, deletes, lists
with filters and pages, the received counts, the service's refusals as JSON errors, scope and
the audit trail."""

from datetime import timedelta

import pytest

from mailadmin.hosting import aliases, services
from mailadmin.hosting.actors import Actor
from mailadmin.hosting.store.aliases import first_recent_day
from mailadmin.models import Alias, AliasDailyCount, AuditEntry
from tests.api_helpers import Api, make_token

pytestmark = pytest.mark.django_db

CLIENT = "198.51.100.30"
CLI = Actor.cli()


@pytest.fixture
def api(make_mailbox) -> Api:
    """A write token for a.test (mailboxes ann and bob) from CLIENT; b.test has the mailbox tom."""
    for address in ("ann@a.test", "bob@a.test", "tom@b.test"):
        make_mailbox(address)
    return Api(make_token("a.test"), address=CLIENT)


def stored(source: str) -> tuple[list[str], bool]:
    alias = Alias.objects.get(source=source)
    return aliases.destinations_of(alias), alias.active


# --- Create, update, delete ------------------------------------------------------------------


def test_the_same_put_twice_creates_then_updates_to_the_same_state(api):
    body = {"destinations": ["Bob@A.test", "ann@a.test", "bob@a.test"], "active": True}
    first = api.put("aliases/Info@A.test", body)
    second = api.put("aliases/info@a.test", body)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json() == second.json()
    assert first.json() == {
        "source": "info@a.test",
        "domain": "a.test",
        "destinations": ["bob@a.test", "ann@a.test"],
        "active": True,
        "catch_all": False,
        "received_last_30_days": 0,
        "created": first.json()["created"],
    }
    assert first.json()["created"].startswith("20")
    assert stored("info@a.test") == (["bob@a.test", "ann@a.test"], True)
    assert AuditEntry.objects.filter(object_name="info@a.test").count() == 1  # the repeat changed nothing


def test_put_replaces_the_destinations_and_leaves_active_alone_when_not_named(api):
    api.put("aliases/info@a.test", {"destinations": ["ann@a.test"], "active": False})
    response = api.put("aliases/info@a.test", {"destinations": ["bob@a.test"]})
    assert (response.status_code, response.json()["destinations"], response.json()["active"]) == (
        200,
        ["bob@a.test"],
        False,
    )
    assert stored("info@a.test") == (["bob@a.test"], False)


def test_put_without_active_creates_an_active_alias(api):
    response = api.put("aliases/info@a.test", {"destinations": ["ann@a.test"]})
    assert (response.status_code, response.json()["active"]) == (201, True)


def test_patch_changes_only_what_it_names(api):
    api.put("aliases/info@a.test", {"destinations": ["ann@a.test", "bob@a.test"]})
    response = api.patch("aliases/info@a.test", {"active": False})
    assert response.status_code == 200
    assert (response.json()["destinations"], response.json()["active"]) == (
        ["ann@a.test", "bob@a.test"],
        False,
    )
    response = api.patch("aliases/info@a.test", {"destinations": ["bob@a.test"]})
    assert (response.json()["destinations"], response.json()["active"]) == (["bob@a.test"], False)
    assert stored("info@a.test") == (["bob@a.test"], False)


def test_patch_never_creates(api):
    response = api.patch("aliases/ghost@a.test", {"destinations": ["ann@a.test"]})
    assert (response.status_code, response.json()) == (
        404,
        {"code": "not_found", "detail": "no such alias: ghost@a.test"},
    )
    assert not Alias.objects.exists()


def test_delete_removes_the_alias(api):
    api.put("aliases/info@a.test", {"destinations": ["ann@a.test"]})
    assert api.delete("aliases/info@a.test").status_code == 204
    assert not Alias.objects.exists()
    assert api.get("aliases/info@a.test").status_code == 404
    assert api.delete("aliases/info@a.test").status_code == 404


def test_a_catch_all_is_its_domains_at_source(api):
    response = api.put("aliases/@A.test", {"destinations": ["ann@a.test"]})
    assert response.status_code == 201
    assert {key: response.json()[key] for key in ("source", "domain", "catch_all", "active")} == {
        "source": "@a.test",
        "domain": "a.test",
        "catch_all": True,
        "active": True,
    }
    again = api.put("aliases/@a.test", {"destinations": ["bob@a.test"], "active": False})
    assert (again.status_code, again.json()["destinations"], again.json()["active"]) == (
        200,
        ["bob@a.test"],
        False,
    )
    assert api.get("aliases/@a.test").json()["destinations"] == ["bob@a.test"]
    assert api.patch("aliases/@a.test", {"active": True}).json()["active"] is True
    assert api.delete("aliases/@a.test").status_code == 204
    assert not Alias.objects.exists()
    entries = AuditEntry.objects.filter(object_name="@a.test").order_by("id")
    assert [(entry.action, entry.object_type) for entry in entries] == [
        ("create", "catch-all"),
        ("update", "catch-all"),
        ("update", "catch-all"),
        ("delete", "catch-all"),
    ]


def test_a_catch_all_created_inactive_stays_inactive(api):
    response = api.put("aliases/@a.test", {"destinations": ["ann@a.test"], "active": False})
    assert (response.status_code, response.json()["active"]) == (201, False)
    assert stored("@a.test") == (["ann@a.test"], False)


# --- Refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (
            {"destinations": []},
            400,
            {"code": "invalid", "fields": {"destinations": ["an alias needs at least one destination"]}},
        ),
        ({}, 400, {"code": "invalid", "fields": {"destinations": ["This field is required."]}}),
        (
            {"destinations": "ann@a.test"},
            400,
            {"code": "invalid", "fields": {"destinations": ['Expected a list of items but got type "str".']}},
        ),
        (
            {"destinations": ["ann@a.test"], "enabled": True},
            400,
            {"code": "invalid", "fields": {"enabled": ["Unknown field."]}},
        ),
        (
            {"destinations": ["nobody@a.test"]},
            400,
            {"code": "invalid", "detail": "nobody@a.test is neither a mailbox nor an alias"},
        ),
        (
            {"destinations": ["info@a.test"]},
            400,
            {"code": "invalid", "detail": "info@a.test refused: alias loop: info@a.test -> info@a.test"},
        ),
    ],
)
def test_the_services_refusals_come_back_as_json_errors(api, body, status, expected):
    response = api.put("aliases/info@a.test", body)
    assert response.status_code == status
    assert {key: response.json()[key] for key in expected} == expected
    assert not Alias.objects.exists()


def test_an_alias_cannot_take_a_mailboxs_address(api):
    response = api.put("aliases/ann@a.test", {"destinations": ["bob@a.test"]})
    assert (response.status_code, response.json()) == (
        409,
        {"code": "already_exists", "detail": "ann@a.test is a mailbox; an alias cannot have its address"},
    )
    assert not Alias.objects.exists()


def test_a_domains_alias_limit_is_a_conflict(api):
    services.update_domain(CLI, "a.test", max_aliases=1)
    assert api.put("aliases/one@a.test", {"destinations": ["ann@a.test"]}).status_code == 201
    response = api.put("aliases/two@a.test", {"destinations": ["ann@a.test"]})
    assert (response.status_code, response.json()["code"]) == (409, "limit_reached")
    assert list(Alias.objects.values_list("source", flat=True)) == ["one@a.test"]


# --- Scope -----------------------------------------------------------------------------------


def test_a_domain_token_cannot_point_an_alias_at_another_domains_mailbox(api):
    response = api.put("aliases/info@a.test", {"destinations": ["ann@a.test", "tom@b.test"]})
    assert (response.status_code, response.json()) == (
        403,
        {"code": "not_permitted", "detail": "not permitted: b.test is not a domain you administer"},
    )
    api.put("aliases/info@a.test", {"destinations": ["ann@a.test"]})
    assert api.patch("aliases/info@a.test", {"destinations": ["tom@b.test"]}).status_code == 403
    assert stored("info@a.test") == (["ann@a.test"], True)


def test_outside_destinations_follow_the_domains_setting_for_a_domain_token(api):
    body = {"destinations": ["someone@remote.example"]}
    response = api.put("aliases/fwd@a.test", body)
    assert (response.status_code, response.json()["detail"]) == (
        403,
        "not permitted: a.test does not allow forwarding to outside addresses (someone@remote.example)",
    )
    services.update_domain(CLI, "a.test", allow_outside_destinations=True)
    assert api.put("aliases/fwd@a.test", body).status_code == 201
    assert stored("fwd@a.test") == (["someone@remote.example"], True)


def test_a_token_for_every_domain_points_across_domains(api):
    every = Api(make_token())
    response = every.put("aliases/info@a.test", {"destinations": ["tom@b.test", "x@remote.example"]})
    assert (response.status_code, response.json()["destinations"]) == (
        201,
        ["tom@b.test", "x@remote.example"],
    )


def test_another_domains_aliases_are_not_found_and_not_listed(api):
    aliases.create_alias(CLI, "sales@b.test", ["tom@b.test"])
    aliases.save_alias(CLI, "@b.test", ["tom@b.test"])
    api.put("aliases/info@a.test", {"destinations": ["ann@a.test"]})
    for method, path, body in [
        ("GET", "aliases/sales@b.test", None),
        ("GET", "aliases/@b.test", None),
        ("GET", "aliases/nosuch@b.test", None),
        ("PUT", "aliases/sales@b.test", {"destinations": ["tom@b.test"], "active": False}),
        ("PUT", "aliases/new@b.test", {"destinations": ["tom@b.test"]}),
        ("PATCH", "aliases/@b.test", {"active": False}),
        ("DELETE", "aliases/sales@b.test", None),
    ]:
        response = api.call(method, path, body)
        assert (method, path, response.status_code, response.json()["code"]) == (
            method,
            path,
            404,
            "not_found",
        )
    assert [row["source"] for row in api.get("aliases/").json()["results"]] == ["info@a.test"]
    assert api.get("aliases/?domain=b.test").json()["count"] == 0
    assert sorted(Alias.objects.values_list("source", "active")) == [
        ("@b.test", True),
        ("info@a.test", True),
        ("sales@b.test", True),
    ]


def test_a_read_token_reads_but_cannot_change(api):
    aliases.create_alias(CLI, "info@a.test", ["ann@a.test"])
    reader = Api(make_token("a.test", scope="read"))
    assert reader.get("aliases/info@a.test").json()["destinations"] == ["ann@a.test"]
    for method, path, body in [
        ("PUT", "aliases/info@a.test", {"destinations": ["bob@a.test"]}),
        ("PUT", "aliases/new@a.test", {"destinations": ["bob@a.test"]}),
        ("PATCH", "aliases/info@a.test", {"active": False}),
        ("DELETE", "aliases/info@a.test", None),
    ]:
        response = reader.call(method, path, body)
        assert (path, response.status_code, response.json()["code"]) == (path, 403, "read_only_token")
    assert list(Alias.objects.values_list("source", flat=True)) == ["info@a.test"]
    assert stored("info@a.test") == (["ann@a.test"], True)


# --- Lists and counts ------------------------------------------------------------------------


def test_lists_filter_by_domain_active_and_destination_and_page(api):
    api.put("aliases/info@a.test", {"destinations": ["ann@a.test", "bob@a.test"]})
    api.put("aliases/sales@a.test", {"destinations": ["bob@a.test"], "active": False})
    api.put("aliases/@a.test", {"destinations": ["ann@a.test"]})
    aliases.create_alias(CLI, "help@b.test", ["tom@b.test"])
    every = Api(make_token(scope="read"))

    def sources(query: str, client: Api = api) -> list[str]:
        return [row["source"] for row in client.get(f"aliases/?{query}").json()["results"]]

    assert sources("") == ["@a.test", "info@a.test", "sales@a.test"]
    assert sources("active=false") == ["sales@a.test"]
    assert sources("destination=bob@a.test") == ["info@a.test", "sales@a.test"]
    assert sources("destination=Ann@a.test") == ["@a.test", "info@a.test"]
    assert sources("domain=b.test", every) == ["help@b.test"]
    assert sources("", every) == ["@a.test", "info@a.test", "sales@a.test", "help@b.test"]
    page = api.get("aliases/?page_size=2&page=2").json()
    assert (page["count"], [row["source"] for row in page["results"]]) == (3, ["sales@a.test"])
    assert page["previous"].endswith("/api/v1/aliases/?page_size=2")


def test_received_counts_sum_the_last_30_days_only(api):
    api.put("aliases/info@a.test", {"destinations": ["ann@a.test", "bob@a.test"]})
    alias = Alias.objects.get(source="info@a.test")
    first = first_recent_day()
    for day, messages in [(first - timedelta(days=1), 100), (first, 3), (first + timedelta(days=29), 4)]:
        AliasDailyCount.objects.create(alias=alias, day=day, messages=messages)
    assert api.get("aliases/info@a.test").json()["received_last_30_days"] == 7
    # filtering by a destination must not repeat the daily rows summed
    listed = api.get("aliases/?destination=bob@a.test").json()["results"]
    assert [(row["source"], row["received_last_30_days"]) for row in listed] == [("info@a.test", 7)]
    assert api.patch("aliases/info@a.test", {"active": False}).json()["received_last_30_days"] == 7


# --- Audit -----------------------------------------------------------------------------------


def test_every_change_is_audited_as_the_token_from_the_client_address(api):
    api.put("aliases/info@a.test", {"destinations": ["ann@a.test"]})
    api.patch("aliases/info@a.test", {"destinations": ["bob@a.test"], "active": False})
    api.delete("aliases/info@a.test")
    prefix = api.token[4:12]
    entries = AuditEntry.objects.filter(object_name="info@a.test").order_by("id")
    assert [
        (
            entry.action,
            entry.object_type,
            entry.actor_kind,
            entry.actor_name,
            entry.client_address,
            entry.domain_name,
            entry.changes,
        )
        for entry in entries
    ] == [
        (
            "create",
            "alias",
            "token",
            f"token:{prefix} test",
            CLIENT,
            "a.test",
            {"destinations": [None, ["ann@a.test"]], "active": [None, True]},
        ),
        (
            "update",
            "alias",
            "token",
            f"token:{prefix} test",
            CLIENT,
            "a.test",
            {"destinations": [["ann@a.test"], ["bob@a.test"]], "active": [True, False]},
        ),
        (
            "delete",
            "alias",
            "token",
            f"token:{prefix} test",
            CLIENT,
            "a.test",
            {"destinations": [["bob@a.test"], None]},
        ),
    ]
