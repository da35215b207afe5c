"""Making and revoking API tokens: createtoken and revoketoken, and the admin's token pages
(the token shown once; a domain administrator confined to their domains); each audited."""

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from mailadmin.api.models import ApiToken
from mailadmin.hosting import services, tokens
from mailadmin.hosting.actors import Actor
from mailadmin.models import AuditEntry, Domain
from tests.api_helpers import Api
from tests.conftest import run_manage

pytestmark = pytest.mark.django_db


@pytest.fixture
def domains(make_mailbox):
    make_mailbox("alice@a.test"), make_mailbox("bob@b.test")


def test_createtoken_prints_the_token_last_and_keeps_only_its_digest(domains, capsys):
    call_command(
        "createtoken",
        "--domain",
        "a.test",
        "--scope",
        "write",
        "--expires",
        "30",
        "--allow-ip",
        "192.0.2.0/24",
        "--allow-ip",
        "2001:db8::1",
        "--name",
        "billing",
    )
    lines = capsys.readouterr().out.splitlines()
    secret = lines[-1]
    token = ApiToken.objects.get()
    assert tokens.prefix_of(secret) == token.prefix
    assert lines[0].startswith(f"created write token {token.prefix} for a.test, expires ")
    assert (token.digest, token.name, token.scope) == (tokens.digest(secret), "billing", "write")
    assert token.network_list() == ["192.0.2.0/24", "2001:db8::1/128"]
    assert secret not in repr(list(ApiToken.objects.values()))
    assert Api(secret, address="192.0.2.9").get("mailboxes/alice@a.test").status_code == 200
    entry = AuditEntry.objects.get(object_type="api token")
    assert (entry.action, entry.actor_kind, entry.object_name, entry.domain_name) == (
        "create",
        "cli",
        token.prefix,
        "a.test",
    )


def test_createtoken_without_a_domain_reaches_every_domain(domains, capsys):
    call_command("createtoken")
    first, *_, secret = capsys.readouterr().out.splitlines()
    assert first.startswith(
        f"created read token {ApiToken.objects.get().prefix} for every domain, expires never"
    )
    listed = Api(secret).get("domains/").json()["results"]
    assert [row["name"] for row in listed] == ["a.test", "b.test"]
    assert Api(secret).put("mailboxes/alice@a.test", {"quota_bytes": 1}).status_code == 403  # read scope


def test_createtoken_refusals_are_one_line_errors(domains):
    with pytest.raises(CommandError, match="^no such domain: nowhere.test$"):
        call_command("createtoken", "--domain", "nowhere.test")
    with pytest.raises(CommandError, match="is not a network"):
        call_command("createtoken", "--allow-ip", "not-a-net")
    assert not ApiToken.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_revoketoken_stops_the_token_at_once(domains):
    made = run_manage("createtoken", "--domain", "a.test")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.decode().splitlines()[-1]
    assert Api(secret).get("domains/").status_code == 200
    revoked = run_manage("revoketoken", f"mat_{tokens.prefix_of(secret)}")
    assert (revoked.returncode, revoked.stdout.decode()) == (0, f"revoked token {tokens.prefix_of(secret)}\n")
    assert Api(secret).get("domains/").json()["code"] == "revoked_token"
    assert AuditEntry.objects.filter(object_type="api token", action="revoke").count() == 1
    missing = run_manage("revoketoken", "00000000")
    assert (missing.returncode, missing.stderr.decode().strip()) == (
        1,
        "CommandError: no such token: 00000000",
    )


# --- The admin -------------------------------------------------------------------------------


@pytest.fixture
def admin_of_a(client, settings, domains):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    services.save_domain_administrator(Actor.cli(), "olivia", ["a.test"], "a long admin passphrase")
    client.force_login(get_user_model().objects.get(username="olivia"))
    return client


def add_token(client, **fields):
    form = {"name": "panel", "scope": "write", "domains": [], "expires_days": "", "networks": "", **fields}
    return client.post("/admin/api/apitoken/add/", form)


def test_the_admin_shows_a_new_token_once(admin_client, domains):
    response = add_token(admin_client, networks="192.0.2.0/24, 198.51.100.7")
    assert response.status_code == 200
    secret = response.context["secret"]
    token = ApiToken.objects.get()
    assert f'<code id="api-token-secret">{secret}</code>' in response.content.decode()
    assert (token.all_domains, token.network_list()) == (True, ["192.0.2.0/24", "198.51.100.7/32"])
    change_page = admin_client.get(f"/admin/api/apitoken/{token.pk}/change/").content.decode()
    assert token.prefix in change_page and secret not in change_page
    entry = AuditEntry.objects.get(object_type="api token")
    assert (entry.actor_kind, entry.actor_name) == ("user", "admin")


def test_a_domain_administrator_makes_tokens_for_their_domains_only(admin_of_a):
    a, b = Domain.objects.get(name="a.test"), Domain.objects.get(name="b.test")
    every = add_token(admin_of_a)
    assert "only an operator of every domain may make a token for every domain" in every.content.decode()
    other = add_token(admin_of_a, domains=[b.pk])
    assert other.context["adminform"].form.errors["domains"]
    assert not ApiToken.objects.exists()
    made = add_token(admin_of_a, domains=[a.pk])
    assert Api(made.context["secret"]).get("domains/").json()["results"][0]["name"] == "a.test"
    services.create_token(Actor.cli(), domain_names=["a.test", "b.test"], name="wider")
    listed = admin_of_a.get("/admin/api/apitoken/").content.decode()
    assert "panel" in listed and "wider" not in listed


def test_the_admin_revokes_selected_tokens(admin_of_a):
    mine = services.create_token(Actor.cli(), domain_names=["a.test"], name="mine")
    response = admin_of_a.post(
        "/admin/api/apitoken/", {"action": "revoke", "_selected_action": [mine.token.pk]}, follow=True
    )
    assert "Revoked 1 token." in response.content.decode()
    assert Api(mine.secret).get("domains/").status_code == 401
    entry = AuditEntry.objects.get(action="revoke")
    assert (entry.actor_name, entry.domain_name) == ("olivia", "a.test")
