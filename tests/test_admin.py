"""The Django admin: usage columns, read-only records, and every edit through the service layer, scoped."""

import io
import uuid

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.utils import timezone

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.mailin.delivery import deliver
from mailadmin.models import (
    AuditEntry,
    AuthFailure,
    Domain,
    DomainAdministrator,
    Mailbox,
    Message,
    Pop3Session,
)
from tests.conftest import open_session_row

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    get_user_model().objects.create_superuser("root", "root@example.test", "pw")
    client.login(username="root", password="pw")
    return client


def test_mailbox_list_shows_usage_against_quota(staff_client, make_mailbox):
    mailbox = make_mailbox("carol@example.test", quota_bytes=1024 * 1024)
    deliver([mailbox.address], [b"x" * 10000])
    used = Mailbox.objects.get(pk=mailbox.pk).used_bytes
    page = staff_client.get("/admin/mailadmin/mailbox/").content.decode()
    assert "carol@example.test" in page
    assert f"{used / 1024:.1f} KiB of 1.0 MiB (0%)" in page  # 0.95%, rounded down as listmailboxes does


def test_domain_list_shows_mailbox_count_and_unlimited_usage(staff_client, make_mailbox):
    make_mailbox("a@example.test")
    make_mailbox("b@example.test")
    page = staff_client.get("/admin/mailadmin/domain/").content.decode()
    assert '<td class="field-mailbox_count">2</td>' in page
    assert "0 B (unlimited)" in page


def test_messages_are_read_only_and_show_no_body(staff_client, make_mailbox):
    mailbox = make_mailbox()
    deliver([mailbox.address], [b"Subject: secret plans\n\nthe body text\n"])
    message = Message.objects.get()
    page = staff_client.get(f"/admin/mailadmin/message/{message.pk}/change/").content.decode()
    assert "secret plans" in page
    assert "the body text" not in page
    assert staff_client.get("/admin/mailadmin/message/add/").status_code == 403
    assert (
        staff_client.post(f"/admin/mailadmin/message/{message.pk}/delete/", {"post": "yes"}).status_code
        == 403
    )
    assert Message.objects.count() == 1


