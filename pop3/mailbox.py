"""The narrow interfaces a POP3 session needs, with their contracts, and in-memory versions.

A session never sees a user account: the :class:`Authenticator` turns credentials into a
locked :class:`Maildrop` (or a failure), and the maildrop is all the session touches. The
:class:`SessionObserver` hears about the session's life for logging and live views.
"""

import asyncio
import enum
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol


class MessageInfo(NamedTuple):
    """One message of a maildrop snapshot. ``key`` is opaque to the session.

    A named tuple rather than a dataclass: a 100,000-message snapshot is built at every login.
    """

    key: object
    size: int
    uidl: str
    header_size: int


class MaildropError(Exception):
    """The store failed; the session answers ``-ERR [SYS/TEMP]`` where it still can (see Maildrop)."""


class MessageGone(MaildropError):
    """The message was removed behind the session's back (only possible without a lock)."""


class Maildrop(Protocol):
    """A mailbox locked for one session.

    Contract:

    * ``messages`` is the snapshot taken at login, in delivery order. It never changes during
      the session: message *n* is ``messages[n - 1]`` until the session ends, whatever is
      delivered meanwhile (RFC 1939 section 4).
    * ``read(info)`` yields the message's exact stored bytes (CRLF line ends, a final CRLF),
      one bounded chunk at a time; their total length is ``info.size``. It may raise
      MaildropError (MessageGone when the message has been removed), before the first chunk or
      after any. Before the first, the session answers ``-ERR [SYS/TEMP]`` and carries on.
      After it, the ``+OK`` and part of the message are sent and the reply cannot be finished:
      the session logs one warning and closes the connection (the client sees no terminating
      line, so it keeps nothing), applying no deletions. Any other exception is a bug: the
      session ends with ``EndReason.ERROR`` and logs it with its traceback.
    * ``commit(deleted)`` runs the UPDATE state: it removes exactly ``deleted`` in one
      transaction, provided this session still holds the lock, and raises MaildropError
      otherwise, removing nothing.
    * ``release()`` gives the lock up without removing anything. It is called once at the end
      of every session (after a commit too) and must not raise.
    """

    messages: Sequence[MessageInfo]

    def read(self, info: MessageInfo) -> AsyncIterator[bytes]: ...

    async def commit(self, deleted: Sequence[MessageInfo]) -> None: ...

    async def release(self) -> None: ...


class SharedSnapshot(tuple):
    """A login snapshot that several sessions may be given (a server keeping it between them).

    It keeps the whole LIST and UIDL replies once a session has made them with no message marked
    deleted: a session's listing depends on nothing else, and 100,000 lines take ~20 ms to make.
    """

    def listing(self, field: str, make: Callable[[], bytes]) -> bytes:
        listings = self.__dict__.setdefault("listings", {})
        if field not in listings:
            listings[field] = make()
        return listings[field]


class LoginFailure(enum.Enum):
    """Why a login failed; each maps to one RFC 2449/3206 response code and fixed text."""

    BAD_CREDENTIALS = "bad credentials"  # unknown user, wrong password, inactive: one answer
    IN_USE = "mailbox in use"
    LOGIN_DELAY = "login delay"
    TEMPORARY = "temporary failure"


@dataclass(frozen=True)
class LoginRequest:
    username: str
    password: str = field(repr=False)
    mechanism: str
    peer_host: str
    secure: bool
    session_id: str = ""


@dataclass(frozen=True)
class LoginResult:
    maildrop: Maildrop | None = None
    username: str = ""  # the canonical login name, when known
    failure: LoginFailure | None = None


class Authenticator(Protocol):
    """Checks credentials and, on success, returns the user's locked maildrop.

    Failures of every kind come back as a LoginResult with ``failure`` set, never as an
    exception; delays (failure delay, per-source penalty) are the authenticator's to apply.
    ``reject`` is called instead for a malformed attempt (bad base64, a broken PLAIN
    message), which must cost the client the same delay as a wrong password.
    """

    async def authenticate(self, request: LoginRequest) -> LoginResult: ...

    async def reject(self, session_id: str, peer_host: str, mechanism: str, reason: str) -> None: ...


@dataclass
class SessionStats:
    commands: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    retr_count: int = 0
    retr_bytes: int = 0
    top_count: int = 0
    top_bytes: int = 0
    deleted_count: int = 0  # removed by the UPDATE state
    deleted_bytes: int = 0
    marked_count: int = 0  # marked by DELE and not unmarked by RSET, so far
    marked_bytes: int = 0
    message_count: int = 0
    message_bytes: int = 0


