"""Sans-IO LMTP server protocol (RFC 2033): bytes in, events out; replies in, bytes out.

Theory of operation
-------------------
A :class:`Connection` holds one client's protocol state and an input buffer. The I/O layer
feeds it whatever arrived (:meth:`Connection.receive_data`) and pulls events one at a time
with :meth:`Connection.next_event`; the next command is not parsed until the caller has dealt
with the previous event, which keeps pipelined commands and their replies in order (RFC 2920).

Most commands the connection answers itself, from its own state: LHLO, MAIL, RSET, NOOP, VRFY,
syntax errors and commands out of sequence come out as :class:`Reply` (send these bytes, go
on), QUIT as :class:`Close`. RCPT needs the mail store: it comes out as :class:`RcptTo`, and the
caller answers with :meth:`Connection.accept_recipient` or a refusal of its own
(:func:`recipient_reply`). After DATA's 354 the message comes out as :class:`MessageData` pieces, whole
lines with the dot-stuffing taken off (RFC 5321 section 4.5.2), as many lines at a time as are
buffered, then :class:`MessageEnd`: deliver it, and answer once per accepted recipient, in
RCPT order (RFC 2033 section 4.2). A message refused on the way (a line over the limit here,
or :meth:`Connection.refuse_message` when the caller's spool is full) is read to its end and
comes out as :class:`MessageRefused`, whose reply already has one line per recipient.

Nothing here does I/O, reads a clock, or knows asyncio, sockets or Django.
"""

import enum
import re
from dataclasses import dataclass, field
from typing import Generic, TypeVar

# --- Limits ---------------------------------------------------------------------------------
# RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets, CRLF included.
MAX_COMMAND_LINE = 512
# What an unfinished line may hold and still turn out to be the final dot (".\r\n" cut short).
_TERMINATOR_PREFIXES = (b".", b".\r")

CRLF = b"\r\n"


class State(enum.Enum):
    START = "before LHLO"  # RFC 2033 section 4.1: LHLO opens the session
    READY = "no mail transaction"
    MAIL = "sender given, recipients being added"
    DATA = "reading the message"
    CLOSED = "closed"


# --- Reply texts (RFC 2033, RFC 3463 enhanced codes). ``{rcpt}`` is the address as given. ----
REPLY_BYE = "221 2.0.0 Bye"
REPLY_OK = "250 2.0.0 Ok"
REPLY_SENDER_OK = "250 2.1.0 Ok"
REPLY_RECIPIENT_OK = "250 2.1.5 Ok"
REPLY_START_DATA = "354 2.0.0 End data with <CR><LF>.<CR><LF>"
REPLY_USE_LHLO = "500 5.5.1 This is LMTP: use LHLO"
REPLY_UNKNOWN_COMMAND = "500 5.5.1 Unknown command"
REPLY_COMMAND_TOO_LONG = "500 5.5.2 Line too long"
REPLY_LHLO_SYNTAX = "501 5.5.4 LHLO needs a host name"
REPLY_MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address>"
REPLY_RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address>"
REPLY_VRFY_REFUSED = "502 5.5.1 VRFY is not supported"
REPLY_LHLO_FIRST = "503 5.5.1 Send LHLO first"
REPLY_SENDER_GIVEN = "503 5.5.1 Sender already given"
REPLY_MAIL_FIRST = "503 5.5.1 Send MAIL first"
REPLY_NO_RECIPIENTS = "503 5.5.1 No valid recipients"
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_SIZE_SYNTAX = "501 5.5.4 Syntax: SIZE=<number of octets>"
REPLY_BAD_PARAMETER = "555 5.5.4 Unsupported MAIL parameter"
# After DATA, one per accepted recipient (RFC 2033 section 4.2), and at RCPT.
REPLY_DELIVERED = "250 2.0.0 <{rcpt}> Saved"
# An alias stored for some of its mailboxes: sending again would duplicate theirs (README).
REPLY_DELIVERED_EXCEPT = "250 2.0.0 <{rcpt}> Saved, except for {missed}"
REPLY_USER_UNKNOWN = "550 5.1.1 <{rcpt}> User unknown"
REPLY_MAILBOX_DISABLED = "550 5.2.1 <{rcpt}> Mailbox disabled"
REPLY_OVER_QUOTA_TEMPORARY = "452 4.2.2 <{rcpt}> Mailbox is full"
REPLY_OVER_QUOTA_PERMANENT = "552 5.2.2 <{rcpt}> Mailbox is full"
REPLY_TOO_BIG = "552 5.3.4 Message too big for system"
REPLY_LINE_TOO_LONG = "500 5.5.2 Message line too long"
REPLY_TEMPORARY_FAILURE = "451 4.3.0 <{rcpt}> Temporary internal failure"
# X.3.5, system incorrectly configured: outside addresses reach us only if the MTA leaves
# aliases unexpanded. X.4.6, routing loop detected.
REPLY_OUTSIDE_DESTINATION = (
    "550 5.3.5 <{rcpt}> Alias forwards to outside addresses: "
    "the MTA must expand aliases (Postfix virtual_alias_maps)"
)
REPLY_ALIAS_LOOP = "550 5.4.6 <{rcpt}> Alias loop or expansion too deep"
REPLY_DATABASE_DOWN = "451 4.3.0 Temporary internal failure"
# When the server ends the session (RFC 5321 section 3.8).
REPLY_SHUTTING_DOWN = "421 4.3.2 Shutting down"
REPLY_IDLE = "421 4.4.2 Idle for too long, closing connection"
REPLY_INTERNAL_ERROR = "421 4.3.0 Internal error"

