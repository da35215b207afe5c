"""The Django admin: usage columns, read-only messages, mailbox creation through the store."""

import uuid

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from mailadmin.mailin.delivery import deliver
from mailadmin.models import Domain, Mailbox, Message, Pop3Session

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
    assert f"{used / 1024:.1f} KiB of 1.0 MiB (1%)" in page


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
