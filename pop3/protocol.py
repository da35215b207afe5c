"""Sans-IO POP3 server protocol: bytes in, events out; replies in, bytes out.

Theory of operation
-------------------
A :class:`Connection` holds one client's protocol state and an input buffer. The I/O layer
feeds it whatever arrived (:meth:`Connection.receive_data`) and then pulls events, one command
line at a time, with :meth:`Connection.next_event`. Pulling one line at a time is what keeps
pipelined commands strictly in order (RFC 2449 section 6.6): the next line is not even parsed
until the caller has dealt with the previous event.

Events are of two kinds. Some lines the connection answers itself, because the answer depends
only on protocol state: CAPA, syntax errors, commands illegal in the current state, the SASL
exchanges, USER. Those come out as :class:`Reply` (write these bytes, carry on) or
:class:`Close` (write these bytes, then close). Everything that needs the mail store or the
authenticator comes out as a typed command event (:class:`Credentials`, :class:`Retr`, ...);
the caller acts, then formats its answer with :func:`ok`, :func:`err` or :func:`multiline`,
and tells the connection about state changes (:meth:`Connection.login_succeeded`,
:meth:`Connection.tls_started`).

Nothing here does I/O, reads a clock, or knows asyncio, sockets, ssl or Django.

Replies never echo client bytes (checklist G08, G09): every error text is a fixed string, and
every reply line is checked against the 512-octet limit of RFC 2449 section 4.
"""

import base64
import binascii
import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# --- Limits ---------------------------------------------------------------------------------
# RFC 2449 section 4: command lines of at least 255 octets must be accepted. Dovecot allows
# about 1 KiB before login and 2 KiB after; a line longer than these closes the session.
MAX_LINE_BEFORE_LOGIN = 1024
MAX_LINE_AFTER_LOGIN = 2048
# RFC 5034 section 4: SASL responses may be longer than a command; Dovecot caps them at 8 KiB.
MAX_SASL_LINE = 8192
# RFC 2449 section 4: a response line is at most 512 octets including CRLF.
MAX_REPLY_LINE = 512
# Consecutive bad commands before the server gives up (Dovecot's values).
MAX_BAD_COMMANDS_BEFORE_LOGIN = 3
MAX_BAD_COMMANDS_AFTER_LOGIN = 20
# Command lines (SASL responses included) before login. An honest client needs under ten per
# attempt (CAPA, STLS, CAPA, AUTH and its responses) and cannot make more than a dozen
# attempts within the login timeout once failures are delayed; what is left is a flood of
# pipelined commands that are cheap to send and cost the server a reply each.
MAX_COMMANDS_BEFORE_LOGIN = 64
# Message numbers beyond ten digits cannot name a message in any maildrop we serve.
MAX_NUMBER_DIGITS = 10
# RFC 4616 section 2: each PLAIN field up to 255 octets must be accepted.
MAX_SASL_FIELD = 255

CRLF = b"\r\n"
TERMINATOR = b".\r\n"