# The address is echoed in replies: no CR (or other control character) may reach them.
_PATH = re.compile(r"^(FROM|TO):\s*<([^<>\x00-\x1f\x7f]*)>(.*)$", re.IGNORECASE)
_BODY_TYPES = ("7BIT", "8BITMIME")  # RFC 6152
# RFC 1870 section 3: size-value ::= 1*20DIGIT. ASCII digits only: "²".isdigit() is true, and
# int() reads "٣" as 3.
_SIZE_VALUE = re.compile(r"[0-9]{1,20}")


def reply(*lines: str) -> bytes:
    """Reply lines as bytes, each ending in CRLF."""
    return b"".join(line.encode() + CRLF for line in lines)


def recipient_reply(template: str, address: str) -> bytes:
    """One of the ``<{rcpt}>`` replies for ``address``: a RCPT refusal, or a reply after DATA."""
    return reply(template.format(rcpt=address))


class LocalProtocolError(Exception):
    """The caller misused this module (our bug, not the client's)."""


@dataclass(frozen=True)
class Policy:
    """Limits and names the I/O layer decides from its configuration."""

    hostname: str
    max_message_bytes: int  # advertised as SIZE (RFC 1870) and enforced at MAIL
    max_recipients: int
    max_data_line_bytes: int  # a message line, CRLF included


# --- Events ---------------------------------------------------------------------------------

R = TypeVar("R")


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class NeedData(Event):
    """Nothing to act on in the buffer; feed more bytes."""


NEED_DATA = NeedData()


@dataclass(frozen=True)
class Reply(Event):
    """The connection answered by itself: send ``data`` and go on."""

    data: bytes


@dataclass(frozen=True)
class Close(Event):
    """Send ``data`` and close the connection."""

    data: bytes


@dataclass(frozen=True)
class RcptTo(Event):
    """Look ``address`` up; answer with accept_recipient() or a refusal line of your own."""

    address: str
    size_hint: int  # the SIZE declared at MAIL, or 0


@dataclass(frozen=True)
class MessageData(Event):
    """Whole message lines, unstuffed, as they arrived (bare LFs included)."""

    data: bytes


@dataclass(frozen=True)
class MessageEnd(Event, Generic[R]):
    """The final dot: deliver to ``recipients`` and reply once for each, in this order."""

    sender: str
    recipients: tuple[R, ...]


@dataclass(frozen=True)
class MessageRefused(Event, Generic[R]):
    """The final dot of a refused message: drop what was spooled and send ``data``, the
    ``refusal`` line once for each of ``recipients``."""

    data: bytes
    refusal: str = ""
    recipients: tuple[R, ...] = ()


@dataclass
class _Transaction(Generic[R]):
    sender: str = ""
    size_hint: int = 0
    recipients: list[R] = field(default_factory=list)
    refusal: str | None = None  # the reply for every recipient, once the message is refused


