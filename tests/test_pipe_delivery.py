"""``manage.py deliver`` through a running runlmtp (the fast path), and without one (in-process).

Which path a delivery took is read from the packages the child imported (the fast path imports
neither Django nor daphne nor psycopg), never from how long it took.
"""

import io
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mailadmin.hosting.store import iter_message_bytes
from mailadmin.mailin import pipe
from mailadmin.mailin.lmtp import protocol
from mailadmin.mailin.lmtp.server import STATUS_REPLIES
from mailadmin.mailin.status import DeliveryStatus
from mailadmin.models import Mailbox, Message
from tests.conftest import NO_RUNLMTP, PROJECT_DIR, child_environment, run_manage
from tests.lmtp_server import LmtpProcess, running_lmtp

SENDER = "someone@remote.test"
MESSAGE = b"From: someone@remote.test\nSubject: piped\n\nhello\n.a line with a dot\n"
FAST, IN_PROCESS = "fast", "in-process"


def deliver(tmp_path: Path, *arguments: str, message: bytes = MESSAGE, lmtp: LmtpProcess | None = None):
    """Run ``manage.py deliver ARGUMENTS`` with the runlmtp given (or none); the completed
    process, and which path it took: FAST imports none of the watched packages (Django, daphne,
    Twisted, psycopg, channels), IN_PROCESS imports Django."""
    report = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.json"
    where = NO_RUNLMTP
    if lmtp is not None and lmtp.socket_path is not None:
        where = {"LMTP_SOCKET": str(lmtp.socket_path)}
    elif lmtp is not None:
        where = {"LMTP_BIND": "127.0.0.1", "LMTP_PORT": str(lmtp.port), "LMTP_SOCKET": ""}
    result = subprocess.run(
        [sys.executable, "-m", "tests.workers.loaded_modules", str(report), "manage.py", "deliver"]
        + list(arguments),
        input=message,
        capture_output=True,
        env=child_environment(**where),
        cwd=PROJECT_DIR,
        timeout=120,
    )
    loaded = json.loads(report.read_text())
    return result, FAST if loaded == [] else IN_PROCESS if "django" in loaded else loaded


def stored(address: str) -> list[bytes]:
    messages = Message.objects.filter(mailbox__user__username=address).order_by("pk")
    return [b"".join(iter_message_bytes(message.pk)) for message in messages]


def trace(address: str, sender: str = SENDER) -> bytes:
    return f"Return-Path: <{sender}>\r\nDelivered-To: {address}\r\n".encode()


# --- Without a process: the reply table and the arguments ------------------------------------


def test_every_refusal_runlmtp_sends_maps_to_the_status_it_stands_for() -> None:
    replies = {status: template for status, template in STATUS_REPLIES.items() if status.value != "delivered"}
    replies[DeliveryStatus.OVER_QUOTA] = protocol.REPLY_OVER_QUOTA_TEMPORARY
    mapped = {}
    for status, template in replies.items():
        code, _, text = template.format(rcpt="a@example.test").partition(" ")
        mapped[status] = pipe._status(code, text)
    code, _, text = protocol.REPLY_OVER_QUOTA_PERMANENT.format(rcpt="a@example.test").partition(" ")
    assert pipe._status(code, text) is DeliveryStatus.OVER_QUOTA
    assert mapped == {status: status for status in replies}
    assert set(mapped) == {
        DeliveryStatus.NO_SUCH_MAILBOX,
        DeliveryStatus.MAILBOX_INACTIVE,
        DeliveryStatus.TOO_LARGE,
        DeliveryStatus.TEMPORARY_FAILURE,
        DeliveryStatus.OVER_QUOTA,
        DeliveryStatus.OUTSIDE_DESTINATION,
        DeliveryStatus.ALIAS_LOOP,
    }


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["a@example.test"], ("", "a@example.test")),
        (["--sender", "s@x.test", "a@example.test"], ("s@x.test", "a@example.test")),
        (["a@example.test", "--sender=s@x.test"], ("s@x.test", "a@example.test")),
        (["--sender", "", "a@example.test"], ("", "a@example.test")),
        (["a@example.test", "b@example.test"], None),  # all-or-none needs the in-process path
        (["--help"], None),
        (["--verbosity", "2", "a@example.test"], None),
        (["--", "a@example.test"], None),
        (["<a@example.test>"], None),
        (["--sender", "s\r\nRCPT TO:<x@y>", "a@example.test"], None),
        (["a\udcffb@example.test"], None),  # argv bytes that are not UTF-8
        (["x" * 600 + "@example.test"], None),
        ([], None),
    ],
)
def test_the_fast_path_takes_only_arguments_it_reads_unambiguously(argv, expected) -> None:
    assert pipe.parse_arguments(argv) == expected


