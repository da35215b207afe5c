"""Pipe delivery in milliseconds: hand the message to a running runlmtp, without Django.

``manage.py deliver`` calls :func:`main` before it imports Django. Starting Django costs about
a second (daphne, an installed app, imports Twisted; psycopg comes in even on SQLite), and
runlmtp has all of it loaded already: over LMTP the message gets the answers the in-process
delivery would give, turned into the same sysexits codes. Standard library only.

The fast path takes a message only where it keeps the in-process path's promises:

- one recipient. With several, all-or-none cannot be promised over LMTP: each copy's quota is
  charged again at the commit, so one copy may be refused after another was stored. With one
  there is nothing to undo. (Postfix: ``mailadmin_destination_recipient_limit = 1``.)
- arguments it reads unambiguously (``--sender ADDR`` and one address, each usable in an LMTP
  command), and a message of at least one byte.

Otherwise, and whenever runlmtp cannot be reached or answers something unexpected before the
message's final dot has gone out, :func:`main` returns None with standard input rewound, and
Django's ``deliver`` command delivers in-process: nothing was stored, so nothing is stored
twice. Once the final dot has gone out, a lost connection or an unexpected answer is
EX_TEMPFAIL, as for any LMTP client: runlmtp may have stored the copy, and the MTA retries.
"""

import io
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import BinaryIO, TypeVar

from mailadmin.mailin.lmtp.address import listen_address
from mailadmin.mailin.status import DeliveryStatus

EX_OK = 0
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78

EXIT_CODES = {
    DeliveryStatus.EMPTY_MESSAGE: EX_DATAERR,
    DeliveryStatus.NO_SUCH_MAILBOX: EX_NOUSER,
    DeliveryStatus.MAILBOX_INACTIVE: EX_UNAVAILABLE,
    DeliveryStatus.TOO_LARGE: EX_UNAVAILABLE,
    DeliveryStatus.OVER_QUOTA: EX_TEMPFAIL,
    DeliveryStatus.TEMPORARY_FAILURE: EX_TEMPFAIL,
    DeliveryStatus.OUTSIDE_DESTINATION: EX_CONFIG,
    DeliveryStatus.ALIAS_LOOP: EX_UNAVAILABLE,
}
# When recipients fail differently, a permanent reason wins: retrying cannot help.
SEVERITY = [EX_DATAERR, EX_NOUSER, EX_UNAVAILABLE, EX_CONFIG, EX_TEMPFAIL]

# runlmtp's refusals by enhanced status code (RFC 3463), as the in-process path names them.
# Over quota stays temporary even as 5.2.2 (LMTP_OVER_QUOTA_PERMANENT), as it is in-process.
REFUSALS = {
    "5.1.1": DeliveryStatus.NO_SUCH_MAILBOX,
    "5.2.1": DeliveryStatus.MAILBOX_INACTIVE,
    "4.2.2": DeliveryStatus.OVER_QUOTA,
    "5.2.2": DeliveryStatus.OVER_QUOTA,
    "5.3.4": DeliveryStatus.TOO_LARGE,
    "4.3.0": DeliveryStatus.TEMPORARY_FAILURE,
    "5.3.5": DeliveryStatus.OUTSIDE_DESTINATION,
    "5.4.6": DeliveryStatus.ALIAS_LOOP,
}
# A message runlmtp refused whole without storing it, which the in-process path takes: a
# line longer than LMTP_MAX_LINE_BYTES.
REFUSED_UNSTORED = "5.5.2"

CONNECT_TIMEOUT_SECONDS = 5.0
REPLY_TIMEOUT_SECONDS = 60.0
# The reply to the final dot comes after the commit, which may queue behind other writers.
COMMIT_TIMEOUT_SECONDS = 600.0
READ_SIZE = 64 * 1024
# Standard input is kept in memory up to this size, beyond it in a temporary file.
MEMORY_SPOOL_BYTES = 1024 * 1024
MAX_COMMAND_BYTES = 512  # RFC 5321 section 4.5.3.1.4

T = TypeVar("T")


def exit_code(statuses: Iterable[DeliveryStatus]) -> int:
    """The exit code for the statuses of the recipients that were not delivered."""
    return min((EXIT_CODES[status] for status in statuses), key=SEVERITY.index)


class FallBack(Exception):
    """The fast path cannot answer for this message; nothing has been stored."""


