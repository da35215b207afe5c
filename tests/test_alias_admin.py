"""The alias pages of the admin: edits through ``hosting.aliases``, scoped, with recent counts."""

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from mailadmin.hosting import aliases, services
from mailadmin.hosting.actors import Actor
from mailadmin.models import Alias, AliasDailyCount, AliasDomain, AuditEntry

pytestmark = pytest.mark.django_db

CLI = Actor.cli()


@pytest.fixture(autouse=True)
def mailboxes(settings, make_mailbox):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    for address in ("ann@ours.test", "bob@ours.test", "tom@theirs.test"):
        make_mailbox(address)


@pytest.fixture
def root_client(client):
    get_user_model().objects.create_superuser("root", "root@example.test", "pw")
    client.login(username="root", password="pw")
    return client


@pytest.fixture
def ours_admin_client(client):
    services.save_domain_administrator(CLI, "olivia", ["ours.test"], "a long admin passphrase")
    client.force_login(get_user_model().objects.get(username="olivia"))
    return client


def form_errors(response) -> str:
    assert response.status_code == 200, response.status_code
    form = response.context["adminform"].form
    return " ".join(message for messages in form.errors.values() for message in messages)


def test_adding_an_alias_goes_through_the_service_with_the_user_as_actor(root_client):
    response = root_client.post(
        "/admin/mailadmin/alias/add/",
        {
            "source": "Info@ours.test",
            "destinations": "bob@ours.test\nann@ours.test, bob@ours.test",
            "active": "on",
        },
    )
    assert response.status_code == 302, form_errors(response)
    alias = Alias.objects.get()
    assert (alias.source, aliases.destinations_of(alias)) == (
        "info@ours.test",
        ["bob@ours.test", "ann@ours.test"],
    )
    entry = AuditEntry.objects.order_by("-id").first()
    assert (entry.actor_name, entry.action, entry.object_name) == ("root", "create", "info@ours.test")


def test_an_alias_over_a_mailbox_or_into_the_void_is_a_form_error(root_client):
    response = root_client.post(
        "/admin/mailadmin/alias/add/", {"source": "ann@ours.test", "destinations": "bob@ours.test"}
    )
    assert "ann@ours.test is a mailbox; an alias cannot have its address" in form_errors(response)
    response = root_client.post(
        "/admin/mailadmin/alias/add/", {"source": "x@ours.test", "destinations": "nobody@ours.test"}
    )
    assert "nobody@ours.test is neither a mailbox nor an alias" in form_errors(response)
    assert not Alias.objects.exists()


def test_changing_only_the_active_flag_writes_only_that(root_client):
    alias = aliases.create_alias(CLI, "info@ours.test", ["ann@ours.test"])
    response = root_client.post(
        f"/admin/mailadmin/alias/{alias.pk}/change/", {"destinations": "ann@ours.test", "active": ""}
    )
    assert response.status_code == 302, form_errors(response)
    entry = AuditEntry.objects.order_by("-id").first()
    assert (entry.action, entry.changes) == ("update", {"active": [True, False]})


def test_the_alias_list_shows_destinations_and_messages_of_the_last_30_days(root_client):
    alias = aliases.create_alias(CLI, "info@ours.test", ["ann@ours.test", "bob@ours.test"])
    today = timezone.now().date()
    for days_ago, messages in ((0, 3), (29, 4), (30, 100)):
        AliasDailyCount.objects.create(
            alias=alias, day=today - timezone.timedelta(days=days_ago), messages=messages
        )
    response = root_client.get("/admin/mailadmin/alias/")
    row = next(result for result in response.context["cl"].result_list if result.pk == alias.pk)
    assert row.received_recently == 7
    page = response.content.decode()
    assert "ann@ours.test, bob@ours.test" in page
    assert "Received, last 30 days" in page


def test_catch_alls_have_their_own_page_and_aliases_leave_them_out(root_client):
    response = root_client.post(
        "/admin/mailadmin/domaincatchall/add/", {"domain_name": "ours.test", "destinations": "ann@ours.test"}
    )
    assert response.status_code == 302, form_errors(response)
    aliases.create_alias(CLI, "info@ours.test", ["ann@ours.test"])
    alias_page = root_client.get("/admin/mailadmin/alias/").context["cl"].result_list
    catch_all_page = root_client.get("/admin/mailadmin/domaincatchall/").context["cl"].result_list
    assert [row.source for row in alias_page] == ["info@ours.test"]
    assert [row.source for row in catch_all_page] == ["@ours.test"]