class Connection(Generic[R]):
    """One LMTP client's protocol state; see the module docstring."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.state = State.START
        self._buffer = bytearray()
        self._skipping_line = False  # inside a line that is over the limit, up to its LF
        self._transaction: _Transaction[R] = _Transaction()

    def greeting(self) -> bytes:
        return reply(f"220 {self.policy.hostname} LMTP ready")

    # Input -----------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def next_event(self) -> Event:
        if self.state is State.CLOSED:
            raise LocalProtocolError("next_event() after the connection closed")
        if self.state is State.DATA:
            return self._message_event()
        return self._command_event()

    # Calls from the caller -------------------------------------------------------------------

    def accept_recipient(self, recipient: R) -> bytes:
        """The RcptTo just pulled was found: add it to the transaction; returns the 250."""
        if self.state is not State.MAIL:
            raise LocalProtocolError("accept_recipient() outside a mail transaction")
        self._transaction.recipients.append(recipient)
        return reply(REPLY_RECIPIENT_OK)

    def refuse_message(self, line: str) -> None:
        """Refuse the message being read (e.g. over the size limit): read it to its end, answer
        ``line`` for every recipient, and emit no more MessageData."""
        if self.state is not State.DATA:
            raise LocalProtocolError("refuse_message() outside DATA")
        self._transaction.refusal = self._transaction.refusal or line

    def closed(self) -> None:
        self.state = State.CLOSED

    # Commands --------------------------------------------------------------------------------

    def _skip_rest_of_line(self) -> bool:
        """Drop what is left of a line too long; True once its end (its LF) has been dropped."""
        newline = self._buffer.find(b"\n")
        if newline < 0:
            self._buffer.clear()
            return False
        del self._buffer[: newline + 1]
        self._skipping_line = False
        return True

    def _command_event(self) -> Event:
        buffer = self._buffer
        if self._skipping_line:
            return Reply(reply(REPLY_COMMAND_TOO_LONG)) if self._skip_rest_of_line() else NEED_DATA
        newline = buffer.find(b"\n", 0, MAX_COMMAND_LINE)
        if newline < 0:
            if len(buffer) >= MAX_COMMAND_LINE:  # its LF, wherever it is, ends a line too long
                self._skipping_line = True
                return self._command_event()
            return NEED_DATA
        line = bytes(buffer[: newline + 1])
        del buffer[: newline + 1]
        return self._command(line.rstrip(b"\r\n").decode("utf-8", "replace"))

    def _command(self, text: str) -> Event:
        verb, _, argument = text.partition(" ")
        verb = verb.upper() if verb.isascii() else ""  # "ſ".upper() is "S": verbs are ASCII
        if verb == "QUIT":
            self.state = State.CLOSED
            return Close(reply(REPLY_BYE))
        refusal = _OUT_OF_SEQUENCE.get(verb, {}).get(self.state)
        if refusal is not None:
            return Reply(reply(refusal))
        handler = _HANDLERS.get(verb)
        if handler is None:
            return Reply(reply(_FIXED_REPLIES.get(verb, REPLY_UNKNOWN_COMMAND)))
        return handler(self, argument.strip())

    def _lhlo(self, argument: str) -> Event:
        if not argument:
            return Reply(reply(REPLY_LHLO_SYNTAX))
        self.state = State.READY
        self._transaction = _Transaction()
        # RFC 2033 section 4.1, with the extensions of RFC 2920, 2034, 6152 and 1870.
        return Reply(
            reply(
                f"250-{self.policy.hostname}",
                "250-PIPELINING",
                "250-ENHANCEDSTATUSCODES",
                "250-8BITMIME",
                f"250 SIZE {self.policy.max_message_bytes}",
            )
        )

    def _mail(self, argument: str) -> Event:
        match = _PATH.match(argument)
        if not match or match.group(1).upper() != "FROM":
            return Reply(reply(REPLY_MAIL_SYNTAX))
        size_hint = 0
        for parameter in match.group(3).split():
            name, _, value = parameter.partition("=")
            name = name.upper()
            if name == "SIZE":
                if not _SIZE_VALUE.fullmatch(value):
                    return Reply(reply(REPLY_SIZE_SYNTAX))
                size_hint = int(value)
            elif not (name == "BODY" and value.upper() in _BODY_TYPES):
                return Reply(reply(REPLY_BAD_PARAMETER))
        if size_hint > self.policy.max_message_bytes:  # RFC 1870 section 6.1
            return Reply(reply(REPLY_TOO_BIG))
        self.state = State.MAIL
        self._transaction = _Transaction(sender=match.group(2), size_hint=size_hint)
        return Reply(reply(REPLY_SENDER_OK))

    def _rcpt(self, argument: str) -> Event:
        match = _PATH.match(argument)
        if not match or match.group(1).upper() != "TO" or match.group(3).strip():
            return Reply(reply(REPLY_RCPT_SYNTAX))
        if len(self._transaction.recipients) >= self.policy.max_recipients:
            return Reply(reply(REPLY_TOO_MANY_RECIPIENTS))
        return RcptTo(match.group(2), self._transaction.size_hint)

    def _data(self, argument: str) -> Event:
        if not self._transaction.recipients:
            return Reply(reply(REPLY_NO_RECIPIENTS))
        self.state = State.DATA
        return Reply(reply(REPLY_START_DATA))

    def _rset(self, argument: str) -> Event:
        if self.state is not State.START:
            self.state = State.READY
        self._transaction = _Transaction()
        return Reply(reply(REPLY_OK))

    def _noop(self, argument: str) -> Event:
        return Reply(reply(REPLY_OK))

    # The message -----------------------------------------------------------------------------
    # Work per read, not per line: the buffer is searched a few times at C speed (the end of
    # the last whole line, the final dot, stuffed dots, one step per max_data_line_bytes for the
    # line limit), and everything buffered goes out as one MessageData.

    def _message_event(self) -> Event:
        buffer = self._buffer
        if self._skipping_line and not self._skip_rest_of_line():
            return NEED_DATA
        end = _final_dot(buffer)
        if end == 0:
            return self._message_end()
        if self._transaction.refusal is not None:
            return self._skip_refused(end)
        stop = end if end > 0 else len(buffer)
        overlong = _first_overlong_line(buffer, stop, self.policy.max_data_line_bytes)
        if overlong >= 0:
            self._transaction.refusal = REPLY_LINE_TOO_LONG
            del buffer[:overlong]
            self._skipping_line = True
            return self._message_event()
        whole = end if end > 0 else buffer.rfind(b"\n") + 1
        if whole == 0:
            return NEED_DATA
        data = bytes(buffer[:whole])
        del buffer[:whole]
        return MessageData(_unstuff(data))

    def _skip_refused(self, end: int) -> Event:
        """Drop the lines of a refused message, keeping only what could begin its final dot."""
        buffer = self._buffer
        if end > 0:
            del buffer[:end]
            return self._message_end()
        del buffer[: buffer.rfind(b"\n") + 1]
        if buffer and bytes(buffer) not in _TERMINATOR_PREFIXES:
            buffer.clear()
            self._skipping_line = True
        return NEED_DATA

    def _message_end(self) -> Event:
        del self._buffer[: self._buffer.find(b"\n") + 1]
        transaction, self._transaction = self._transaction, _Transaction()
        self.state = State.READY
        if transaction.refusal is not None:
            recipients = tuple(transaction.recipients)
            return MessageRefused(
                reply(*[transaction.refusal] * len(recipients)), transaction.refusal, recipients
            )
        return MessageEnd(transaction.sender, tuple(transaction.recipients))


def _final_dot(buffer: bytearray) -> int:
    """Where the line holding only "." starts (the buffer starts a line), or -1 if not yet here."""
    if buffer.startswith((b".\r\n", b".\n")):
        return 0
    first = buffer.find(b"\n.")  # rare outside the final dot: one search settles most reads
    if first < 0:
        return -1
    found = [at + 1 for at in (buffer.find(b"\n.\r\n", first), buffer.find(b"\n.\n", first)) if at >= 0]
    return min(found, default=-1)


def _first_overlong_line(buffer: bytearray, stop: int, limit: int) -> int:
    """Where the first line over ``limit`` octets (LF included) starts in ``buffer[:stop]``, or -1.

    A line starting at ``start`` fits when its LF lies before ``start + limit``; the last LF in
    that window starts the next line to check, so each step skips every short line in it.
    An unfinished last line is over the limit once it holds ``limit`` octets without an LF.
    """
    start = 0
    while start < stop:
        window_end = start + limit
        newline = buffer.rfind(b"\n", start, min(window_end, stop))
        if newline < 0:
            return start if window_end <= stop else -1
        start = newline + 1
    return -1


def _unstuff(data: bytes) -> bytes:
    """RFC 5321 section 4.5.2: a leading dot on a line is removed; ``data`` starts a line."""
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\n.", b"\n") if b"\n." in data else data


# Commands refused in some states, and the reply (RFC 2033 section 4.1, RFC 5321 section 4.1.4).
_OUT_OF_SEQUENCE = {
    "MAIL": {State.START: REPLY_LHLO_FIRST, State.MAIL: REPLY_SENDER_GIVEN},
    "RCPT": {State.START: REPLY_MAIL_FIRST, State.READY: REPLY_MAIL_FIRST},
    "DATA": {State.START: REPLY_MAIL_FIRST, State.READY: REPLY_MAIL_FIRST},
}
_HANDLERS = {
    "LHLO": Connection._lhlo,
    "MAIL": Connection._mail,
    "RCPT": Connection._rcpt,
    "DATA": Connection._data,
    "RSET": Connection._rset,
    "NOOP": Connection._noop,
}
# Verbs answered the same way in every state.
_FIXED_REPLIES = {
    "HELO": REPLY_USE_LHLO,  # RFC 2033 section 4.1
    "EHLO": REPLY_USE_LHLO,
    "VRFY": REPLY_VRFY_REFUSED,  # RFC 5321 section 3.5.3: VRFY may be refused
}