class LmtpClient:
    """Just enough LMTP (RFC 2033) for one transaction with runlmtp."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    @classmethod
    def connect(cls, environ: Mapping[str, str]) -> "LmtpClient":
        """Connect where settings say runlmtp listens; FallBack when nothing answers there."""
        try:
            bind, port, socket_path = listen_address(environ)
            if socket_path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(CONNECT_TIMEOUT_SECONDS)
                try:
                    sock.connect(socket_path)
                except OSError:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((_reachable(bind), port), timeout=CONNECT_TIMEOUT_SECONDS)
                # The final dot leaves in a write of its own after the message: under Nagle's
                # algorithm it would wait for runlmtp's delayed ACK of the last block (40 ms
                # on Linux), and runlmtp, waiting for the dot, has nothing to send sooner.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, ValueError) as error:
            raise FallBack(f"runlmtp not reachable: {error}") from error
        sock.settimeout(REPLY_TIMEOUT_SECONDS)
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_each(self, blocks: Iterable[bytes]) -> None:
        for block in blocks:
            self.sock.sendall(block)

    def reply(self) -> tuple[str, list[str]]:
        """One reply: its code and its lines' texts (RFC 5321 section 4.2.1)."""
        lines = []
        while True:
            while (end := self.buffer.find(b"\r\n")) < 0:
                data = self.sock.recv(READ_SIZE)
                if not data:
                    raise ConnectionError("runlmtp closed the connection")
                self.buffer += data
            line, self.buffer = self.buffer[:end].decode("utf-8", "replace"), self.buffer[end + 2 :]
            lines.append(line[4:])
            if line[3:4] != "-":
                return line[:3], lines

    def quit(self) -> None:
        """Say goodbye without waiting long for the answer: the outcome is known already."""
        try:
            self.sock.settimeout(1.0)
            self.send(b"QUIT\r\n")
            self.reply()
        except OSError:
            pass
        finally:
            self.close()


def _reachable(bind: str) -> str:
    """The address to connect to for a listener bound to ``bind`` (a wildcard means this host)."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)


def _status(code: str, text: str) -> DeliveryStatus | None:
    enhanced = text.split(" ", 1)[0]
    return REFUSALS.get(enhanced) if code[:1] in "45" else None


class MessageSpool:
    """Standard input, copied as it is read: in memory up to MEMORY_SPOOL_BYTES, then in a
    temporary file. The in-process path reads the message from here if it has to take over."""

    def __init__(self) -> None:
        self.file: io.BytesIO | BinaryIO = io.BytesIO()
        self.size = 0
        self.read_any = False  # whether standard input was read at all

    def fill(self, stdin: BinaryIO, limit: int) -> None:
        """Copy standard input, up to one byte over ``limit`` (enough to know it is too large)."""
        self.read_any = True
        while self.size <= limit and (data := stdin.read(min(READ_SIZE, limit + 1 - self.size))):
            if self.size + len(data) > MEMORY_SPOOL_BYTES and isinstance(self.file, io.BytesIO):
                self.file = _file_holding(self.file.getvalue())
            self.file.write(data)
            self.size += len(data)

    def blocks(self) -> Iterator[bytes]:
        self.file.seek(0)
        while data := self.file.read(READ_SIZE):
            yield data

    def last_byte(self) -> bytes:
        self.file.seek(-1, io.SEEK_END)
        return self.file.read(1)

    def rewound(self) -> BinaryIO:
        self.file.seek(0)
        return self.file


def _file_holding(data: bytes) -> BinaryIO:
    import tempfile  # only for messages over a megabyte: importing it costs milliseconds

    file = tempfile.TemporaryFile()
    file.write(data)
    return file


def hand_over(
    client: LmtpClient, sender: str, recipient: str, stdin: BinaryIO, spool: MessageSpool
) -> DeliveryStatus:
    """One LMTP transaction for ``recipient``; FallBack while nothing can have been stored.

    Standard input is read once runlmtp has said how large a message it takes (SIZE), so a
    message over that size is refused after one byte more than the limit.
    """
    limit = _talking(lambda: _greet(client))
    spool.fill(stdin, limit)  # an error reading standard input is no reason to try again in-process
    if spool.size == 0:
        raise FallBack("empty message")  # the in-process path names it (EX_DATAERR)
    if spool.size > limit:
        client.quit()
        return DeliveryStatus.TOO_LARGE
    refusal = _talking(lambda: _envelope(client, sender, recipient, spool.size))
    if refusal is not None:
        return refusal
    _talking(lambda: client.send_each(_stuffed(spool.blocks())))
    return _final_reply(client, _TERMINATORS.get(spool.last_byte(), b"\r\n.\r\n"))


def _talking(exchange: Callable[[], T]) -> T:
    """An exchange with runlmtp before the final dot: if the connection fails, FallBack."""
    try:
        return exchange()
    except OSError as error:
        raise FallBack(f"runlmtp went away: {error}") from error


# What ends the message after its last byte: the final dot on a line of its own. A final bare
# CR gets its LF (the stored message ends in CRLF, as the in-process path stores it).
_TERMINATORS = {b"\n": b".\r\n", b"\r": b"\n.\r\n"}


def _greet(client: LmtpClient) -> int:
    """Read the greeting, say LHLO; the largest message runlmtp takes (its SIZE)."""
    code, _ = client.reply()
    if code != "220":
        raise FallBack(f"runlmtp greeted with {code}")
    client.send(f"LHLO {socket.gethostname() or 'localhost'}\r\n".encode())
    code, lines = client.reply()
    sizes = [line.split()[1] for line in lines if line.upper().startswith("SIZE ")]
    if code != "250" or not sizes or not sizes[0].isdigit():
        raise FallBack("runlmtp did not say how large a message it takes")
    return int(sizes[0])


def _envelope(client: LmtpClient, sender: str, recipient: str, size: int) -> DeliveryStatus | None:
    """MAIL, RCPT and DATA in one write (RFC 2920); None once runlmtp waits for the message."""
    client.send(f"MAIL FROM:<{sender}> SIZE={size}\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode())
    (mail, mail_text), (rcpt, rcpt_text), (data, _) = [_last_line(client.reply()) for _ in range(3)]
    if mail == "250" and rcpt == "250" and data == "354":
        return None
    refusal = _status(mail, mail_text) if mail != "250" else _status(rcpt, rcpt_text)
    if refusal is None or data == "354":
        raise FallBack(f"runlmtp answered {mail}, {rcpt}, {data} to the envelope")
    client.quit()
    return refusal


def _last_line(reply: tuple[str, list[str]]) -> tuple[str, str]:
    code, lines = reply
    return code, lines[-1]


def _final_reply(client: LmtpClient, terminator: bytes) -> DeliveryStatus:
    """Send the final dot. From then on the copy may be stored: the one FallBack left is for a
    message runlmtp says it refused whole."""
    try:
        client.send(terminator)
        client.sock.settimeout(COMMIT_TIMEOUT_SECONDS)
        code, text = _last_line(client.reply())
    except OSError:
        client.close()
        return DeliveryStatus.TEMPORARY_FAILURE
    if code.startswith("5") and text.startswith(REFUSED_UNSTORED + " "):
        raise FallBack("runlmtp refused a line too long; the in-process path takes it")
    client.quit()
    if code == "250":
        return DeliveryStatus.DELIVERED
    return _status(code, text) or DeliveryStatus.TEMPORARY_FAILURE


def _stuffed(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Dot-stuffing (RFC 5321 section 4.5.2) across block boundaries.

    Lines end at LF here, as runlmtp reads them; it normalises bare CR and LF afterwards, as
    the in-process path does, so the stored bytes are the same either way.
    """
    at_line_start = True
    for block in blocks:
        stuffed = block.replace(b"\n.", b"\n..")
        yield b"." + stuffed if at_line_start and block.startswith(b".") else stuffed
        at_line_start = block.endswith(b"\n")