def test_deleting_an_alias_in_the_admin_goes_through_the_service(root_client):
    alias = aliases.create_alias(CLI, "info@ours.test", ["ann@ours.test"])
    response = root_client.post(f"/admin/mailadmin/alias/{alias.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Alias.objects.exists()
    entry = AuditEntry.objects.order_by("-id").first()
    assert (entry.actor_name, entry.action, entry.object_type) == ("root", "delete", "alias")


def test_a_domain_administrator_sees_and_edits_only_aliases_of_their_domains(ours_admin_client):
    ours = aliases.create_alias(CLI, "info@ours.test", ["ann@ours.test"])
    theirs = aliases.create_alias(CLI, "info@theirs.test", ["tom@theirs.test"])
    client = ours_admin_client
    listed = client.get("/admin/mailadmin/alias/").context["cl"].result_list
    assert [row.source for row in listed] == ["info@ours.test"]
    assert client.get(f"/admin/mailadmin/alias/{theirs.pk}/change/").status_code == 404
    assert client.post(f"/admin/mailadmin/alias/{theirs.pk}/delete/", {"post": "yes"}).status_code == 404
    assert client.get(f"/admin/mailadmin/alias/{ours.pk}/change/").status_code == 200
    response = client.post(
        "/admin/mailadmin/alias/add/", {"source": "x@theirs.test", "destinations": "ann@ours.test"}
    )
    assert "theirs.test is not a domain you administer" in form_errors(response)
    response = client.post(
        "/admin/mailadmin/alias/add/", {"source": "x@ours.test", "destinations": "tom@theirs.test"}
    )
    assert "theirs.test is not a domain you administer" in form_errors(response)
    response = client.post(
        "/admin/mailadmin/alias/add/", {"source": "x@ours.test", "destinations": "a@remote.example"}
    )
    assert "ours.test does not allow forwarding to outside addresses" in form_errors(response)
    assert Alias.objects.count() == 2


def test_alias_domains_are_added_by_operators_only(root_client):
    services.save_domain_administrator(CLI, "olivia", ["ours.test"], "a long admin passphrase")
    olivia = Client()
    olivia.force_login(get_user_model().objects.get(username="olivia"))
    assert olivia.get("/admin/mailadmin/aliasdomain/add/").status_code == 403
    aliases.create_alias_domain(CLI, "theirs-alias.test", "theirs.test")
    aliases.create_alias_domain(CLI, "ours-alias.test", "ours.test")
    listed = olivia.get("/admin/mailadmin/aliasdomain/").context["cl"].result_list
    assert [row.name for row in listed] == ["ours-alias.test"]
    target = AliasDomain.objects.get(name="ours-alias.test").target_id
    response = root_client.post("/admin/mailadmin/aliasdomain/add/", {"name": "other.test", "target": target})
    assert response.status_code == 302, form_errors(response)
    assert AliasDomain.objects.get(name="other.test").target.name == "ours.test"


def test_outside_forwarding_is_an_operators_tick_on_the_domain_page(root_client):
    domain = services.get_domain(CLI, "ours.test")
    olivia = Client()
    services.save_domain_administrator(CLI, "olivia", ["ours.test"], "a long admin passphrase")
    olivia.force_login(get_user_model().objects.get(username="olivia"))
    assert (
        'name="allow_outside_destinations"'
        not in olivia.get(f"/admin/mailadmin/domain/{domain.pk}/change/").content.decode()
    )
    form = {"active": "on", "quota_bytes": "0", "max_mailboxes": "0", "max_aliases": "3"}
    form |= {"default_mailbox_quota_bytes": "0", "allow_outside_destinations": "on", "language": "en"}
    response = root_client.post(f"/admin/mailadmin/domain/{domain.pk}/change/", form)
    assert response.status_code == 302, form_errors(response)
    domain.refresh_from_db()
    assert (domain.max_aliases, domain.allow_outside_destinations) == (3, True)
    response = olivia.post(
        "/admin/mailadmin/alias/add/", {"source": "x@ours.test", "destinations": "a@remote.example"}
    )
    assert response.status_code == 302


def test_an_alias_refusal_reaches_the_form_in_the_browsers_language(root_client):
    response = root_client.post(
        "/admin/mailadmin/alias/add/",
        {"source": "x@ours.test", "destinations": "nobody@ours.test"},
        HTTP_ACCEPT_LANGUAGE="id",
    )
    assert "nobody@ours.test bukan kotak surat dan bukan alias" in form_errors(response)