class State(enum.Enum):
    """RFC 1939 section 3 session states; CLOSED once the connection must end."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


class ResponseCode(enum.Enum):
    """RFC 2449 section 8 and RFC 3206 extended response codes."""

    AUTH = "AUTH"
    IN_USE = "IN-USE"
    LOGIN_DELAY = "LOGIN-DELAY"
    SYS_TEMP = "SYS/TEMP"
    SYS_PERM = "SYS/PERM"


# --- Fixed reply texts (never built from client input) ---------------------------------------
TEXT_UNKNOWN_COMMAND = "Unknown command."
TEXT_WRONG_STATE = "Command not valid in this state."
TEXT_SYNTAX = "Syntax error in arguments."
TEXT_NUL = "NUL bytes are not allowed in commands."
TEXT_BAD_ENCODING = "Command is not valid UTF-8."
TEXT_LINE_TOO_LONG = "Input line too long."
TEXT_TOO_MANY_BAD = "Too many bad commands."
TEXT_TOO_MANY_COMMANDS = "Too many commands before login."
TEXT_NO_USERNAME = "No username given."
TEXT_PLAINTEXT_DISALLOWED = "Plaintext authentication disallowed on non-secure connections."
TEXT_UNSUPPORTED_MECHANISM = "Unsupported authentication mechanism."
TEXT_AUTH_ABORTED = "Authentication aborted by client."
TEXT_AUTH_FAILED = "Authentication failed."
TEXT_TLS_ACTIVE = "TLS is already active."
TEXT_TLS_UNAVAILABLE = "TLS is not available."
TEXT_STLS_PIPELINED = "Nothing may follow STLS before the TLS handshake."
TEXT_BEGIN_TLS = "Begin TLS negotiation now."
TEXT_APOP_DISABLED = "APOP is not offered: passwords are stored as one-way hashes."
TEXT_UTF8 = "UTF-8 mode enabled."
TEXT_BYE = "Logging out."

SASL_MECHANISMS = ("PLAIN", "LOGIN")
LOGIN_USERNAME_CHALLENGE = "VXNlcm5hbWU6"  # base64("Username:")
LOGIN_PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"  # base64("Password:")


class LocalProtocolError(Exception):
    """The caller misused this module (our bug, not the client's)."""


# --- Events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class NeedData(Event):
    """No complete line is buffered; feed more bytes."""


NEED_DATA = NeedData()


@dataclass(frozen=True)
class Reply(Event):
    """The connection answered the line itself: send ``data`` and go on."""

    data: bytes
    bad_command: bool = False


@dataclass(frozen=True)
class Close(Event):
    """Send ``data`` (possibly empty) and close the connection."""

    data: bytes
    reason: str


@dataclass(frozen=True)
class Credentials(Event):
    """The client offered a username and password (USER/PASS or AUTH PLAIN/LOGIN)."""

    username: str
    password: str = field(repr=False)
    mechanism: str


@dataclass(frozen=True)
class AuthRejected(Event):
    """A malformed authentication exchange: answer it as a failed login (same delay, same text)."""

    mechanism: str
    reason: str


@dataclass(frozen=True)
class StartTls(Event):
    """Send ``data`` (the +OK), then start the TLS handshake and call tls_started()."""

    data: bytes


@dataclass(frozen=True)
class Quit(Event):
    pass


@dataclass(frozen=True)
class Stat(Event):
    pass


@dataclass(frozen=True)
class ListMessages(Event):
    number: int | None


@dataclass(frozen=True)
class Uidl(Event):
    number: int | None


@dataclass(frozen=True)
class Retr(Event):
    number: int


@dataclass(frozen=True)
class Top(Event):
    number: int
    lines: int


@dataclass(frozen=True)
class Dele(Event):
    number: int


@dataclass(frozen=True)
class Noop(Event):
    pass


@dataclass(frozen=True)
class Rset(Event):
    pass


# --- Reply formatting -----------------------------------------------------------------------


def _status_line(indicator: str, text: str, code: ResponseCode | None) -> bytes:
    body = f"{indicator} [{code.value}] {text}" if code else (f"{indicator} {text}" if text else indicator)
    line = body.encode("utf-8") + CRLF
    if len(line) > MAX_REPLY_LINE or "\r" in body or "\n" in body:
        raise LocalProtocolError("reply line over 512 octets or with a line break")
    return line


def ok(text: str = "") -> bytes:
    return _status_line("+OK", text, None)


def err(text: str, code: ResponseCode | None = None) -> bytes:
    return _status_line("-ERR", text, code)


def multiline(first_text: str, lines: Iterable[str]) -> bytes:
    """``+OK first_text``, the lines dot-stuffed, and the terminating dot line.

    Lines must not contain CR or LF; stuffing then works on the joined text in one pass.
    """
    lines = list(lines)
    if not lines:
        return ok(first_text) + TERMINATOR
    body = "\r\n".join(lines)
    if "\r\n." in body:
        body = body.replace("\r\n.", "\r\n..")
    if body.startswith("."):
        body = "." + body
    return ok(first_text) + body.encode("utf-8") + CRLF + TERMINATOR


def size_listing(first_text: str, numbered_sizes: Iterable[tuple[int, int]]) -> bytes:
    """:func:`multiline` for LIST's "n size" lines, formatted as bytes.

    Digits only, so nothing to dot-stuff, and ``b"%d %d"`` is about a third faster than text
    formatting and encoding: LIST of a 100,000-message maildrop is one such line each.
    """
    body = b"\r\n".join(b"%d %d" % pair for pair in numbered_sizes)
    return ok(first_text) + (body + CRLF if body else b"") + TERMINATOR


_DOT_AFTER_LF = re.compile(rb"\n\.")


class DotStuffer:
    """Byte-stuffs a message for RETR/TOP (RFC 1939 section 3), chunk by chunk.

    A line is anything after an LF, so a dot at the start of a chunk is stuffed exactly when
    the previous chunk ended a line: stuffing stays line-aware across chunk boundaries.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._empty = True

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        # Looking for a dot at all is a memchr (~100 GB/s): attachments (base64) have none.
        # For text, the regular expression finds and stuffs lines starting with a dot at
        # ~2 GB/s, where bytes.replace() takes ~1 GB/s to find none and 0.5 GB/s to stuff one
        # line in 40 (it was a fifth of runpop3's CPU serving a fleet of text messages).
        out = _DOT_AFTER_LF.sub(b"\n..", chunk) if b"." in chunk else chunk
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = chunk.endswith(b"\n")
        self._empty = False
        return out

    def finish(self) -> bytes:
        """The terminating dot line, preceded by a CRLF if the content did not end a line."""
        return TERMINATOR if self._empty or self._at_line_start else CRLF + TERMINATOR


def unstuff(data: bytes) -> bytes:
    """Inverse of :class:`DotStuffer` for a whole multi-line body without its terminator."""
    lines = data.split(b"\n")
    return b"\n".join(line[1:] if line.startswith(b".") else line for line in lines)


class TopLimiter:
    """Cuts a message after its header block and ``body_lines`` body lines (TOP, RFC 1939 s. 7)."""

    def __init__(self, header_size: int, body_lines: int) -> None:
        self._header_left = header_size
        self._lines_left = body_lines
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        head = chunk[: self._header_left]
        self._header_left -= len(head)
        rest = chunk[len(head) :]
        if self._header_left > 0 or not rest:
            return head
        end = 0
        while self._lines_left > 0:
            newline = rest.find(b"\n", end)
            if newline < 0:
                return head + rest
            end = newline + 1
            self._lines_left -= 1
        self.done = True
        return head + rest[:end]


# --- Connection -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """What this connection may offer, decided by the I/O layer from its configuration."""

    tls_active: bool = False
    stls_available: bool = False  # a certificate is configured and this is the plain port
    cleartext_trusted: bool = False  # loopback or a configured trusted network
    login_delay_seconds: int = 0
    implementation: str = "mailadmin"


class _Sasl(enum.Enum):
    NONE = "none"
    PLAIN = "plain"
    LOGIN_USERNAME = "login-username"
    LOGIN_PASSWORD = "login-password"


# What every line read compares the state with, as module names: an Enum member read off its
# class (``State.CLOSED``) costs several times a global's look-up in Python 3.11, and it took
# five of those per pipelined command.
_CLOSED, _READING_LOGIN, _NO_SASL = State.CLOSED, State.AUTHORIZATION, _Sasl.NONE
_IN_TRANSACTION = State.TRANSACTION


class Connection:
    """One client's POP3 protocol state; see the module docstring."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.state = State.AUTHORIZATION
        self.utf8 = False
        self._buffer = bytearray()
        self._username: str | None = None
        self._sasl = _Sasl.NONE
        self._login_username = ""
        self._bad_commands = 0
        self._commands_before_login = 0

    # Input -----------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    @property
    def cleartext_allowed(self) -> bool:
        return self.policy.tls_active or self.policy.cleartext_trusted

    def next_event(self) -> Event:
        if self.state is _CLOSED:
            raise LocalProtocolError("next_event() after the connection closed")
        limit = self._line_limit()
        newline = self._buffer.find(b"\n", 0, limit)
        if newline < 0:
            if len(self._buffer) >= limit:
                return self._close(err(TEXT_LINE_TOO_LONG), "line too long")
            return NEED_DATA
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        if line.endswith(b"\r"):
            line = line[:-1]  # CRLF, or a bare LF (accepted, as most servers do)
        if self.state is _READING_LOGIN:
            self._commands_before_login += 1
            if self._commands_before_login > MAX_COMMANDS_BEFORE_LOGIN:
                return self._close(err(TEXT_TOO_MANY_COMMANDS), "too many commands before login")
        if self._sasl is not _NO_SASL:
            return self._sasl_response(line)
        return self._command(line)

    def _line_limit(self) -> int:
        if self._sasl is not _NO_SASL:
            return MAX_SASL_LINE
        if self.state is _READING_LOGIN:
            return MAX_LINE_BEFORE_LOGIN
        return MAX_LINE_AFTER_LOGIN

    # State changes reported by the caller ----------------------------------------------------

    def login_succeeded(self) -> None:
        if self.state is not State.AUTHORIZATION:
            raise LocalProtocolError("login_succeeded() outside AUTHORIZATION")
        self.state = State.TRANSACTION
        self._bad_commands = 0

    def tls_started(self) -> None:
        """The handshake finished: forget everything learned in plaintext (RFC 2595 s. 4)."""
        self.policy = Policy(
            tls_active=True,
            stls_available=False,
            cleartext_trusted=self.policy.cleartext_trusted,
            login_delay_seconds=self.policy.login_delay_seconds,
            implementation=self.policy.implementation,
        )
        self._username = None
        self._sasl = _Sasl.NONE
        self.utf8 = False
        self._buffer.clear()

    def quit_in_transaction(self) -> None:
        """QUIT was received in TRANSACTION: the caller now runs the UPDATE state."""
        self.state = State.UPDATE

    def closed(self) -> None:
        self.state = State.CLOSED

    # Commands --------------------------------------------------------------------------------

    def _command(self, line: bytes) -> Event:
        # What a pipelining client sends by the thousand, ``LIST 12`` and the like, is parsed
        # from the bytes; any other line, or one of these with another argument or in another
        # state, takes the general path, which gives the same event for these.
        keyword, _, argument = line.partition(b" ")
        event_type = _NUMBERED.get(keyword.upper())
        if (
            event_type is not None
            and self.state is _IN_TRANSACTION
            and argument.isdigit()  # ASCII digits only, for bytes
            and len(argument) <= MAX_NUMBER_DIGITS
        ):
            number = int(argument)
            if number:
                self._bad_commands = 0
                return event_type(number)
        return self._parsed_command(line)

    def _parsed_command(self, line: bytes) -> Event:
        if b"\x00" in line:
            return self._bad(err(TEXT_NUL))
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._bad(err(TEXT_BAD_ENCODING))
        keyword, separator, argument = text.partition(" ")
        if not keyword.isascii():  # "ſtat".upper() == "STAT": keywords are ASCII (RFC 1939 s. 3)
            return self._bad(err(TEXT_UNKNOWN_COMMAND))
        keyword = keyword.upper()
        handler = _HANDLERS.get(keyword)
        if handler is None:
            return self._bad(err(TEXT_UNKNOWN_COMMAND))
        states, method = handler
        if self.state not in states:
            return self._bad(err(TEXT_WRONG_STATE))
        event = method(self, argument, bool(separator))
        if not (isinstance(event, Reply) and event.bad_command):
            self._bad_commands = 0
        return event

    def _bad(self, reply: bytes) -> Event:
        self._bad_commands += 1
        limit = (
            MAX_BAD_COMMANDS_BEFORE_LOGIN
            if self.state is State.AUTHORIZATION
            else MAX_BAD_COMMANDS_AFTER_LOGIN
        )
        if self._bad_commands >= limit:
            return self._close(err(TEXT_TOO_MANY_BAD), "too many bad commands")
        return Reply(reply, bad_command=True)

    def _close(self, data: bytes, reason: str) -> Close:
        self.state = State.CLOSED
        return Close(data, reason)

    def _no_arguments(self, argument: str, has_space: bool) -> bool:
        return not has_space and not argument

    def _capa(self, argument: str, has_space: bool) -> Event:
        if not self._no_arguments(argument, has_space):
            return self._bad(err(TEXT_SYNTAX))
        return Reply(multiline("Capability list follows.", self.capabilities()))

    def capabilities(self) -> list[str]:
        """RFC 2449 CAPA lines for the current state (C01-C12)."""
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "EXPIRE NEVER", "UTF8 USER"]
        if self.state is State.AUTHORIZATION and self.policy.stls_available and not self.policy.tls_active:
            caps.append("STLS")
        if self.cleartext_allowed:
            caps += ["USER", "SASL " + " ".join(SASL_MECHANISMS)]
        if self.policy.login_delay_seconds:
            caps.append(f"LOGIN-DELAY {self.policy.login_delay_seconds}")
        if self.state is not State.AUTHORIZATION:
            caps.append(f"IMPLEMENTATION {self.policy.implementation}")
        return caps

    def _user(self, argument: str, has_space: bool) -> Event:
        if not argument:
            return self._bad(err(TEXT_SYNTAX))
        if not self.cleartext_allowed:
            return Reply(err(TEXT_PLAINTEXT_DISALLOWED, ResponseCode.AUTH))
        self._username = argument
        return Reply(ok())

    def _pass(self, argument: str, has_space: bool) -> Event:
        if not self.cleartext_allowed:
            self._username = None
            return Reply(err(TEXT_PLAINTEXT_DISALLOWED, ResponseCode.AUTH))
        if self._username is None:
            return self._bad(err(TEXT_NO_USERNAME))
        username, self._username = self._username, None
        return Credentials(username, argument, "USER")

    def _apop(self, argument: str, has_space: bool) -> Event:
        return self._bad(err(TEXT_APOP_DISABLED))

    def _utf8(self, argument: str, has_space: bool) -> Event:
        if not self._no_arguments(argument, has_space):
            return self._bad(err(TEXT_SYNTAX))
        self.utf8 = True
        return Reply(ok(TEXT_UTF8))

    def _stls(self, argument: str, has_space: bool) -> Event:
        if not self._no_arguments(argument, has_space):
            return self._bad(err(TEXT_SYNTAX))
        if self.policy.tls_active:
            return self._bad(err(TEXT_TLS_ACTIVE))
        if not self.policy.stls_available:
            return self._bad(err(TEXT_TLS_UNAVAILABLE))
        if self._buffer:
            # CVE-2011-0411 class: bytes sent behind STLS must never run inside TLS.
            return self._close(err(TEXT_STLS_PIPELINED), "plaintext pipelined after STLS")
        return StartTls(ok(TEXT_BEGIN_TLS))

    def _quit(self, argument: str, has_space: bool) -> Event:
        # Arguments to QUIT are ignored, as Dovecot does.
        if self.state is State.AUTHORIZATION:
            return self._close(ok(TEXT_BYE), "quit")
        return Quit()

    # AUTH and SASL ---------------------------------------------------------------------------

    def _auth(self, argument: str, has_space: bool) -> Event:
        if not argument:
            if has_space:
                return self._bad(err(TEXT_SYNTAX))
            mechanisms = SASL_MECHANISMS if self.cleartext_allowed else ()
            return Reply(multiline("Supported mechanisms follow.", mechanisms))
        mechanism, space, initial = argument.partition(" ")
        mechanism = mechanism.upper() if mechanism.isascii() else ""
        if mechanism not in SASL_MECHANISMS:
            return Reply(err(TEXT_UNSUPPORTED_MECHANISM, ResponseCode.AUTH))
        if not self.cleartext_allowed:
            return Reply(err(TEXT_PLAINTEXT_DISALLOWED, ResponseCode.AUTH))
        if space and " " in initial:
            return AuthRejected(mechanism, "malformed initial response")
        if mechanism == "PLAIN":
            if space:
                return self._plain_response(initial)
            self._sasl = _Sasl.PLAIN
            return Reply(b"+ " + CRLF)
        if space:
            return self._login_username_response(initial)
        self._sasl = _Sasl.LOGIN_USERNAME
        return Reply(f"+ {LOGIN_USERNAME_CHALLENGE}".encode() + CRLF)

    def _sasl_response(self, line: bytes) -> Event:
        stage, self._sasl = self._sasl, _Sasl.NONE
        mechanism = "PLAIN" if stage is _Sasl.PLAIN else "LOGIN"
        if line == b"*":
            return Reply(err(TEXT_AUTH_ABORTED))
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            return AuthRejected(mechanism, "invalid base64")
        if stage is _Sasl.PLAIN:
            return self._plain_response(text)
        if stage is _Sasl.LOGIN_USERNAME:
            return self._login_username_response(text)
        return self._login_password_response(text)

    def _plain_response(self, encoded: str) -> Event:
        decoded = decode_sasl_base64(encoded)
        if decoded is None:
            return AuthRejected("PLAIN", "invalid base64")
        credentials = parse_plain(decoded)
        if credentials is None:
            return AuthRejected("PLAIN", "malformed PLAIN message")
        return Credentials(credentials[0], credentials[1], "PLAIN")

    def _login_username_response(self, encoded: str) -> Event:
        decoded = decode_sasl_base64(encoded)
        username = _utf8_or_none(decoded) if decoded is not None else None
        if not username or len(decoded) > MAX_SASL_FIELD:
            return AuthRejected("LOGIN", "invalid username response")
        self._login_username = username
        self._sasl = _Sasl.LOGIN_PASSWORD
        return Reply(f"+ {LOGIN_PASSWORD_CHALLENGE}".encode() + CRLF)

    def _login_password_response(self, encoded: str) -> Event:
        username, self._login_username = self._login_username, ""
        decoded = decode_sasl_base64(encoded)
        password = _utf8_or_none(decoded) if decoded is not None else None
        if password is None or len(decoded) > MAX_SASL_FIELD:
            return AuthRejected("LOGIN", "invalid password response")
        return Credentials(username, password, "LOGIN")

    # TRANSACTION commands --------------------------------------------------------------------

    def _stat(self, argument: str, has_space: bool) -> Event:
        return Stat() if self._no_arguments(argument, has_space) else self._bad(err(TEXT_SYNTAX))

    def _noop(self, argument: str, has_space: bool) -> Event:
        # Arguments to NOOP are ignored (Outlook sends none; some clients send junk).
        return Noop()

    def _rset(self, argument: str, has_space: bool) -> Event:
        return Rset() if self._no_arguments(argument, has_space) else self._bad(err(TEXT_SYNTAX))

    def _list(self, argument: str, has_space: bool) -> Event:
        return self._optional_number(argument, has_space, ListMessages)

    def _uidl(self, argument: str, has_space: bool) -> Event:
        return self._optional_number(argument, has_space, Uidl)

    def _retr(self, argument: str, has_space: bool) -> Event:
        return self._one_number(argument, Retr)

    def _dele(self, argument: str, has_space: bool) -> Event:
        return self._one_number(argument, Dele)

    def _top(self, argument: str, has_space: bool) -> Event:
        parts = argument.split(" ")
        if len(parts) != 2:
            return self._bad(err(TEXT_SYNTAX))
        number, lines = parse_number(parts[0]), parse_number(parts[1], allow_zero=True)
        if number is None or lines is None:
            return self._bad(err(TEXT_SYNTAX))
        return Top(number, lines)

    def _optional_number(self, argument: str, has_space: bool, event_type) -> Event:
        if self._no_arguments(argument, has_space):
            return event_type(None)
        return self._one_number(argument, event_type)

    def _one_number(self, argument: str, event_type) -> Event:
        number = parse_number(argument)
        if number is None:
            return self._bad(err(TEXT_SYNTAX))
        return event_type(number)