def test_dot_stuffing_holds_across_block_boundaries() -> None:
    blocks = [b".first\n", b".second\nthird\n.", b"fourth\r\n", b"\n.", b".fifth"]
    assert b"".join(pipe._stuffed(blocks)) == b"..first\n..second\nthird\n..fourth\r\n\n...fifth"


def test_the_exit_code_of_mixed_failures_is_the_permanent_one() -> None:
    statuses = [DeliveryStatus.OVER_QUOTA, DeliveryStatus.MAILBOX_INACTIVE, DeliveryStatus.NO_SUCH_MAILBOX]
    assert pipe.exit_code(statuses) == 67
    assert pipe.exit_code([DeliveryStatus.OVER_QUOTA, DeliveryStatus.TOO_LARGE]) == 69
    assert pipe.exit_code([DeliveryStatus.TEMPORARY_FAILURE]) == 75


# --- Against a scripted server: when the fast path hands over, and when it must not --------------


def scripted_lmtp(replies_after_data: list[bytes], close_after_dot: bool) -> tuple[int, list[bytes]]:
    """A one-connection LMTP server on a free port: greets, answers LHLO and the pipelined
    envelope, then either closes mid-message or reads to the final dot and closes (or replies).
    Returns the port and the list the bytes it received go to."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        connection, _ = listener.accept()
        with connection, listener:
            connection.sendall(b"220 scripted LMTP\r\n")
            data = b""
            while b"LHLO" not in data:
                data += connection.recv(65536)
            connection.sendall(b"250-scripted\r\n250-PIPELINING\r\n250 SIZE 100000000\r\n")
            while data.count(b"\r\n") < 4:  # LHLO, MAIL, RCPT, DATA
                data += connection.recv(65536)
            connection.sendall(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
            if not close_after_dot:
                received.append(data + connection.recv(10))
                return  # closes in the middle of the message
            while not data.endswith(b"\r\n.\r\n"):
                data += connection.recv(65536)
            received.append(data)
            for reply in replies_after_data:
                connection.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], received


def test_the_final_dot_is_not_held_back_for_runlmtps_delayed_ack() -> None:
    """The dot is a small write right after the message's last block: with Nagle's algorithm
    on, it waited for runlmtp's delayed ACK (40 ms) before runlmtp could commit."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        where = {"LMTP_BIND": "127.0.0.1", "LMTP_PORT": str(listener.getsockname()[1]), "LMTP_SOCKET": ""}
        client = pipe.LmtpClient.connect(where)
        try:
            assert client.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            client.close()


@pytest.fixture
def stdin_holding(monkeypatch):
    def hold(message: bytes) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(message)))

    return hold


def test_runlmtp_gone_before_the_final_dot_hands_the_whole_message_over(monkeypatch, stdin_holding) -> None:
    message = b"Subject: x\n\n" + b"line\n" * 4_000_000  # more than socket buffers hold
    port, _ = scripted_lmtp([], close_after_dot=False)
    monkeypatch.setenv("LMTP_PORT", str(port))
    monkeypatch.setenv("LMTP_BIND", "127.0.0.1")
    monkeypatch.setenv("LMTP_SOCKET", "")
    stdin_holding(message)
    assert pipe.main(["a@example.test"]) is None
    assert sys.stdin.buffer.read() == message  # the in-process path reads all of it


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        ([], 75),
        ([b"451 4.3.0 <a@example.test> Temporary internal failure\r\n"], 75),
        ([b"250 2.0.0 Ok\r\n"], 0),
    ],
    ids=["closed after the dot", "451 after the dot", "250 after the dot"],
)
def test_after_the_final_dot_there_is_no_handing_over(
    monkeypatch, stdin_holding, capsys, replies, expected
) -> None:
    """The copy may be stored by then: the in-process path must not store it again."""
    port, received = scripted_lmtp(replies, close_after_dot=True)
    monkeypatch.setenv("LMTP_PORT", str(port))
    monkeypatch.setenv("LMTP_BIND", "127.0.0.1")
    monkeypatch.setenv("LMTP_SOCKET", "")
    stdin_holding(b"Subject: x\n\n.dot\nend")
    assert pipe.main(["--sender", "s@x.test", "a@example.test"]) == expected
    assert received[0].endswith(b"DATA\r\nSubject: x\n\n..dot\nend\r\n.\r\n")
    assert b"MAIL FROM:<s@x.test> SIZE=20\r\nRCPT TO:<a@example.test>\r\n" in received[0]


