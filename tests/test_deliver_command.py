"""``manage.py deliver`` in a real process: sysexits codes and all-or-none delivery."""

import pytest

from mailadmin.models import Message
from tests.conftest import run_manage

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGE = b"From: someone@remote.test\nSubject: piped\n\nhello\n"


def test_delivers_to_every_recipient_and_exits_0(make_mailbox):
    make_mailbox("one@example.test")
    make_mailbox("two@example.test")
    result = run_manage(
        "deliver", "--sender", "someone@remote.test", "one@example.test", "two@example.test", input=MESSAGE
    )
    assert result.returncode == 0, result.stderr
    assert sorted(Message.objects.values_list("mailbox__user__username", flat=True)) == [
        "one@example.test",
        "two@example.test",
    ]
    assert {m.size_bytes for m in Message.objects.all()} == {
        len(b"Return-Path: <someone@remote.test>\r\nDelivered-To: one@example.test\r\n")
        + len(MESSAGE.replace(b"\n", b"\r\n"))
    }


def test_unknown_recipient_exits_67_and_delivers_to_nobody(make_mailbox):
    make_mailbox("one@example.test")
    result = run_manage("deliver", "one@example.test", "ghost@example.test", input=MESSAGE)
    assert result.returncode == 67
    assert b"ghost@example.test: no such mailbox" in result.stderr
    assert Message.objects.count() == 0


def test_over_quota_exits_75_and_a_retry_after_raising_the_quota_delivers_once(make_mailbox):
    make_mailbox("one@example.test")
    make_mailbox("full@example.test", quota_bytes=20)
    first = run_manage("deliver", "one@example.test", "full@example.test", input=MESSAGE)
    assert first.returncode == 75
    assert b"full@example.test: over quota" in first.stderr
    assert Message.objects.count() == 0
    assert run_manage("setquota", "full@example.test", "1M").returncode == 0
    retry = run_manage("deliver", "one@example.test", "full@example.test", input=MESSAGE)
    assert retry.returncode == 0, retry.stderr
    assert Message.objects.count() == 2


def test_permanent_reason_wins_over_temporary(make_mailbox):
    make_mailbox("full@example.test", quota_bytes=20)
    result = run_manage("deliver", "full@example.test", "ghost@example.test", input=MESSAGE)
    assert result.returncode == 67


def test_inactive_mailbox_and_too_large_exit_69(make_mailbox):
    mailbox = make_mailbox("off@example.test")
    mailbox.active = False
    mailbox.save(update_fields=["active"])
    assert run_manage("deliver", "off@example.test", input=MESSAGE).returncode == 69
    make_mailbox("on@example.test")
    big = run_manage("deliver", "on@example.test", input=b"x" * 2000, MAILADMIN_MAX_MESSAGE_SIZE_BYTES="1000")
    assert big.returncode == 69
    assert b"message too large" in big.stderr


def test_database_unavailable_exits_75(make_mailbox):
    result = run_manage(
        "deliver", "one@example.test", input=MESSAGE, DATABASE_URL="postgres://nobody@127.0.0.1:1/none"
    )
    assert result.returncode == 75
    assert b"temporary failure" in result.stderr


def test_an_empty_message_exits_65_and_stores_nothing(make_mailbox):
    make_mailbox("one@example.test")
    result = run_manage("deliver", "--sender", "someone@remote.test", "one@example.test", input=b"")
    assert result.returncode == 65
    assert (
        result.stderr.decode().splitlines()[-1]
        == "CommandError: not delivered: one@example.test: empty message"
    )
    assert Message.objects.count() == 0


def test_a_recipient_named_twice_in_any_case_gets_one_copy(make_mailbox):
    make_mailbox("one@example.test")
    result = run_manage("deliver", "one@example.test", "ONE@Example.test", "one@example.test", input=MESSAGE)
    assert result.returncode == 0, result.stderr
    [uidl] = Message.objects.values_list("uidl", flat=True)
    assert result.stdout.decode().split() == [
        "one@example.test:", "delivered", "as", uidl,
        "ONE@Example.test:", "delivered", "as", uidl,
        "one@example.test:", "delivered", "as", uidl,
    ]  # fmt: skip