# --- The entry point ------------------------------------------------------------------------


def parse_arguments(argv: list[str]) -> tuple[str, str] | None:
    """(sender, recipient) from ``[--sender ADDR] RECIPIENT``, or None for anything else.

    Anything else (several recipients, --help, other options) is the Django command's to read,
    as is an address that cannot go into an LMTP command as it is.
    """
    sender, recipients, rest = "", [], list(argv)
    while rest:
        argument = rest.pop(0)
        if argument == "--sender" and rest:
            sender = rest.pop(0)
        elif argument.startswith("--sender="):
            sender = argument.removeprefix("--sender=")
        elif argument.startswith("-"):
            return None
        else:
            recipients.append(argument)
    if len(recipients) != 1 or not all(_fits_a_command(address) for address in (sender, recipients[0])):
        return None
    return sender, recipients[0]


def _fits_a_command(address: str) -> bool:
    """Whether runlmtp reads the address back as given: UTF-8 (argv may hold undecodable bytes),
    no angle brackets or control characters, room in a command line."""
    try:
        encoded = address.encode()
    except UnicodeEncodeError:
        return False
    return len(encoded) < MAX_COMMAND_BYTES - 32 and not any(
        c in "<>" or ord(c) < 0x20 or ord(c) == 0x7F for c in address
    )


def main(argv: list[str]) -> int | None:
    """``deliver`` through runlmtp: the exit code, having said what became of the message; or
    None, with ``sys.stdin`` holding the whole message, for the in-process path."""
    arguments = parse_arguments(argv)
    if arguments is None:
        return None
    sender, recipient = arguments
    spool = MessageSpool()
    try:
        client = LmtpClient.connect(os.environ)
        try:
            status = hand_over(client, sender, recipient, sys.stdin.buffer, spool)
        except FallBack:
            client.quit()
            raise
    except FallBack:
        if spool.read_any:
            sys.stdin = io.TextIOWrapper(spool.rewound())
        return None
    except Exception as error:  # noqa: BLE001 - as in-process: the MTA retries, never bounces, on our bugs
        print(f"temporary failure: {error.__class__.__name__}: {error}", file=sys.stderr)
        return EX_TEMPFAIL
    if status is DeliveryStatus.DELIVERED:
        print(f"{recipient}: delivered")
        return EX_OK
    print(f"not delivered: {recipient}: {status.value}", file=sys.stderr)
    return exit_code([status])