def parse_number(text: str, *, allow_zero: bool = False) -> int | None:
    """A decimal message number or line count: digits only, at most ten of them."""
    if not text or len(text) > MAX_NUMBER_DIGITS or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value > 0 or allow_zero else None


def decode_sasl_base64(text: str) -> bytes | None:
    """Strict base64 (RFC 5034 section 4): ``=`` alone is an empty response; junk is rejected."""
    if text == "=":
        return b""
    if not text or len(text) % 4:
        return None
    # strict_mode still accepts a whole "====" group after an unpadded one.
    data = text.rstrip("=")
    if len(text) - len(data) > 2 or "=" in data:
        return None
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def parse_plain(message: bytes) -> tuple[str, str] | None:
    """RFC 4616 ``[authzid] NUL authcid NUL passwd``; authzid must be empty or the authcid."""
    parts = message.split(b"\x00")
    if len(parts) != 3:
        return None
    authzid, authcid, password = parts
    if not authcid or not password or max(len(authcid), len(password), len(authzid)) > MAX_SASL_FIELD:
        return None
    if authzid and authzid != authcid:
        return None
    username, secret = _utf8_or_none(authcid), _utf8_or_none(password)
    if username is None or secret is None:
        return None
    return username, secret


def encode_plain(username: str, password: str) -> str:
    """Client side of PLAIN, for tests and tools."""
    return base64.b64encode(b"\x00" + username.encode() + b"\x00" + password.encode()).decode()