class EndReason(enum.Enum):
    QUIT = "quit"
    DROPPED = "dropped"
    TIMEOUT = "timeout"
    KICKED = "kicked"
    SHUTDOWN = "shutdown"
    ERROR = "error"


@dataclass(frozen=True)
class ConnectionInfo:
    peer: tuple[str, int]
    local: tuple[str, int]
    implicit_tls: bool
    session_id: str = ""  # unique per connection, for logs and session records


class SessionObserver(Protocol):
    """Hears a session's life. Calls must return quickly and never raise into the session."""

    def opened(self, info: ConnectionInfo) -> None: ...

    def tls_established(self, version: str, cipher: str) -> None: ...

    def login_failed(self, username: str, failure: LoginFailure, mechanism: str) -> None: ...

    def logged_in(self, username: str, mechanism: str, maildrop: Maildrop) -> None: ...

    def progress(self, stats: SessionStats) -> None: ...

    def closed(self, reason: EndReason, stats: SessionStats) -> None: ...


class NullObserver:
    def opened(self, info: ConnectionInfo) -> None:
        pass

    def tls_established(self, version: str, cipher: str) -> None:
        pass

    def login_failed(self, username: str, failure: LoginFailure, mechanism: str) -> None:
        pass

    def logged_in(self, username: str, mechanism: str, maildrop: Maildrop) -> None:
        pass

    def progress(self, stats: SessionStats) -> None:
        pass

    def closed(self, reason: EndReason, stats: SessionStats) -> None:
        pass


# --- In-memory implementations, for tests and as a reference ---------------------------------


class MemoryMaildrop:
    """A Maildrop over a shared list of messages, with the lock held by ``owner``."""

    def __init__(self, store: "MemoryStore", owner: str, chunk_size: int = 4096) -> None:
        self._store = store
        self._owner = owner
        self._chunk_size = chunk_size
        self.messages = [
            MessageInfo(key=uidl, size=len(data), uidl=uidl, header_size=_header_size(data))
            for uidl, data in store.messages
        ]

    async def read(self, info: MessageInfo) -> AsyncIterator[bytes]:
        data = dict(self._store.messages).get(info.key)
        if data is None:
            raise MessageGone(f"message {info.uidl} is gone")
        for start in range(0, len(data), self._chunk_size):
            await asyncio.sleep(0)
            yield data[start : start + self._chunk_size]

    async def commit(self, deleted: Sequence[MessageInfo]) -> None:
        if self._store.lock_owner != self._owner:
            raise MaildropError("lock lost")
        gone = {info.key for info in deleted}
        self._store.messages = [(uidl, data) for uidl, data in self._store.messages if uidl not in gone]

    async def release(self) -> None:
        if self._store.lock_owner == self._owner:
            self._store.lock_owner = None


class MemoryStore:
    """One user's messages as (uidl, bytes) pairs, and who holds the lock."""

    def __init__(self, messages: Sequence[tuple[str, bytes]] = ()) -> None:
        self.messages = list(messages)
        self.lock_owner: str | None = None

    def acquire(self, owner: str) -> MemoryMaildrop | None:
        if self.lock_owner is not None:
            return None
        self.lock_owner = owner
        return MemoryMaildrop(self, owner)


class MemoryAuthenticator:
    """Plain-text passwords in a dict; for tests only."""

    def __init__(self, users: dict[str, tuple[str, MemoryStore]]) -> None:
        self._users = users
        self._sessions = 0
        self.rejections: list[str] = []

    async def authenticate(self, request: LoginRequest) -> LoginResult:
        entry = self._users.get(request.username)
        if entry is None or entry[0] != request.password:
            return LoginResult(failure=LoginFailure.BAD_CREDENTIALS)
        self._sessions += 1
        maildrop = entry[1].acquire(f"session-{self._sessions}")
        if maildrop is None:
            return LoginResult(username=request.username, failure=LoginFailure.IN_USE)
        return LoginResult(maildrop=maildrop, username=request.username)

    async def reject(self, session_id: str, peer_host: str, mechanism: str, reason: str) -> None:
        self.rejections.append(reason)


def _header_size(data: bytes) -> int:
    if data.startswith(b"\r\n"):
        return 2
    end = data.find(b"\r\n\r\n")
    return len(data) if end < 0 else end + 4