def test_admin_creates_a_mailbox_with_a_working_password(staff_client, make_mailbox):
    make_mailbox("first@example.test")
    response = staff_client.post(
        "/admin/mailadmin/mailbox/add/",
        {
            "address": "New@Example.test",
            "password": "s3cret-pass",
            "quota_bytes": "5000",
            "quota_messages": "0",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    mailbox = Mailbox.objects.select_related("user").get(user__username="new@example.test")
    assert mailbox.quota_bytes == 5000
    assert mailbox.user.check_password("s3cret-pass")


def test_admin_refuses_a_mailbox_in_an_unknown_domain(staff_client):
    response = staff_client.post(
        "/admin/mailadmin/mailbox/add/",
        {"address": "x@nowhere.test", "password": "pw", "quota_bytes": "0", "quota_messages": "0"},
    )
    assert response.status_code == 200
    assert "no such domain: nowhere.test" in response.content.decode()
    assert not Mailbox.objects.exists()


def test_deleting_a_mailbox_in_the_admin_releases_domain_usage(staff_client, make_mailbox):
    mailbox = make_mailbox("gone@example.test")
    deliver([mailbox.address], [b"x" * 500])
    response = staff_client.post(f"/admin/mailadmin/mailbox/{mailbox.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert Domain.objects.get(name="example.test").used_bytes == 0
    assert not get_user_model().objects.filter(username="gone@example.test").exists()
    assert Message.objects.count() == 0


def test_admin_kick_action_marks_only_open_sessions(staff_client, make_mailbox):
    mailbox = make_mailbox("k@example.test")
    common = dict(
        node="n:1", mailbox=mailbox, peer_host="192.0.2.1", peer_port=1, local_host="h", local_port=2
    )
    live = Pop3Session.objects.create(id=uuid.uuid4(), started_at=timezone.now(), **common)
    ended = Pop3Session.objects.create(
        id=uuid.uuid4(), started_at=timezone.now(), ended_at=timezone.now(), end_reason="quit", **common
    )
    response = staff_client.post(
        "/admin/mailadmin/pop3session/",
        {"action": "kick", "_selected_action": [str(live.pk), str(ended.pk)]},
        follow=True,
    )
    assert "Kick requested for 1 session." in response.content.decode()
    live.refresh_from_db()
    ended.refresh_from_db()
    assert live.kick_requested_at is not None
    assert ended.kick_requested_at is None
    page = staff_client.get("/admin/mailadmin/pop3session/?state=open").content.decode()
    assert str(live.pk) in page
    assert str(ended.pk) not in page


# --- The admin as a door onto the service layer ----------------------------------------------

ADD_MAILBOX = "/admin/mailadmin/mailbox/add/"


def mailbox_form(address: str, password: str = "a good long password", quota: str = "0") -> dict:
    return {"address": address, "password": password, "quota_bytes": quota, "quota_messages": "0"}


def form_errors(response) -> str:
    assert response.status_code == 200, response.status_code
    form = response.context["adminform"].form
    return " ".join(message for messages in form.errors.values() for message in messages)


@pytest.fixture
def two_domains():
    return (
        services.create_domain(Actor.cli(), "ours.test", max_mailboxes=2),
        services.create_domain(Actor.cli(), "theirs.test"),
    )


@pytest.fixture
def ours_admin_client(client, settings, two_domains):
    """A signed-in administrator of ours.test only."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    services.save_domain_administrator(Actor.cli(), "olivia", ["ours.test"], "a long admin passphrase")
    client.force_login(get_user_model().objects.get(username="olivia"))
    return client


def test_adding_an_existing_address_is_a_form_error_not_a_server_error(staff_client, make_mailbox):
    make_mailbox("taken@example.test")
    response = staff_client.post(ADD_MAILBOX, mailbox_form("Taken@example.test"))
    assert form_errors(response) == "mailbox taken@example.test already exists"


def test_adding_a_mailbox_with_a_common_password_is_a_form_error(staff_client, make_mailbox):
    make_mailbox("first@example.test")
    response = staff_client.post(ADD_MAILBOX, mailbox_form("new@example.test", password="password123"))
    assert form_errors(response) == "password rejected: This password is too common."
    assert not Mailbox.objects.filter(user__username="new@example.test").exists()


def test_adding_a_mailbox_to_a_full_domain_is_a_form_error(staff_client, two_domains):
    for n in range(2):
        assert staff_client.post(ADD_MAILBOX, mailbox_form(f"u{n}@ours.test")).status_code == 302
    response = staff_client.post(ADD_MAILBOX, mailbox_form("u2@ours.test"))
    assert form_errors(response) == "domain ours.test already has its maximum of 2 mailboxes"
    assert Mailbox.objects.count() == 2


def test_add_form_takes_the_domain_default_quota_when_blank_and_sizes_like_500M(staff_client, two_domains):
    services.update_domain(Actor.cli(), "ours.test", default_mailbox_quota_bytes=20 * 1024**2)
    assert staff_client.post(ADD_MAILBOX, mailbox_form("a@ours.test", quota="")).status_code == 302
    assert staff_client.post(ADD_MAILBOX, mailbox_form("b@ours.test", quota="500M")).status_code == 302
    assert dict(Mailbox.objects.values_list("user__username", "quota_bytes")) == {
        "a@ours.test": 20 * 1024**2,
        "b@ours.test": 500 * 1024**2,
    }
    mailbox = Mailbox.objects.get(user__username="b@ours.test")
    page = staff_client.get(f"/admin/mailadmin/mailbox/{mailbox.pk}/change/").content.decode()
    assert 'name="quota_bytes" value="500M"' in page
    response = staff_client.post(ADD_MAILBOX, mailbox_form("c@ours.test", quota="12Q"))
    assert "invalid size &#x27;12Q&#x27;" in response.content.decode()


def test_mailbox_change_writes_only_edited_fields_through_the_service(staff_client, make_mailbox):
    mailbox = make_mailbox("a@example.test")
    deliver([mailbox.address], [b"x" * 100])
    before = Mailbox.objects.get(pk=mailbox.pk)
    response = staff_client.post(
        f"/admin/mailadmin/mailbox/{mailbox.pk}/change/",
        {"active": "on", "quota_bytes": "2G", "quota_messages": "0", "new_password": ""},
        REMOTE_ADDR="203.0.113.9",
    )
    assert response.status_code == 302
    after = Mailbox.objects.get(pk=mailbox.pk)
    assert after.quota_bytes == 2 * 1024**3
    assert (after.used_bytes, after.used_messages, after.next_uid) == (
        before.used_bytes,
        before.used_messages,
        before.next_uid,
    )
    entry = AuditEntry.objects.get()
    assert (entry.actor_kind, entry.actor_name, entry.client_address, entry.action, entry.changes) == (
        "user",
        "root",
        "203.0.113.9",
        "update",
        {"quota_bytes": [0, 2 * 1024**3]},
    )


def test_the_mailbox_page_edits_quotas_only_password_and_active_have_their_own(staff_client, make_mailbox):
    mailbox = make_mailbox("a@example.test")
    response = staff_client.post(
        f"/admin/mailadmin/mailbox/{mailbox.pk}/change/",
        {"quota_bytes": "1M", "quota_messages": "0", "new_password": "a brand new passphrase"},
    )
    assert response.status_code == 302
    user = get_user_model().objects.get(username="a@example.test")
    assert user.check_password("correct horse")
    after = Mailbox.objects.get(pk=mailbox.pk)
    assert (after.active, after.quota_bytes) == (True, 1024**2)
    assert list(AuditEntry.objects.values_list("action", flat=True)) == ["update"]


def test_address_and_domain_name_cannot_be_changed_in_the_admin(staff_client, make_mailbox):
    mailbox = make_mailbox("a@example.test")
    domain = mailbox.domain
    staff_client.post(
        f"/admin/mailadmin/mailbox/{mailbox.pk}/change/",
        {"address": "b@example.test", "quota_bytes": "0", "quota_messages": "0", "active": "on"},
    )
    staff_client.post(
        f"/admin/mailadmin/domain/{domain.pk}/change/",
        {"name": "renamed.test", "active": "on", "quota_bytes": "0", "max_mailboxes": "0"}
        | {"default_mailbox_quota_bytes": "0", "quota_warning_percents": ""},
    )
    assert get_user_model().objects.filter(username="a@example.test").exists()
    assert Domain.objects.get(pk=domain.pk).name == "example.test"


def test_domain_change_through_the_service_keeps_usage(staff_client, make_mailbox):
    mailbox = make_mailbox("a@example.test")
    deliver([mailbox.address], [b"x" * 100])
    domain = Domain.objects.get(name="example.test")
    response = staff_client.post(
        f"/admin/mailadmin/domain/{domain.pk}/change/",
        {"active": "on", "quota_bytes": "10G", "max_mailboxes": "5", "max_aliases": "0"}
        | {"default_mailbox_quota_bytes": "1G", "quota_warning_percents": "80,95", "language": "en"},
    )
    assert response.status_code == 302
    after = Domain.objects.get(pk=domain.pk)
    assert (after.quota_bytes, after.max_mailboxes, after.used_bytes) == (10 * 1024**3, 5, domain.used_bytes)
    assert AuditEntry.objects.get().changes == {
        "quota_bytes": [0, 10 * 1024**3],
        "max_mailboxes": [0, 5],
        "default_mailbox_quota_bytes": [0, 1024**3],
        "quota_warning_percents": ["", "80,95"],
    }


def test_stock_user_admin_cannot_reach_a_mailbox_login(client, settings, make_mailbox):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    mailbox = make_mailbox("a@example.test")
    staff = get_user_model().objects.create_user("helpdesk", password="pw", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(codename__in=["change_user", "view_user"]))
    client.force_login(staff)
    password_page = f"/admin/auth/user/{mailbox.user_id}/password/"
    assert client.get(password_page).status_code == 404
    response = client.post(password_page, {"password1": "taken over 123", "password2": "taken over 123"})
    assert response.status_code == 404
    assert client.get(f"/admin/auth/user/{mailbox.user_id}/change/").status_code == 404
    assert "a@example.test" not in client.get("/admin/auth/user/").content.decode()
    assert get_user_model().objects.get(pk=mailbox.user_id).check_password("correct horse")


def test_user_admin_leaves_domain_administrators_to_createadmin(admin_client, settings):
    """Their password and domains change only through the service layer, which audits them."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    services.create_domain(Actor.cli(), "ours.test")
    services.save_domain_administrator(Actor.cli(), "olivia", ["ours.test"], "a long admin passphrase")
    olivia = get_user_model().objects.get(username="olivia")
    password_page = f"/admin/auth/user/{olivia.pk}/password/"
    assert admin_client.get(password_page).status_code == 404
    response = admin_client.post(
        password_page, {"password1": "taken over 123", "password2": "taken over 123"}
    )
    assert response.status_code == 404
    assert admin_client.post(f"/admin/auth/user/{olivia.pk}/delete/", {"post": "yes"}).status_code in (
        302,
        404,
    )
    assert "olivia" not in admin_client.get("/admin/auth/user/").content.decode()
    assert get_user_model().objects.get(pk=olivia.pk).check_password("a long admin passphrase")


def test_domain_administrator_sees_and_changes_only_their_domains(ours_admin_client, make_mailbox):
    ours, theirs = make_mailbox("mine@ours.test"), make_mailbox("other@theirs.test")
    for mailbox in (ours, theirs):
        open_session_row(mailbox)
        AuthFailure.objects.create(
            created_at=timezone.now(),
            username=f"failed-{mailbox.address}",
            domain=mailbox.domain,
            peer_host="x",
            source="x",
        )
        services.update_mailbox(Actor.cli(), mailbox.address, quota_messages=9)
    client = ours_admin_client
    assert client.get(f"/admin/mailadmin/mailbox/{theirs.pk}/change/").status_code == 404
    assert client.get(f"/admin/mailadmin/mailbox/{theirs.pk}/delete/").status_code == 404
    assert client.get(f"/admin/mailadmin/domain/{theirs.domain_id}/change/").status_code == 404
    assert client.get(f"/admin/mailadmin/mailbox/{ours.pk}/change/").status_code == 200
    for changelist in ("mailbox", "pop3session", "authfailure", "auditentry"):
        page = client.get(f"/admin/mailadmin/{changelist}/").content.decode()
        assert "ours.test" in page, changelist
        assert "theirs.test" not in page, changelist
    response = client.post(
        f"/admin/mailadmin/mailbox/{theirs.pk}/change/",
        {"active": "", "quota_bytes": "1", "quota_messages": "0"},
    )
    assert response.status_code == 404
    assert Mailbox.objects.get(pk=theirs.pk).active


def test_domain_administrator_cannot_add_domains_or_change_their_caps(ours_admin_client, two_domains):
    ours = two_domains[0]
    client = ours_admin_client
    assert client.get("/admin/mailadmin/domain/add/").status_code == 403
    page = client.get(f"/admin/mailadmin/domain/{ours.pk}/change/").content.decode()
    assert 'name="default_mailbox_quota_bytes"' in page
    assert 'name="quota_bytes"' not in page and 'name="max_mailboxes"' not in page
    response = client.post(
        f"/admin/mailadmin/domain/{ours.pk}/change/",
        {
            "default_mailbox_quota_bytes": "100M",
            "quota_warning_percents": "",
            "language": "en",
            "quota_bytes": "1",
            "max_mailboxes": "99",
        },
    )
    assert response.status_code == 302
    after = Domain.objects.get(pk=ours.pk)
    assert (after.default_mailbox_quota_bytes, after.quota_bytes, after.max_mailboxes) == (
        100 * 1024**2,
        0,
        2,
    )


def test_domain_administrator_adds_mailboxes_only_in_their_domains(ours_admin_client):
    assert ours_admin_client.post(ADD_MAILBOX, mailbox_form("new@ours.test")).status_code == 302
    response = ours_admin_client.post(ADD_MAILBOX, mailbox_form("new@theirs.test"))
    assert form_errors(response) == "not permitted: theirs.test is not a domain you administer"
    assert list(Mailbox.objects.values_list("user__username", flat=True)) == ["new@ours.test"]
    assert AuditEntry.objects.filter(actor_name="olivia").get().object_name == "new@ours.test"


def test_kick_action_goes_through_the_service_with_the_user_as_actor(ours_admin_client, make_mailbox):
    ours, theirs = (
        open_session_row(make_mailbox("a@ours.test")),
        open_session_row(make_mailbox("b@theirs.test")),
    )
    response = ours_admin_client.post(
        "/admin/mailadmin/pop3session/",
        {"action": "kick", "_selected_action": [str(ours.pk), str(theirs.pk)]},
        follow=True,
    )
    assert "Kick requested for 1 session." in response.content.decode()
    theirs.refresh_from_db()
    assert theirs.kick_requested_at is None
    entry = AuditEntry.objects.get(action="kick")
    assert (entry.actor_name, entry.object_name) == ("olivia", f"a@ours.test {ours.pk}")


def test_audit_entries_are_read_only_in_the_admin(staff_client, two_domains):
    entry = AuditEntry.objects.first()
    assert staff_client.get("/admin/mailadmin/auditentry/add/").status_code == 403
    assert (
        staff_client.post(f"/admin/mailadmin/auditentry/{entry.pk}/delete/", {"post": "yes"}).status_code
        == 403
    )
    assert staff_client.get(f"/admin/mailadmin/auditentry/{entry.pk}/change/").status_code == 200
    assert AuditEntry.objects.count() == 2


def test_admin_creates_a_domain_through_the_service_with_sizes(staff_client):
    response = staff_client.post(
        "/admin/mailadmin/domain/add/",
        {
            "name": "Example.TEST",
            "quota_bytes": "2G",
            "max_mailboxes": "3",
            "default_mailbox_quota_bytes": "512K",
        },
    )
    assert response.status_code == 302
    domain = Domain.objects.get()
    assert (domain.name, domain.quota_bytes, domain.default_mailbox_quota_bytes) == (
        "example.test",
        2 * 1024**3,
        512 * 1024,
    )
    entry = AuditEntry.objects.get()
    assert (entry.actor_name, entry.action, entry.object_name) == ("root", "create", "example.test")
    response = staff_client.post(
        "/admin/mailadmin/domain/add/",
        {
            "name": "example.test",
            "quota_bytes": "0",
            "max_mailboxes": "0",
            "default_mailbox_quota_bytes": "0",
        },
    )
    assert form_errors(response) == "domain example.test already exists"


def test_staff_without_a_domain_sees_no_rows(client, make_mailbox):
    make_mailbox("a@example.test")
    staff = get_user_model().objects.create_user("helpdesk", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(codename__in=["view_mailbox", "view_domain"]))
    client.force_login(staff)
    assert "0 mailboxes" in client.get("/admin/mailadmin/mailbox/").content.decode()
    assert "0 domains" in client.get("/admin/mailadmin/domain/").content.decode()


def test_view_only_staff_get_no_kick_and_a_forged_kick_does_nothing(client, two_domains, make_mailbox):
    session = open_session_row(make_mailbox("a@ours.test"))
    viewer = get_user_model().objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_pop3session"))
    DomainAdministrator.objects.create(user=viewer, domain=two_domains[0])
    client.force_login(viewer)
    page = client.get("/admin/mailadmin/pop3session/").content.decode()
    assert str(session.pk) in page
    assert 'value="kick"' not in page
    forged = {"action": "kick", "_selected_action": [str(session.pk)]}
    response = client.post("/admin/mailadmin/pop3session/", forged, follow=True)
    assert "Kick requested" not in response.content.decode()
    session.refresh_from_db()
    assert session.kick_requested_at is None
    assert not AuditEntry.objects.filter(action="kick").exists()


def test_domain_administrators_are_offered_the_kick(ours_admin_client, make_mailbox):
    open_session_row(make_mailbox("a@ours.test"))
    assert 'value="kick"' in ours_admin_client.get("/admin/mailadmin/pop3session/").content.decode()


def test_deleting_a_domain_with_mailboxes_says_why_not_permission(staff_client, make_mailbox):
    make_mailbox("a@example.test")
    make_mailbox("b@example.test")
    domain = Domain.objects.get(name="example.test")
    response = staff_client.get(f"/admin/mailadmin/domain/{domain.pk}/delete/")
    page = response.content.decode()
    assert response.status_code == 200
    assert "cannot be deleted" in page
    assert "domain example.test still has 2 mailboxes; delete them first" in page
    staff_client.post(f"/admin/mailadmin/domain/{domain.pk}/delete/", {"post": "yes"})
    bulk = {"action": "delete_selected", "_selected_action": [str(domain.pk)], "post": "yes"}
    page = staff_client.post("/admin/mailadmin/domain/", bulk).content.decode()
    assert "domain example.test still has 2 mailboxes; delete them first" in page
    assert Domain.objects.filter(pk=domain.pk).exists()


def test_deleting_an_empty_domain_in_the_admin_goes_through_the_service(staff_client):
    domain = services.create_domain(Actor.cli(), "empty.test")
    response = staff_client.post(f"/admin/mailadmin/domain/{domain.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Domain.objects.filter(pk=domain.pk).exists()
    assert AuditEntry.objects.filter(action="delete", object_type="domain", actor_name="root").count() == 1


def test_usage_percent_is_the_same_in_the_admin_and_listmailboxes(staff_client, make_mailbox):
    mailbox = make_mailbox("full@example.test", quota_bytes=1000)
    Mailbox.objects.filter(pk=mailbox.pk).update(used_bytes=976)  # 97.6%
    page = staff_client.get("/admin/mailadmin/mailbox/").content.decode()
    listed = io.StringIO()
    call_command("listmailboxes", stdout=listed)
    assert "976 B of 1000 B (97%)" in page
    assert listed.getvalue().splitlines()[1].endswith("  97%")


def test_a_password_with_a_control_character_is_a_form_error(staff_client, make_mailbox):
    make_mailbox("a@example.test")
    response = staff_client.post(ADD_MAILBOX, mailbox_form("new@example.test", password="a good\rpassword"))
    assert form_errors(response) == (
        "password rejected: it contains the control character U+000D, which no POP3 client can send"
    )
    assert not Mailbox.objects.filter(user__username="new@example.test").exists()


def test_the_login_page_renders_for_a_visitor_not_signed_in(client):
    page = client.get("/admin/login/")
    assert page.status_code == 200
    assert 'name="username"' in page.content.decode()
