"""Delivery through aliases: one copy per mailbox, each charged its own quota, replies per recipient.

``deliver()`` and ``deliver_group`` in process; ``manage.py deliver`` and ``runlmtp`` as the MTA
runs them, with their exit codes and exact replies.
"""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from mailadmin.hosting import aliases
from mailadmin.hosting.actors import Actor
from mailadmin.hosting.store import iter_message_bytes
from mailadmin.mailin.delivery import (
    Delivery,
    DeliveryStatus,
    Recipient,
    deliver,
    deliver_group,
    look_up_recipient,
    trace_headers,
)
from mailadmin.mailin.messagefile import spool_message
from mailadmin.models import AliasDailyCount, Mailbox, Message
from tests.conftest import run_manage
from tests.lmtp_replies import RECIPIENT_OK, SAVED
from tests.lmtp_server import running_lmtp
from tests.test_pipe_delivery import FAST
from tests.test_pipe_delivery import deliver as piped

CLI = Actor.cli()
SENDER = "someone@remote.test"
BODY = b"Subject: via alias\r\n\r\nhello\r\n"
FULL = 10  # bytes of quota: no message fits
OUTSIDE_REFUSED = (
    "550 5.3.5 <{rcpt}> Alias forwards to outside addresses: the MTA must expand aliases "
    "(Postfix virtual_alias_maps)"
)
LOOP_REFUSED = "550 5.4.6 <{rcpt}> Alias loop or expansion too deep"
SAVED_EXCEPT = "250 2.0.0 <{rcpt}> Saved, except for {missed}"