def test_an_error_reading_standard_input_is_a_temporary_failure(monkeypatch, capsys) -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            raise OSError(5, "Input/output error")

    port, _ = scripted_lmtp([], close_after_dot=False)
    monkeypatch.setenv("LMTP_PORT", str(port))
    monkeypatch.setenv("LMTP_BIND", "127.0.0.1")
    monkeypatch.setenv("LMTP_SOCKET", "")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(Broken())))
    assert pipe.main(["a@example.test"]) == 75
    assert capsys.readouterr().err == "temporary failure: OSError: [Errno 5] Input/output error\n"


# --- Through runlmtp -----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
class TestThroughRunlmtp:
    def test_delivers_without_importing_django_and_stores_what_the_in_process_path_stores(
        self, tmp_path: Path, make_mailbox
    ) -> None:
        make_mailbox("fast@example.test")
        make_mailbox("slow@example.test")
        with running_lmtp(tmp_path / "lmtp") as lmtp:
            fast, fast_modules = deliver(tmp_path, "--sender", SENDER, "fast@example.test", lmtp=lmtp)
        slow, slow_modules = deliver(tmp_path, "--sender", SENDER, "slow@example.test")
        assert (fast.returncode, fast.stdout, fast_modules) == (0, b"fast@example.test: delivered\n", FAST)
        assert (slow.returncode, slow_modules) == (0, IN_PROCESS), slow.stderr
        body = MESSAGE.replace(b"\n", b"\r\n")
        assert stored("fast@example.test") == [trace("fast@example.test") + body]
        assert stored("slow@example.test") == [trace("slow@example.test") + body]

    @pytest.mark.parametrize(
        "message",
        [
            b".starts with a dot\r\n.\r\nx\n.\nbare CR\r.y\r\rends in bare CR\r",
            b"no final line end\n..two dots",
            b"nul \x00 byte\r\n\r\n" + b"".join(b"." * (n % 3) + b"line %d\n" % n for n in range(150_000)),
            b"crlf split over a block: " + b"x" * (64 * 1024 - 27) + b"\r\n." + b"y" * 5,
        ],
        ids=["dots-and-bare-cr", "no-final-line-end", "over-a-megabyte", "block-boundary"],
    )
    def test_odd_messages_are_stored_byte_for_byte_as_in_process(
        self, tmp_path: Path, make_mailbox, message: bytes
    ) -> None:
        make_mailbox("fast@example.test")
        make_mailbox("slow@example.test")
        with running_lmtp(tmp_path / "lmtp") as lmtp:
            fast, fast_modules = deliver(tmp_path, "fast@example.test", message=message, lmtp=lmtp)
        slow, _ = deliver(tmp_path, "slow@example.test", message=message)
        assert (fast.returncode, fast_modules, slow.returncode) == (0, FAST, 0), fast.stderr + slow.stderr
        [fast_copy], [slow_copy] = stored("fast@example.test"), stored("slow@example.test")
        assert fast_copy.removeprefix(trace("fast@example.test", "")) == slow_copy.removeprefix(
            trace("slow@example.test", "")
        )

    def test_refusals_give_the_sysexits_codes_and_store_nothing(self, tmp_path: Path, make_mailbox) -> None:
        make_mailbox("full@example.test", quota_bytes=20)
        make_mailbox("off@example.test")
        Mailbox.objects.filter(user__username="off@example.test").update(active=False)
        with running_lmtp(tmp_path / "lmtp") as lmtp:
            outcomes = {
                address: deliver(tmp_path, address, lmtp=lmtp)
                for address in ("ghost@example.test", "off@example.test", "full@example.test")
            }
        assert {address: (r.returncode, m) for address, (r, m) in outcomes.items()} == {
            "ghost@example.test": (67, FAST),
            "off@example.test": (69, FAST),
            "full@example.test": (75, FAST),
        }
        assert {address: r.stderr.decode() for address, (r, _) in outcomes.items()} == {
            "ghost@example.test": "not delivered: ghost@example.test: no such mailbox\n",
            "off@example.test": "not delivered: off@example.test: mailbox inactive\n",
            "full@example.test": "not delivered: full@example.test: over quota\n",
        }
        assert Message.objects.count() == 0

    def test_over_quota_then_a_retry_after_raising_the_quota_delivers_once(
        self, tmp_path: Path, make_mailbox
    ) -> None:
        make_mailbox("full@example.test", quota_bytes=20)
        with running_lmtp(tmp_path / "lmtp", LMTP_OVER_QUOTA_PERMANENT="1") as lmtp:
            first, _ = deliver(tmp_path, "full@example.test", lmtp=lmtp)  # 552 5.2.2: still 75
            assert run_manage("setquota", "full@example.test", "1M").returncode == 0
            retry, modules = deliver(tmp_path, "full@example.test", lmtp=lmtp)
        assert (first.returncode, retry.returncode, modules) == (75, 0, FAST)
        assert len(stored("full@example.test")) == 1

    def test_a_message_over_runlmtps_size_is_69_after_reading_just_past_the_limit(
        self, tmp_path: Path, make_mailbox
    ) -> None:
        make_mailbox("on@example.test")
        with running_lmtp(tmp_path / "lmtp", MAILADMIN_MAX_MESSAGE_SIZE_BYTES="1000") as lmtp:
            big, modules = deliver(tmp_path, "on@example.test", message=b"x" * 2000, lmtp=lmtp)
        assert (big.returncode, big.stderr, modules) == (
            69,
            b"not delivered: on@example.test: message too large\n",
            FAST,
        )
        assert Message.objects.count() == 0

    def test_a_unix_socket_is_found_through_lmtp_socket(self, tmp_path: Path, make_mailbox) -> None:
        make_mailbox("sock@example.test")
        with running_lmtp(tmp_path / "lmtp", socket_path=tmp_path / "lmtp.sock") as lmtp:
            result, modules = deliver(tmp_path, "sock@example.test", lmtp=lmtp)
        assert (result.returncode, modules) == (0, FAST), result.stderr
        assert len(stored("sock@example.test")) == 1

    def test_database_down_behind_runlmtp_is_75(self, tmp_path: Path) -> None:
        unreachable = "postgres://nobody@127.0.0.1:1/none"
        with running_lmtp(tmp_path / "lmtp", DATABASE_URL=unreachable) as lmtp:
            result, modules = deliver(tmp_path, "one@example.test", lmtp=lmtp)
        assert (result.returncode, result.stderr, modules) == (
            75,
            b"not delivered: one@example.test: temporary failure\n",
            FAST,
        )

    # --- What the fast path leaves to the in-process path ----------------------------------------

    def test_several_recipients_go_in_process_all_or_none(self, tmp_path: Path, make_mailbox) -> None:
        make_mailbox("one@example.test")
        make_mailbox("two@example.test")
        with running_lmtp(tmp_path / "lmtp") as lmtp:
            refused, refused_modules = deliver(tmp_path, "one@example.test", "ghost@example.test", lmtp=lmtp)
            assert Message.objects.count() == 0
            both, both_modules = deliver(tmp_path, "one@example.test", "two@example.test", lmtp=lmtp)
        assert (refused.returncode, refused_modules) == (67, IN_PROCESS)
        assert (both.returncode, both_modules) == (0, IN_PROCESS), both.stderr
        assert Message.objects.count() == 2

    def test_an_empty_message_is_65_from_the_in_process_path(self, tmp_path: Path, make_mailbox) -> None:
        make_mailbox("one@example.test")
        with running_lmtp(tmp_path / "lmtp") as lmtp:
            result, modules = deliver(tmp_path, "one@example.test", message=b"", lmtp=lmtp)
        assert (result.returncode, modules) == (65, IN_PROCESS)
        assert b"one@example.test: empty message" in result.stderr
        assert Message.objects.count() == 0

    def test_a_line_too_long_for_runlmtp_is_stored_once_by_the_in_process_path(
        self, tmp_path: Path, make_mailbox
    ) -> None:
        make_mailbox("one@example.test")
        message = b"Subject: long\n\n" + b"z" * 3000 + b"\n"
        with running_lmtp(tmp_path / "lmtp", LMTP_MAX_LINE_BYTES="1000") as lmtp:
            result, modules = deliver(tmp_path, "one@example.test", message=message, lmtp=lmtp)
        assert (result.returncode, modules) == (0, IN_PROCESS), result.stderr
        assert stored("one@example.test") == [trace("one@example.test", "") + message.replace(b"\n", b"\r\n")]


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_without_runlmtp_the_in_process_path_delivers(tmp_path: Path, make_mailbox) -> None:
    make_mailbox("one@example.test")
    result, modules = deliver(tmp_path, "--sender", SENDER, "one@example.test")
    assert (result.returncode, modules) == (0, IN_PROCESS), result.stderr
    [uidl] = Message.objects.values_list("uidl", flat=True)
    assert result.stdout == f"one@example.test: delivered as {uidl}\n".encode()