def _utf8_or_none(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# The commands of one message number that Connection._command parses from the line's bytes.
_NUMBERED = {b"LIST": ListMessages, b"UIDL": Uidl, b"RETR": Retr, b"DELE": Dele}

# Tuples, not sets: membership then compares identities, where a set would call Enum.__hash__,
# a Python function, once per command.
_AUTHORIZATION = (State.AUTHORIZATION,)
_TRANSACTION = (State.TRANSACTION,)
_BOTH = (State.AUTHORIZATION, State.TRANSACTION)

# Which commands are legal in which state (RFC 1939 sections 4-6, RFC 2449, 2595, 5034, 6856).
_HANDLERS = {
    "CAPA": (_BOTH, Connection._capa),
    "QUIT": (_BOTH, Connection._quit),
    "USER": (_AUTHORIZATION, Connection._user),
    "PASS": (_AUTHORIZATION, Connection._pass),
    "APOP": (_AUTHORIZATION, Connection._apop),
    "AUTH": (_AUTHORIZATION, Connection._auth),
    "STLS": (_AUTHORIZATION, Connection._stls),
    "UTF8": (_AUTHORIZATION, Connection._utf8),
    "STAT": (_TRANSACTION, Connection._stat),
    "LIST": (_TRANSACTION, Connection._list),
    "RETR": (_TRANSACTION, Connection._retr),
    "DELE": (_TRANSACTION, Connection._dele),
    "NOOP": (_TRANSACTION, Connection._noop),
    "RSET": (_TRANSACTION, Connection._rset),
    "TOP": (_TRANSACTION, Connection._top),
    "UIDL": (_TRANSACTION, Connection._uidl),
}