@pytest.fixture(autouse=True)
def cheap_hashes(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""


def stored(address: str) -> list[bytes]:
    ids = Message.objects.filter(mailbox__user__username=address).order_by("pk").values_list("pk", flat=True)
    return [b"".join(iter_message_bytes(pk)) for pk in ids]


def usage(address: str) -> tuple[int, int]:
    mailbox = Mailbox.objects.get(user__username=address)
    return mailbox.used_bytes, mailbox.used_messages


def received_today(source: str) -> int:
    row = AliasDailyCount.objects.filter(alias__source=source, day=timezone.now().date()).first()
    return 0 if row is None else row.messages


@pytest.mark.django_db
def test_an_alias_stores_one_copy_in_each_mailbox_charged_to_each(make_mailbox):
    make_mailbox("ann@ours.test")
    make_mailbox("bob@ours.test")
    aliases.create_alias(CLI, "team@ours.test", ["ann@ours.test", "bob@ours.test"])
    [result] = deliver(["Team@ours.test"], [BODY], sender=SENDER)
    assert result.status is DeliveryStatus.DELIVERED and result.missed == ()
    for address in ("ann@ours.test", "bob@ours.test"):
        assert stored(address) == [trace_headers(SENDER, address) + BODY]
        assert usage(address) == (len(trace_headers(SENDER, address) + BODY), 1)
    assert received_today("team@ours.test") == 1


@pytest.mark.django_db
def test_a_mailbox_reached_by_several_recipients_and_aliases_gets_one_copy(make_mailbox):
    make_mailbox("ann@ours.test")
    make_mailbox("bob@ours.test")
    aliases.create_alias(CLI, "team@ours.test", ["ann@ours.test", "bob@ours.test"])
    aliases.create_alias(CLI, "all@ours.test", ["team@ours.test", "ann@ours.test"])
    results = deliver(["all@ours.test", "team@ours.test", "ann@ours.test"], [BODY], sender=SENDER)
    assert [(r.recipient, r.status) for r in results] == [
        ("all@ours.test", DeliveryStatus.DELIVERED),
        ("team@ours.test", DeliveryStatus.DELIVERED),
        ("ann@ours.test", DeliveryStatus.DELIVERED),
    ]
    assert (len(stored("ann@ours.test")), len(stored("bob@ours.test"))) == (1, 1)
    # One message: each alias counts it once, however many recipients passed through it.
    assert (received_today("all@ours.test"), received_today("team@ours.test")) == (1, 1)


@pytest.mark.django_db
def test_one_full_destination_does_not_fail_the_others_and_is_named(make_mailbox):
    make_mailbox("ann@ours.test", quota_bytes=FULL)
    make_mailbox("bob@ours.test")
    aliases.create_alias(CLI, "team@ours.test", ["ann@ours.test", "bob@ours.test"])
    found = look_up_recipient("team@ours.test", len(BODY))
    assert isinstance(found, Recipient)
    assert [mailbox.address for mailbox in found.mailboxes] == ["ann@ours.test", "bob@ours.test"]
    [[result]] = deliver_group([Delivery([found], spool_message([BODY]), SENDER)])
    assert (result.status, [(m.recipient, m.status) for m in result.missed]) == (
        DeliveryStatus.DELIVERED,
        [("ann@ours.test", DeliveryStatus.OVER_QUOTA)],
    )
    assert (usage("ann@ours.test"), len(stored("bob@ours.test"))) == ((0, 0), 1)


@pytest.mark.django_db
def test_an_alias_whose_mailboxes_are_all_full_or_disabled_is_refused_at_rcpt(make_mailbox):
    make_mailbox("ann@ours.test", quota_bytes=FULL)
    bob = make_mailbox("bob@ours.test")
    aliases.create_alias(CLI, "team@ours.test", ["ann@ours.test", "bob@ours.test"])
    Mailbox.objects.filter(pk=bob.pk).update(active=False)
    assert look_up_recipient("team@ours.test", len(BODY)) is DeliveryStatus.OVER_QUOTA
    Mailbox.objects.filter(user__username="ann@ours.test").update(active=False)
    assert look_up_recipient("team@ours.test", len(BODY)) is DeliveryStatus.MAILBOX_INACTIVE


@pytest.mark.django_db
def test_outside_destinations_and_loops_are_refused_at_rcpt(make_mailbox):
    make_mailbox("ann@ours.test")
    aliases.create_alias(CLI, "fwd@ours.test", ["ann@ours.test", "someone@remote.example"])
    assert look_up_recipient("fwd@ours.test") is DeliveryStatus.OUTSIDE_DESTINATION
    aliases.set_catch_all(CLI, "ours.test", ["ann@ours.test"])
    Mailbox.objects.get(user__username="ann@ours.test").user.delete()  # leaves the catch-all looping
    assert look_up_recipient("x@ours.test") is DeliveryStatus.ALIAS_LOOP
    assert look_up_recipient("nobody@elsewhere.example") is DeliveryStatus.NO_SUCH_MAILBOX


@pytest.mark.django_db
def test_a_mailbox_address_is_still_one_query_at_rcpt(make_mailbox):
    make_mailbox("ann@ours.test")
    aliases.set_catch_all(CLI, "ours.test", ["ann@ours.test"])
    with CaptureQueriesContext(connection) as queries:
        assert isinstance(look_up_recipient("ann@ours.test", 100), Recipient)
    assert len(queries) == 1


@pytest.mark.django_db
def test_an_alias_domain_and_a_catch_all_deliver_and_count(make_mailbox):
    make_mailbox("ann@ours.test")
    make_mailbox("cid@ours.test")
    aliases.create_alias_domain(CLI, "ours-alias.test", "ours.test")
    aliases.set_catch_all(CLI, "ours.test", ["cid@ours.test"])
    results = deliver(["ann@ours-alias.test", "whoever@ours-alias.test"], [BODY], sender=SENDER)
    assert [r.status for r in results] == [DeliveryStatus.DELIVERED, DeliveryStatus.DELIVERED]
    assert (len(stored("ann@ours.test")), len(stored("cid@ours.test"))) == (1, 1)
    assert received_today("@ours.test") == 1


@pytest.mark.django_db(transaction=True)
def test_deliver_command_delivers_an_alias_to_the_mailboxes_with_room_as_runlmtp_does(make_mailbox):
    make_mailbox("ann@ours.test", quota_bytes=FULL)
    make_mailbox("bob@ours.test")
    aliases.create_alias(CLI, "team@ours.test", ["ann@ours.test", "bob@ours.test"])
    aliases.create_alias(CLI, "fwd@ours.test", ["bob@ours.test", "someone@remote.example"])
    done = run_manage("deliver", "--sender", SENDER, "team@ours.test", input=BODY)
    assert done.returncode == 0, done.stderr
    assert b"(not for ann@ours.test: over quota)" in done.stdout
    assert stored("bob@ours.test") == [trace_headers(SENDER, "bob@ours.test") + BODY]
    assert (usage("ann@ours.test"), received_today("team@ours.test")) == ((0, 0), 1)
    done = run_manage("deliver", "fwd@ours.test", input=BODY)
    assert done.returncode == 78
    assert b"fwd@ours.test: alias forwards to outside addresses; expand aliases in the MTA" in done.stderr


@pytest.mark.django_db(transaction=True)
def test_deliver_command_stores_nothing_when_another_recipient_fails(make_mailbox):
    make_mailbox("bob@ours.test")
    aliases.create_alias(CLI, "team@ours.test", ["bob@ours.test"])
    done = run_manage("deliver", "team@ours.test", "nobody@ours.test", input=BODY)
    assert done.returncode == 67
    assert stored("bob@ours.test") == [] and received_today("team@ours.test") == 0


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_runlmtp_answers_each_recipient_of_an_alias_on_its_own(make_mailbox, tmp_path):
    make_mailbox("ann@ours.test", quota_bytes=FULL)
    make_mailbox("bob@ours.test")
    aliases.create_alias(CLI, "team@ours.test", ["ann@ours.test", "bob@ours.test"])
    aliases.create_alias(CLI, "fwd@ours.test", ["someone@remote.example"])
    aliases.create_alias(CLI, "loop@ours.test", ["bob@ours.test"])
    aliases.set_catch_all(CLI, "ours.test", ["loop@ours.test"])
    aliases.update_alias(CLI, "loop@ours.test", active=False)  # now the catch-all loops
    with running_lmtp(tmp_path / "lmtp") as server, server.connect() as client:
        client.send(b"LHLO client.test\r\n")
        client.reply()
        client.command(f"MAIL FROM:<{SENDER}>")
        replies = [
            client.command(f"RCPT TO:<{rcpt}>")
            for rcpt in ("team@ours.test", "fwd@ours.test", "loop@ours.test", "bob@ours.test")
        ]
        assert replies == [
            RECIPIENT_OK,
            OUTSIDE_REFUSED.format(rcpt="fwd@ours.test"),
            LOOP_REFUSED.format(rcpt="loop@ours.test"),
            RECIPIENT_OK,
        ]
        assert client.command("DATA").startswith("354")
        client.send(BODY + b".\r\n")
        assert client.lines(2) == [
            SAVED_EXCEPT.format(rcpt="team@ours.test", missed="ann@ours.test (over quota)"),
            SAVED.format(rcpt="bob@ours.test"),
        ]
        assert client.command("QUIT").startswith("221")
    assert stored("bob@ours.test") == [trace_headers(SENDER, "bob@ours.test") + BODY]
    assert (usage("ann@ours.test"), received_today("team@ours.test")) == ((0, 0), 1)


@pytest.mark.django_db
def test_the_days_first_message_forgets_counts_older_than_30_days(make_mailbox):
    make_mailbox("ann@ours.test")
    alias = aliases.create_alias(CLI, "info@ours.test", ["ann@ours.test"])
    today = timezone.now().date()
    for days_ago in (30, 29):
        AliasDailyCount.objects.create(alias=alias, day=today - timezone.timedelta(days=days_ago), messages=5)
    deliver(["info@ours.test"], [BODY])
    deliver(["info@ours.test"], [BODY])
    kept = AliasDailyCount.objects.filter(alias=alias).order_by("day").values_list("day", "messages")
    assert list(kept) == [(today - timezone.timedelta(days=29), 5), (today, 2)]
    assert aliases.list_aliases(CLI)[0].received_recently == 7


@pytest.mark.django_db
def test_an_unknown_address_costs_three_queries_at_rcpt(make_mailbox):
    make_mailbox("ann@ours.test")
    with CaptureQueriesContext(connection) as queries:
        assert look_up_recipient("nobody@ours.test") is DeliveryStatus.NO_SUCH_MAILBOX
    # the mailbox; its alias and catch-all; an alias domain of its name: never its own domain row
    assert len(queries) == 3


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_pipes_fast_path_answers_an_alias_as_the_command_does(make_mailbox, tmp_path):
    make_mailbox("ann@ours.test", quota_bytes=FULL)
    make_mailbox("bob@ours.test")
    aliases.create_alias(CLI, "team@ours.test", ["ann@ours.test", "bob@ours.test"])
    aliases.create_alias(CLI, "fwd@ours.test", ["someone@remote.example"])
    with running_lmtp(tmp_path / "lmtp") as lmtp:
        done, path = piped(tmp_path, "--sender", SENDER, "team@ours.test", message=BODY, lmtp=lmtp)
        assert (done.returncode, path) == (0, FAST), done.stderr
        done, path = piped(tmp_path, "fwd@ours.test", message=BODY, lmtp=lmtp)
        assert (done.returncode, path) == (78, FAST), done.stderr
    assert stored("bob@ours.test") == [trace_headers(SENDER, "bob@ours.test") + BODY]
    assert usage("ann@ours.test") == (0, 0)
