"""Whole sessions over an in-memory SessionIO: exact server bytes, maildrop effects, observer calls.

Row ids (G01, X08, U03, ...) refer to /work/shared/POP3-CHECKLIST.md section 1.
"""

import asyncio
import base64
import dataclasses
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

import pytest

from pop3.mailbox import (
    Authenticator,
    ConnectionInfo,
    EndReason,
    LoginFailure,
    LoginRequest,
    LoginResult,
    Maildrop,
    MaildropError,
    MemoryAuthenticator,
    MemoryMaildrop,
    MemoryStore,
    MessageInfo,
    SessionObserver,
    SessionStats,
    SharedSnapshot,
)
from pop3.protocol import (
    MAX_COMMANDS_BEFORE_LOGIN,
    TEXT_AUTH_FAILED,
    TEXT_BEGIN_TLS,
    TEXT_BYE,
    TEXT_LINE_TOO_LONG,
    TEXT_NO_USERNAME,
    TEXT_PLAINTEXT_DISALLOWED,
    TEXT_STLS_PIPELINED,
    TEXT_TOO_MANY_COMMANDS,
    TEXT_WRONG_STATE,
    Credentials,
    Policy,
    ResponseCode,
    Retr,
    err,
    ok,
)
from pop3.session import (
    COMMANDS_PER_TURN,
    TEXT_COMMIT_FAILED,
    TEXT_DELETED,
    TEXT_KICKED,
    TEXT_LOGGED_IN,
    TEXT_LOGOUT,
    TEXT_LOGOUT_DELETED,
    TEXT_MARKED,
    TEXT_NO_SUCH_MESSAGE,
    TEXT_SHUTTING_DOWN,
    TEXT_STORE_FAILED,
    ConnectionLost,
    Session,
    Timeouts,
    log_text,
)

M1 = b"Subject: one\r\n\r\nhello\r\n"  # 23 octets
M2 = b"Subject: two\r\n\r\n.dot line\r\n.\r\n..two dots\r\nend\r\n"  # 47 octets, three lines to stuff
M3 = b"Subject: three\r\nX: y\r\n\r\nl1\r\nl2\r\nl3\r\n"  # 36 octets, header 24
MESSAGES = [("uid-1", M1), ("uid-2", M2), ("uid-3", M3)]  # 106 octets

M2_ON_THE_WIRE = b"Subject: two\r\n\r\n..dot line\r\n..\r\n...two dots\r\nend\r\n.\r\n"

TRUSTED = Policy(cleartext_trusted=True)
STLS_PORT = Policy(stls_available=True)
TLS_VERSION, TLS_CIPHER = "TLSv1.3", "TLS_AES_256_GCM_SHA384"
PEER = ("192.0.2.7", 40000)
SESSION_ID = "0123abcd"

LOGIN = b"USER alice\r\nPASS secret\r\n"
LOGGED_IN = ok() + ok(TEXT_LOGGED_IN)
AUTH_FAILED = err(TEXT_AUTH_FAILED, ResponseCode.AUTH)
GREETING = "POP3 server ready."
GREETING_LINE = ok(GREETING)
DEFAULT_TIMEOUTS = Timeouts(login=180.0, idle=600.0)


# --- Test doubles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pause:
    """A script step: the client is silent for ``seconds``."""

    seconds: float


HANG = object()  # a script step: the client stays connected and silent forever

ScriptStep = bytes | Pause | Callable[[], None] | object


class ScriptedIO:
    """A SessionIO fed from a script of client chunks; the end of the script is a dropped connection.

    Callables in the script run when the session asks for the next chunk, which lets a test change
    the store at an exact point of the dialogue.
    """

    def __init__(self, *script: ScriptStep, implicit_tls: bool = False) -> None:
        self.info = ConnectionInfo(
            peer=PEER, local=("192.0.2.1", 110), implicit_tls=implicit_tls, session_id=SESSION_ID
        )
        self._script = deque(script)
        self._tls_active = implicit_tls
        self.sent = bytearray()  # what the client sent, as consumed by the session
        self.written = bytearray()
        self.writes: list[bytes] = []  # each write() on its own: held replies leave together
        self.tls_calls = 0
        self.closed = False
        self.drain_stalled = False
        self.hanging = asyncio.Event()

    async def receive(self) -> bytes:
        while self._script:
            step = self._script.popleft()
            if isinstance(step, bytes):
                self.sent += step
                return step
            if isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
            elif step is HANG:
                await self._hang()
            else:
                step()
        raise ConnectionLost("end of script")

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionLost("write after close")
        self.written += data
        self.writes.append(data)

    @property
    def writable(self) -> bool:
        return not self.drain_stalled

    async def drain(self) -> None:
        if self.drain_stalled:
            await self._hang()

    async def start_tls(self) -> tuple[str, str]:
        self.tls_calls += 1
        self._tls_active = True
        return TLS_VERSION, TLS_CIPHER

    def tls_details(self) -> tuple[str, str]:
        return (TLS_VERSION, TLS_CIPHER) if self._tls_active else ("", "")

    def close(self) -> None:
        self.closed = True

    async def _hang(self) -> None:
        self.hanging.set()
        await asyncio.get_running_loop().create_future()


class RecordingObserver:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.progress_calls = 0
        self.progress_stats: list[SessionStats] = []
        self.maildrops: list[Maildrop] = []
        self.final_stats: SessionStats | None = None

    def opened(self, info: ConnectionInfo) -> None:
        self.calls.append(("opened", info))

    def tls_established(self, version: str, cipher: str) -> None:
        self.calls.append(("tls", version, cipher))

    def login_failed(self, username: str, failure: LoginFailure, mechanism: str) -> None:
        self.calls.append(("login_failed", username, failure, mechanism))

    def logged_in(self, username: str, mechanism: str, maildrop: Maildrop) -> None:
        self.calls.append(("logged_in", username, mechanism))
        self.maildrops.append(maildrop)

    def progress(self, stats: SessionStats) -> None:
        self.progress_calls += 1
        self.progress_stats.append(dataclasses.replace(stats))

    def closed(self, reason: EndReason, stats: SessionStats) -> None:
        self.calls.append(("closed", reason))
        self.final_stats = dataclasses.replace(stats)


class RecordingAuthenticator(MemoryAuthenticator):
    def __init__(self, users: dict[str, tuple[str, MemoryStore]]) -> None:
        super().__init__(users)
        self.requests: list[LoginRequest] = []

    async def authenticate(self, request: LoginRequest) -> LoginResult:
        self.requests.append(request)
        return await super().authenticate(request)


class FixedResultAuthenticator:
    """Answers every login with the same result."""

    def __init__(self, result: LoginResult) -> None:
        self.result = result

    async def authenticate(self, request: LoginRequest) -> LoginResult:
        return self.result

    async def reject(self, session_id: str, peer_host: str, mechanism: str, reason: str) -> None:
        pass


class CustomStore(MemoryStore):
    """A MemoryStore whose maildrops are of a given class (with the given options)."""

    def __init__(
        self, messages: Sequence[tuple[str, bytes]], maildrop_class: type = MemoryMaildrop, **options
    ) -> None:
        super().__init__(messages)
        self.maildrop_class = maildrop_class
        self.options = options
        self.maildrops: list[MemoryMaildrop] = []

    def acquire(self, owner: str) -> MemoryMaildrop | None:
        if self.lock_owner is not None:
            return None
        self.lock_owner = owner
        maildrop = self.maildrop_class(self, owner, **self.options)
        self.maildrops.append(maildrop)
        return maildrop


class FailingCommitMaildrop(MemoryMaildrop):
    async def commit(self, deleted: Sequence[MessageInfo]) -> None:
        raise MaildropError("the database went away")


class GatedCommitMaildrop(MemoryMaildrop):
    """commit() waits until the test opens the gate."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.committing = asyncio.Event()
        self.gate = asyncio.Event()

    async def commit(self, deleted: Sequence[MessageInfo]) -> None:
        self.committing.set()
        await self.gate.wait()
        await super().commit(deleted)


class EmptyChunkMaildrop(MemoryMaildrop):
    """Yields an empty chunk in the middle of each message (allowed by the Maildrop contract)."""

    async def read(self, info: MessageInfo) -> AsyncIterator[bytes]:
        data = dict(self._store.messages)[info.key]
        for chunk in (data[:5], b"", data[5:]):
            await asyncio.sleep(0)
            yield chunk


# --- Helpers --------------------------------------------------------------------------------


def alice_store(**options) -> CustomStore:
    return CustomStore(MESSAGES, **options)


def authenticator(store: MemoryStore) -> RecordingAuthenticator:
    return RecordingAuthenticator({"alice": ("secret", store)})


def make_session(
    io: ScriptedIO,
    store: MemoryStore,
    *,
    policy: Policy = TRUSTED,
    observer: SessionObserver | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    auth: Authenticator | None = None,
) -> Session:
    auth = auth or authenticator(store)
    return Session(io, auth, policy=policy, observer=observer, timeouts=timeouts, greeting=GREETING)


def run(session: Session) -> EndReason:
    return asyncio.run(session.run())


def ending(*script: ScriptStep, store: MemoryStore | None = None, **options) -> tuple[EndReason, bytes]:
    """Run a session over ``script`` against alice's store; (end reason, everything the server sent)."""
    io = ScriptedIO(*script)
    reason = run(make_session(io, store if store is not None else alice_store(), **options))
    return reason, bytes(io.written)


def transcript(*script: ScriptStep, store: MemoryStore | None = None, **options) -> bytes:
    """Everything the server sent in a session over ``script``."""
    return ending(*script, store=store, **options)[1]


async def until_set(event: asyncio.Event, task: asyncio.Task) -> None:
    """Wait for ``event``; fail instead of hanging if the session ends first."""
    waiter = asyncio.create_task(event.wait())
    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if not event.is_set():
        waiter.cancel()
        pytest.fail(f"the session ended early: {task.result()!r}")


def kick_when_hanging(session: Session, io: ScriptedIO, reason: EndReason = EndReason.KICKED) -> EndReason:
    async def scenario() -> EndReason:
        task = asyncio.create_task(session.run())
        await until_set(io.hanging, task)
        assert session.kick(reason) is True
        return await task

    return asyncio.run(scenario())


def assert_untouched(store: MemoryStore) -> None:
    """Nothing deleted and the lock given back."""
    assert store.messages == MESSAGES
    assert store.lock_owner is None


# --- Greeting (G01) -------------------------------------------------------------------------


def test_greeting_is_exactly_one_ok_line_without_apop_timestamp():
    io = ScriptedIO()
    assert run(make_session(io, alice_store())) is EndReason.DROPPED
    assert bytes(io.written) == b"+OK POP3 server ready.\r\n"
    assert b"<" not in io.written and b"@" not in io.written
    assert io.closed


# --- AUTHORIZATION (A03, A04, A08, A10, A22, G16) -------------------------------------------


def test_quit_before_login_says_goodbye():
    store = alice_store()
    reason, written = ending(b"QUIT\r\n", store=store)
    assert (reason, written) == (EndReason.QUIT, GREETING_LINE + ok(TEXT_BYE))
    assert_untouched(store)


def test_wrong_password_and_unknown_user_get_the_same_reply_and_a_retry_works():
    store = alice_store()
    auth = authenticator(store)
    io = ScriptedIO(
        b"USER alice\r\nPASS wrong\r\n",
        b"STAT\r\n",
        b"USER bob\r\nPASS secret\r\n",
        LOGIN,
        b"STAT\r\n",
        b"QUIT\r\n",
    )
    assert run(make_session(io, store, auth=auth)) is EndReason.QUIT
    assert bytes(io.written) == (
        GREETING_LINE
        + b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n"
        + err(TEXT_WRONG_STATE)
        + b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n"
        + b"+OK\r\n+OK Logged in.\r\n"
        + b"+OK 3 106\r\n"
        + ok(TEXT_LOGOUT)
    )
    assert [(r.username, r.password, r.mechanism) for r in auth.requests] == [
        ("alice", "wrong", "USER"),
        ("bob", "secret", "USER"),
        ("alice", "secret", "USER"),
    ]


def test_login_request_carries_peer_and_security():
    store = alice_store()
    auth = authenticator(store)
    run(make_session(ScriptedIO(LOGIN), store, auth=auth))
    assert auth.requests == [
        LoginRequest("alice", "secret", "USER", peer_host="192.0.2.7", secure=False, session_id=SESSION_ID)
    ]


def test_auth_plain_with_initial_response_logs_in():
    store = alice_store()
    auth = authenticator(store)
    io = ScriptedIO(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", b"STAT\r\n")
    run(make_session(io, store, auth=auth))
    assert bytes(io.written) == GREETING_LINE + ok(TEXT_LOGGED_IN) + b"+OK 3 106\r\n"
    assert [r.mechanism for r in auth.requests] == ["PLAIN"]


def test_auth_login_exchange_logs_in():
    store = alice_store()
    auth = authenticator(store)
    io = ScriptedIO(b"AUTH LOGIN\r\n", base64.b64encode(b"alice") + b"\r\n", b"c2VjcmV0\r\n", b"QUIT\r\n")
    assert run(make_session(io, store, auth=auth)) is EndReason.QUIT
    assert bytes(io.written) == (
        GREETING_LINE + b"+ VXNlcm5hbWU6\r\n" + b"+ UGFzc3dvcmQ6\r\n" + ok(TEXT_LOGGED_IN) + ok(TEXT_LOGOUT)
    )
    assert [(r.username, r.password, r.mechanism) for r in auth.requests] == [("alice", "secret", "LOGIN")]


def test_malformed_sasl_is_rejected_through_the_authenticator_with_the_auth_reply():
    store = alice_store()
    auth = authenticator(store)
    observer = RecordingObserver()
    io = ScriptedIO(b"AUTH PLAIN =AAA\r\n", b"AUTH PLAIN\r\n", b"!!!!\r\n", b"AUTH PLAIN =\r\n", LOGIN)
    run(make_session(io, store, auth=auth, observer=observer))
    assert (
        bytes(io.written) == GREETING_LINE + AUTH_FAILED + b"+ \r\n" + AUTH_FAILED + AUTH_FAILED + LOGGED_IN
    )
    assert auth.rejections == ["invalid base64", "invalid base64", "malformed PLAIN message"]
    assert [r.username for r in auth.requests] == ["alice"]  # malformed attempts never reach authenticate()
    assert observer.calls[1:-1] == [
        ("login_failed", "", LoginFailure.BAD_CREDENTIALS, "PLAIN"),
        ("login_failed", "", LoginFailure.BAD_CREDENTIALS, "PLAIN"),
        ("login_failed", "", LoginFailure.BAD_CREDENTIALS, "PLAIN"),
        ("logged_in", "alice", "USER"),
    ]


@pytest.mark.parametrize(
    ("result", "reply"),
    [
        (LoginResult(failure=LoginFailure.BAD_CREDENTIALS), b"-ERR [AUTH] Authentication failed.\r\n"),
        (
            LoginResult(failure=LoginFailure.IN_USE),
            b"-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n",
        ),
        (
            LoginResult(failure=LoginFailure.LOGIN_DELAY),
            b"-ERR [LOGIN-DELAY] Logged in too recently; try again later.\r\n",
        ),
        (
            LoginResult(failure=LoginFailure.TEMPORARY),
            b"-ERR [SYS/TEMP] Temporary authentication failure.\r\n",
        ),
        (LoginResult(), b"-ERR [SYS/TEMP] Temporary authentication failure.\r\n"),  # no maildrop, no reason
    ],
)
def test_login_failure_reply_codes(result: LoginResult, reply: bytes):
    # A22, A23, C07: [AUTH] only for credentials, [IN-USE] for locks and caps, [SYS/TEMP] for the back end.
    io = ScriptedIO(LOGIN, b"STAT\r\n")
    run(make_session(io, alice_store(), auth=FixedResultAuthenticator(result)))
    assert bytes(io.written) == GREETING_LINE + ok() + reply + err(TEXT_WRONG_STATE)


def test_second_login_to_a_locked_maildrop_is_in_use():
    # A08, A22
    store = alice_store()
    auth = authenticator(store)

    async def scenario() -> tuple[EndReason, EndReason, bytes]:
        first_io = ScriptedIO(LOGIN, HANG)
        first = make_session(first_io, store, auth=auth)
        first_task = asyncio.create_task(first.run())
        await until_set(first_io.hanging, first_task)
        second_io = ScriptedIO(LOGIN, b"QUIT\r\n")
        second_reason = await make_session(second_io, store, auth=auth).run()
        first.kick()
        return await first_task, second_reason, bytes(second_io.written)

    first_reason, second_reason, written = asyncio.run(scenario())
    assert (
        written
        == GREETING_LINE
        + b"+OK\r\n-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n"
        + ok(TEXT_BYE)
    )
    assert (first_reason, second_reason) == (EndReason.KICKED, EndReason.QUIT)
    assert_untouched(store)
    written = transcript(LOGIN, b"QUIT\r\n", store=store, auth=auth)
    assert written == GREETING_LINE + LOGGED_IN + ok(TEXT_LOGOUT)


def test_pipelined_login_and_commands_in_one_chunk_are_all_answered_in_order():
    # G16: commands after PASS in the same packet run after login, not dropped.
    reason, written = ending(b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST 1\r\nUIDL 1\r\nRETR 1\r\nNOOP\r\n")
    assert written == (
        GREETING_LINE
        + b"+OK\r\n+OK Logged in.\r\n"
        + b"+OK 3 106\r\n"
        + b"+OK 1 23\r\n"
        + b"+OK 1 uid-1\r\n"
        + b"+OK 23 octets\r\nSubject: one\r\n\r\nhello\r\n.\r\n"
        + b"+OK\r\n"
    )
    assert reason is EndReason.DROPPED


def test_pipelined_replies_leave_a_turn_at_a_time_and_nothing_is_held_behind_a_login():
    assert COMMANDS_PER_TURN == 128
    pipelined = b"LIST 1\r\nUIDL 1\r\n" * 100
    io = ScriptedIO(b"USER alice\r\nPASS secret\r\n", pipelined)
    assert run(make_session(io, alice_store())) is EndReason.DROPPED
    assert io.writes == [
        GREETING_LINE,
        b"+OK\r\n",  # sent before the password check, which may take a while
        b"+OK Logged in.\r\n",
        # 200 replies, 128 commands to a write (USER and PASS were two of the first 128)
        b"+OK 1 23\r\n+OK 1 uid-1\r\n" * 63,
        b"+OK 1 23\r\n+OK 1 uid-1\r\n" * 37,
    ]


def test_a_thousand_pipelined_commands_are_answered_in_eight_writes():
    # The bench's pipelined round: LIST n / UIDL n alternating, in one chunk after the login.
    commands = b"".join(b"%s %d\r\n" % (b"UIDL" if i % 2 else b"LIST", i // 2 % 3 + 1) for i in range(1000))
    io = ScriptedIO(LOGIN, commands)
    assert run(make_session(io, alice_store())) is EndReason.DROPPED
    replies = io.writes[3:]  # after the greeting, USER's +OK and PASS's
    assert [write.count(b"\r\n") for write in replies] == [126, 128, 128, 128, 128, 128, 128, 106]
    assert b"".join(replies).startswith(b"+OK 1 23\r\n+OK 1 uid-1\r\n+OK 2 47\r\n+OK 2 uid-2\r\n")


def test_pipelined_commands_answered_from_the_snapshot_never_wait(monkeypatch):
    # LIST n, UIDL n, STAT, NOOP, DELE and RSET are answered in the command loop itself: none of
    # them goes through the awaited dispatch (a coroutine and a walk through its patterns each).
    waited: list[type] = []
    dispatch = Session._dispatch

    async def counting_dispatch(session, event):
        waited.append(type(event))
        await dispatch(session, event)

    monkeypatch.setattr(Session, "_dispatch", counting_dispatch)
    commands = b"LIST 2\r\nUIDL 2\r\nSTAT\r\nNOOP\r\nDELE 1\r\nLIST 1\r\nRSET\r\nLIST 4\r\nRETR 1\r\n"
    written = transcript(LOGIN, commands)
    assert waited == [Credentials, Retr]
    assert written == (
        GREETING_LINE
        + LOGGED_IN
        + b"+OK 2 47\r\n"
        + b"+OK 2 uid-2\r\n"
        + b"+OK 3 106\r\n"
        + b"+OK\r\n"
        + ok(TEXT_MARKED)
        + err(TEXT_DELETED)
        + ok("maildrop has 3 messages (106 octets)")
        + err(TEXT_NO_SUCH_MESSAGE)
        + b"+OK 23 octets\r\nSubject: one\r\n\r\nhello\r\n.\r\n"
    )


def test_a_pipelined_burst_lets_other_tasks_run_every_few_commands():
    io = ScriptedIO(LOGIN, b"NOOP\r\n" * 1000, b"QUIT\r\n")
    session = make_session(io, alice_store())
    answered_per_turn: list[int] = []

    async def scenario() -> EndReason:
        task = asyncio.create_task(session.run())
        seen = 0
        while not task.done():
            await asyncio.sleep(0)
            answered_per_turn.append(session.stats.commands - seen)
            seen = session.stats.commands
        return task.result()

    assert asyncio.run(scenario()) is EndReason.QUIT
    assert session.stats.commands == 1003
    assert max(answered_per_turn) == COMMANDS_PER_TURN
    assert sum(answered_per_turn) == 1003


def test_a_pipelined_flood_before_login_is_answered_up_to_the_limit_then_closed():
    reason, written = ending(b"CAPA\r\n" * 1000)
    capa = transcript(b"CAPA\r\n")[len(GREETING_LINE) :]
    assert reason is EndReason.ERROR
    assert written == GREETING_LINE + capa * MAX_COMMANDS_BEFORE_LOGIN + err(TEXT_TOO_MANY_COMMANDS)


# --- STLS (T01, T03, T04, T05) --------------------------------------------------------------


def test_stls_upgrades_then_cleartext_login_is_allowed():
    store = alice_store()
    auth = authenticator(store)
    observer = RecordingObserver()
    io = ScriptedIO(b"USER alice\r\n", b"STLS\r\n", b"CAPA\r\n", LOGIN, b"QUIT\r\n")
    assert run(make_session(io, store, policy=STLS_PORT, auth=auth, observer=observer)) is EndReason.QUIT
    assert bytes(io.written) == (
        GREETING_LINE
        + err(TEXT_PLAINTEXT_DISALLOWED, ResponseCode.AUTH)
        + b"+OK Begin TLS negotiation now.\r\n"
        + b"+OK Capability list follows.\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
        b"EXPIRE NEVER\r\nUTF8 USER\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n" + LOGGED_IN + ok(TEXT_LOGOUT)
    )
    assert io.tls_calls == 1
    assert [r.secure for r in auth.requests] == [True]
    assert observer.calls == [
        ("opened", io.info),
        ("tls", TLS_VERSION, TLS_CIPHER),
        ("logged_in", "alice", "USER"),
        ("closed", EndReason.QUIT),
    ]


def test_user_sent_before_stls_is_forgotten_after_it():
    io = ScriptedIO(b"USER alice\r\n", b"STLS\r\n", b"PASS secret\r\n")
    run(make_session(io, alice_store(), policy=Policy(cleartext_trusted=True, stls_available=True)))
    assert bytes(io.written) == GREETING_LINE + ok() + ok(TEXT_BEGIN_TLS) + err(TEXT_NO_USERNAME)
    assert io.tls_calls == 1


def test_command_pipelined_behind_stls_is_never_answered_and_tls_never_starts():
    # T03: CVE-2011-0411 class.
    observer = RecordingObserver()
    io = ScriptedIO(b"STLS\r\nCAPA\r\n", b"CAPA\r\n")
    assert run(make_session(io, alice_store(), policy=STLS_PORT, observer=observer)) is EndReason.ERROR
    assert bytes(io.written) == GREETING_LINE + b"-ERR Nothing may follow STLS before the TLS handshake.\r\n"
    assert bytes(io.written) == GREETING_LINE + err(TEXT_STLS_PIPELINED)
    assert io.tls_calls == 0
    assert io.closed
    assert observer.calls[-1] == ("closed", EndReason.ERROR)


def test_implicit_tls_session_reports_tls_at_open():
    observer = RecordingObserver()
    io = ScriptedIO(LOGIN, b"QUIT\r\n", implicit_tls=True)
    run(make_session(io, alice_store(), policy=Policy(tls_active=True), observer=observer))
    assert bytes(io.written) == GREETING_LINE + LOGGED_IN + ok(TEXT_LOGOUT)
    assert observer.calls[:2] == [("opened", io.info), ("tls", TLS_VERSION, TLS_CIPHER)]
    assert io.tls_calls == 0


# --- TRANSACTION (X01-X12, G11, G12) --------------------------------------------------------


def test_stat_list_and_uidl_transcript():
    store = alice_store()
    reason, written = ending(
        LOGIN,
        b"STAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nUIDL 3\r\nLIST 4\r\nUIDL 9999999999\r\nQUIT\r\n",
        store=store,
    )
    assert written == (
        GREETING_LINE
        + LOGGED_IN
        + b"+OK 3 106\r\n"
        + b"+OK 3 messages (106 octets)\r\n1 23\r\n2 47\r\n3 36\r\n.\r\n"
        + b"+OK 2 47\r\n"
        + b"+OK 3 messages (106 octets)\r\n1 uid-1\r\n2 uid-2\r\n3 uid-3\r\n.\r\n"
        + b"+OK 3 uid-3\r\n"
        + b"-ERR No such message.\r\n"
        + err(TEXT_NO_SUCH_MESSAGE)
        + b"+OK Logging out.\r\n"
    )
    assert reason is EndReason.QUIT
    assert_untouched(store)


def test_empty_maildrop_lists_are_ok_then_terminator():
    store = CustomStore([])
    written = transcript(LOGIN, b"STAT\r\nLIST\r\nUIDL\r\nRETR 1\r\n", store=store)
    assert written == (
        GREETING_LINE
        + LOGGED_IN
        + b"+OK 0 0\r\n"
        + b"+OK 0 messages (0 octets)\r\n.\r\n"
        + b"+OK 0 messages (0 octets)\r\n.\r\n"
        + err(TEXT_NO_SUCH_MESSAGE)
    )


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 16, 4096])
def test_retr_dot_stuffs_and_unstuffed_size_equals_list_size(chunk_size: int):
    # G11, G12, X05: whatever the maildrop's chunking.
    written = transcript(LOGIN, b"RETR 2\r\n", store=alice_store(chunk_size=chunk_size))
    assert written == GREETING_LINE + LOGGED_IN + b"+OK 47 octets\r\n" + M2_ON_THE_WIRE
    body = M2_ON_THE_WIRE[: -len(b".\r\n")]
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in body.split(b"\r\n"))
    assert len(unstuffed) == 47


def test_a_long_message_leaves_a_chunk_a_write_with_the_terminating_line_in_the_last():
    message = b"Subject: long\r\n\r\n" + b"x" * 40_000 + b"\r\n"
    io = ScriptedIO(LOGIN, b"RETR 1\r\n")
    run(make_session(io, CustomStore([("uid-long", message)], chunk_size=16_384)))
    assert io.writes[-3:] == [
        b"+OK 40019 octets\r\n" + message[:16_384],
        message[16_384:32_768],
        message[32_768:] + b".\r\n",  # not a send of its own: the client reads one reply a packet sooner
    ]


def test_retr_of_an_empty_message():
    written = transcript(LOGIN, b"LIST 1\r\nRETR 1\r\n", store=CustomStore([("empty", b"")]))
    assert written == GREETING_LINE + LOGGED_IN + b"+OK 1 0\r\n" + b"+OK 0 octets\r\n.\r\n"


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 24, 25, 4096])
@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"TOP 3 0", b"+OK\r\nSubject: three\r\nX: y\r\n\r\n.\r\n"),
        (b"TOP 3 1", b"+OK\r\nSubject: three\r\nX: y\r\n\r\nl1\r\n.\r\n"),
        (b"TOP 3 2", b"+OK\r\nSubject: three\r\nX: y\r\n\r\nl1\r\nl2\r\n.\r\n"),
        (b"TOP 3 3", b"+OK\r\n" + M3 + b".\r\n"),
        (b"TOP 3 99", b"+OK\r\n" + M3 + b".\r\n"),
        (b"TOP 2 1", b"+OK\r\nSubject: two\r\n\r\n..dot line\r\n.\r\n"),
        (b"TOP 2 2", b"+OK\r\nSubject: two\r\n\r\n..dot line\r\n..\r\n.\r\n"),
        (b"TOP 4 1", b"-ERR No such message.\r\n"),
    ],
)
def test_top_sends_headers_blank_line_and_k_body_lines(command: bytes, reply: bytes, chunk_size: int):
    # X06
    written = transcript(LOGIN, command + b"\r\n", store=alice_store(chunk_size=chunk_size))
    assert written == GREETING_LINE + LOGGED_IN + reply


def test_top_of_message_without_blank_line_sends_it_whole():
    # X07: no blank line is added.
    message = b"Subject: headers only\r\nX: y\r\n"
    written = transcript(LOGIN, b"TOP 1 0\r\nTOP 1 5\r\n", store=CustomStore([("h", message)]))
    assert written == GREETING_LINE + LOGGED_IN + (b"+OK\r\n" + message + b".\r\n") * 2


def test_deleted_message_cannot_be_read_listed_or_deleted_again():
    # X08
    written = transcript(
        LOGIN, b"DELE 1\r\nDELE 1\r\nRETR 1\r\nTOP 1 0\r\nLIST 1\r\nUIDL 1\r\nSTAT\r\nDELE 4\r\n"
    )
    assert written == (
        GREETING_LINE
        + LOGGED_IN
        + b"+OK Marked to be deleted.\r\n"
        + b"-ERR Message is deleted.\r\n"
        + err(TEXT_DELETED) * 4
        + b"+OK 2 83\r\n"
        + err(TEXT_NO_SUCH_MESSAGE)
    )


def test_listings_skip_deleted_messages_and_keep_numbers():
    # X09
    written = transcript(LOGIN, b"DELE 2\r\nLIST\r\nUIDL\r\nLIST 3\r\nRETR 3\r\n")
    assert written == (
        GREETING_LINE
        + LOGGED_IN
        + ok(TEXT_MARKED)
        + b"+OK 2 messages (59 octets)\r\n1 23\r\n3 36\r\n.\r\n"
        + b"+OK 2 messages (59 octets)\r\n1 uid-1\r\n3 uid-3\r\n.\r\n"
        + b"+OK 3 36\r\n"
        + b"+OK 36 octets\r\n"
        + M3
        + b".\r\n"
    )


class SharedSnapshotMaildrop(MemoryMaildrop):
    """Every session of the store gets one snapshot, as runpop3 gives a kept one."""

    shared: SharedSnapshot | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if SharedSnapshotMaildrop.shared is None:
            SharedSnapshotMaildrop.shared = SharedSnapshot(self.messages)
        self.messages = SharedSnapshotMaildrop.shared


def test_a_shared_snapshot_keeps_its_whole_listings_and_a_session_with_deletions_makes_its_own(
    monkeypatch,
):
    monkeypatch.setattr(SharedSnapshotMaildrop, "shared", None)
    store = alice_store(maildrop_class=SharedSnapshotMaildrop)
    whole_list = b"+OK 3 messages (106 octets)\r\n1 23\r\n2 47\r\n3 36\r\n.\r\n"
    whole_uidl = b"+OK 3 messages (106 octets)\r\n1 uid-1\r\n2 uid-2\r\n3 uid-3\r\n.\r\n"
    first = transcript(LOGIN, b"LIST\r\nUIDL\r\nQUIT\r\n", store=store)
    assert GREETING_LINE + LOGGED_IN + whole_list + whole_uidl in first
    assert SharedSnapshotMaildrop.shared.__dict__["listings"] == {"size": whole_list, "uidl": whole_uidl}
    second = transcript(LOGIN, b"DELE 2\r\nLIST\r\nUIDL\r\nRSET\r\nLIST\r\n", store=store)
    assert second.startswith(
        GREETING_LINE
        + LOGGED_IN
        + ok(TEXT_MARKED)
        + b"+OK 2 messages (59 octets)\r\n1 23\r\n3 36\r\n.\r\n"
        + b"+OK 2 messages (59 octets)\r\n1 uid-1\r\n3 uid-3\r\n.\r\n+OK "
    )
    assert second.endswith(whole_list)  # after RSET: the whole listing again
    assert SharedSnapshotMaildrop.shared.__dict__["listings"] == {"size": whole_list, "uidl": whole_uidl}


def test_rset_unmarks_everything_and_quit_then_deletes_nothing():
    # X10
    store = alice_store()
    written = transcript(
        LOGIN, b"DELE 1\r\nDELE 3\r\nSTAT\r\nRSET\r\nSTAT\r\nLIST 1\r\nQUIT\r\n", store=store
    )
    assert written == (
        GREETING_LINE
        + LOGGED_IN
        + ok(TEXT_MARKED) * 2
        + b"+OK 1 47\r\n"
        + b"+OK maildrop has 3 messages (106 octets)\r\n"
        + b"+OK 3 106\r\n"
        + b"+OK 1 23\r\n"
        + ok(TEXT_LOGOUT)
    )
    assert_untouched(store)


def test_noop_answers_plain_ok():
    # X11
    written = transcript(LOGIN, b"NOOP\r\nNOOP keepalive\r\n")
    assert written == GREETING_LINE + LOGGED_IN + b"+OK\r\n+OK\r\n"


def test_message_numbers_are_fixed_even_when_the_store_changes():
    # A09: a delivery (and even a reordering) during the session changes nothing the client sees.
    store = alice_store()

    def deliver() -> None:
        store.messages.insert(0, ("uid-0", b"Subject: zero\r\n\r\nnew\r\n"))
        store.messages.append(("uid-4", b"Subject: four\r\n\r\nnew\r\n"))

    written = transcript(
        LOGIN, deliver, b"STAT\r\nUIDL\r\nRETR 1\r\nLIST 4\r\nDELE 1\r\nQUIT\r\n", store=store
    )
    assert written == (
        GREETING_LINE
        + LOGGED_IN
        + b"+OK 3 106\r\n"
        + b"+OK 3 messages (106 octets)\r\n1 uid-1\r\n2 uid-2\r\n3 uid-3\r\n.\r\n"
        + b"+OK 23 octets\r\n"
        + M1
        + b".\r\n"
        + err(TEXT_NO_SUCH_MESSAGE)
        + ok(TEXT_MARKED)
        + ok(TEXT_LOGOUT_DELETED)
    )
    assert [uidl for uidl, _ in store.messages] == ["uid-0", "uid-2", "uid-3", "uid-4"]


def test_message_removed_behind_the_session_is_a_temporary_failure():
    # X16: only possible without a lock; the session answers [SYS/TEMP] and carries on.
    store = alice_store()

    def expunge() -> None:
        del store.messages[1]

    written = transcript(LOGIN, expunge, b"RETR 2\r\nTOP 2 0\r\nSTAT\r\nNOOP\r\n", store=store)
    assert written == (
        GREETING_LINE
        + LOGGED_IN
        + b"-ERR [SYS/TEMP] Mail store temporarily unavailable.\r\n"
        + err(TEXT_STORE_FAILED, ResponseCode.SYS_TEMP)
        + b"+OK 3 106\r\n"
        + b"+OK\r\n"
    )


class SecondChunkFailsMaildrop(MemoryMaildrop):
    """Yields the first five bytes of a message, then the store fails."""

    async def read(self, info: MessageInfo) -> AsyncIterator[bytes]:
        yield dict(self._store.messages)[info.key][:5]
        raise MaildropError("the database went away")


def test_a_read_failing_mid_message_closes_the_session_with_one_warning_and_no_traceback(caplog):
    store = alice_store(maildrop_class=SecondChunkFailsMaildrop)
    observer = RecordingObserver()
    io = ScriptedIO(LOGIN, b"DELE 2\r\n", b"RETR 1\r\n", b"NOOP\r\n")
    with caplog.at_level(logging.DEBUG, logger="pop3.session"):
        reason = run(make_session(io, store, observer=observer))
    assert reason is EndReason.ERROR
    assert bytes(io.written) == GREETING_LINE + LOGGED_IN + ok(TEXT_MARKED) + ok("23 octets") + M1[:5]
    assert [(record.levelname, record.getMessage(), record.exc_info) for record in caplog.records] == [
        (
            "WARNING",
            "POP3 session 0123abcd <alice>: message 1 could not be read to its end "
            "(the database went away); closing",
            None,
        )
    ]
    assert (observer.calls[-1], io.closed) == (("closed", EndReason.ERROR), True)
    assert_untouched(store)


def test_line_too_long_after_login_closes_with_error_and_deletes_nothing():
    store = alice_store()
    observer = RecordingObserver()
    io = ScriptedIO(LOGIN, b"DELE 1\r\n", b"LIST " + b"9" * 3000 + b"\r\n")
    assert run(make_session(io, store, observer=observer)) is EndReason.ERROR
    assert bytes(io.written) == GREETING_LINE + LOGGED_IN + ok(TEXT_MARKED) + err(TEXT_LINE_TOO_LONG)
    assert observer.calls[-1] == ("closed", EndReason.ERROR)
    assert_untouched(store)


# --- UPDATE and every other way out (U01-U03, X18, G15) -------------------------------------


def test_quit_commits_deletions_and_sends_nothing_more():
    # U01
    store = alice_store()
    io = ScriptedIO(LOGIN, b"DELE 1\r\nDELE 3\r\nQUIT\r\nNOOP\r\n")
    session = make_session(io, store)
    assert run(session) is EndReason.QUIT
    assert (
        bytes(io.written)
        == GREETING_LINE + LOGGED_IN + ok(TEXT_MARKED) * 2 + b"+OK Logging out, messages deleted.\r\n"
    )
    assert store.messages == [("uid-2", M2)]
    assert store.lock_owner is None
    assert (session.stats.deleted_count, session.stats.deleted_bytes) == (2, 59)
    assert io.closed


def test_quit_gives_the_maildrop_back_before_its_answer_leaves():
    """poplib's quit() closes as soon as it reads the answer: a login right after it found the
    maildrop still locked (``-ERR [IN-USE]``) when the lock went back only after the answer."""
    store = alice_store()
    written_at_release: list[bytes] = []

    class WatchedMaildrop(MemoryMaildrop):
        async def release(self) -> None:
            written_at_release.append(bytes(io.written))
            await super().release()

    store.maildrop_class = WatchedMaildrop
    io = ScriptedIO(LOGIN, b"DELE 1\r\nQUIT\r\n")
    assert run(make_session(io, store)) is EndReason.QUIT
    assert written_at_release == [GREETING_LINE + LOGGED_IN + ok(TEXT_MARKED)]
    assert bytes(io.written) == GREETING_LINE + LOGGED_IN + ok(TEXT_MARKED) + ok(TEXT_LOGOUT_DELETED)
    assert store.lock_owner is None


def test_quit_with_arguments_is_accepted():
    store = alice_store()
    written = transcript(LOGIN, b"DELE 2\r\nQUIT now\r\n", store=store)
    assert written == GREETING_LINE + LOGGED_IN + ok(TEXT_MARKED) + ok(TEXT_LOGOUT_DELETED)
    assert store.messages == [("uid-1", M1), ("uid-3", M3)]


def test_failed_commit_reports_sys_temp_removes_nothing_and_closes():
    # U02
    store = alice_store(maildrop_class=FailingCommitMaildrop)
    io = ScriptedIO(LOGIN, b"DELE 1\r\nQUIT\r\n")
    session = make_session(io, store)
    assert run(session) is EndReason.QUIT
    assert bytes(io.written) == (
        GREETING_LINE
        + LOGGED_IN
        + ok(TEXT_MARKED)
        + b"-ERR [SYS/TEMP] Some deleted messages were not removed.\r\n"
    )
    assert bytes(io.written).endswith(err(TEXT_COMMIT_FAILED, ResponseCode.SYS_TEMP))
    assert_untouched(store)
    assert session.stats.deleted_count == 0
    assert io.closed


def test_dele_then_drop_deletes_nothing():
    # U03, X18
    store = alice_store()
    observer = RecordingObserver()
    io = ScriptedIO(LOGIN, b"DELE 1\r\nDELE 2\r\n")
    assert run(make_session(io, store, observer=observer)) is EndReason.DROPPED
    assert bytes(io.written) == GREETING_LINE + LOGGED_IN + ok(TEXT_MARKED) * 2
    assert_untouched(store)
    assert observer.calls[-1] == ("closed", EndReason.DROPPED)
    assert observer.final_stats.deleted_count == 0
    assert (observer.final_stats.marked_count, observer.final_stats.marked_bytes) == (2, len(M1) + len(M2))


def test_the_marked_counters_follow_dele_and_rset_as_the_session_runs():
    store = alice_store()
    observer = RecordingObserver()
    io = ScriptedIO(LOGIN, b"DELE 2\r\nRSET\r\nDELE 3\r\nDELE 9\r\nDELE 3\r\n")
    run(make_session(io, store, observer=observer))
    marked = [(stats.marked_count, stats.marked_bytes) for stats in observer.progress_stats]
    assert marked[-5:] == [(1, len(M2)), (0, 0), (1, len(M3)), (1, len(M3)), (1, len(M3))]


def test_kick_mid_session_says_why_and_deletes_nothing():
    # X18: doveadm kick equivalent.
    store = alice_store()
    observer = RecordingObserver()
    io = ScriptedIO(LOGIN, b"DELE 1\r\n", HANG)
    session = make_session(io, store, observer=observer)
    assert kick_when_hanging(session, io) is EndReason.KICKED
    assert bytes(io.written) == (
        GREETING_LINE + LOGGED_IN + ok(TEXT_MARKED) + b"-ERR [SYS/TEMP] Disconnected by an administrator.\r\n"
    )
    assert bytes(io.written).endswith(err(TEXT_KICKED, ResponseCode.SYS_TEMP))
    assert_untouched(store)
    assert observer.calls[-1] == ("closed", EndReason.KICKED)
    assert io.closed
    assert session.kick() is False  # already over


def test_shutdown_mid_session_says_so_and_deletes_nothing():
    store = alice_store()
    io = ScriptedIO(LOGIN, b"DELE 1\r\n", HANG)
    session = make_session(io, store)
    assert kick_when_hanging(session, io, EndReason.SHUTDOWN) is EndReason.SHUTDOWN
    assert bytes(io.written) == GREETING_LINE + LOGGED_IN + ok(TEXT_MARKED) + err(
        TEXT_SHUTTING_DOWN, ResponseCode.SYS_TEMP
    )
    assert_untouched(store)


def test_kick_before_login_says_why():
    store = alice_store()
    io = ScriptedIO(b"USER alice\r\n", HANG)
    assert kick_when_hanging(make_session(io, store), io) is EndReason.KICKED
    assert bytes(io.written) == GREETING_LINE + ok() + err(TEXT_KICKED, ResponseCode.SYS_TEMP)


def test_kick_before_run_is_refused():
    assert make_session(ScriptedIO(), alice_store()).kick() is False


def test_kick_during_quit_commit_is_refused_and_the_commit_finishes():
    store = alice_store(maildrop_class=GatedCommitMaildrop)
    io = ScriptedIO(LOGIN, b"DELE 1\r\nQUIT\r\n")
    session = make_session(io, store)

    async def scenario() -> tuple[bool, EndReason]:
        task = asyncio.create_task(session.run())
        while not store.maildrops and not task.done():
            await asyncio.sleep(0)
        maildrop = store.maildrops[0]
        await until_set(maildrop.committing, task)
        refused = session.kick()
        maildrop.gate.set()
        return refused, await task

    assert asyncio.run(scenario()) == (False, EndReason.QUIT)
    assert bytes(io.written) == GREETING_LINE + LOGGED_IN + ok(TEXT_MARKED) + ok(TEXT_LOGOUT_DELETED)
    assert store.messages == [("uid-2", M2), ("uid-3", M3)]
    assert store.lock_owner is None


def test_idle_timeout_in_transaction_closes_silently_and_deletes_nothing():
    # G15: RFC 1939 section 3, no response on autologout and no UPDATE.
    store = alice_store()
    observer = RecordingObserver()
    io = ScriptedIO(LOGIN, b"DELE 1\r\n", HANG)
    session = make_session(io, store, observer=observer, timeouts=replace(DEFAULT_TIMEOUTS, idle=0.05))
    assert run(session) is EndReason.TIMEOUT
    assert bytes(io.written) == GREETING_LINE + LOGGED_IN + ok(TEXT_MARKED)
    assert_untouched(store)
    assert observer.calls[-1] == ("closed", EndReason.TIMEOUT)
    assert io.closed


def test_every_command_resets_the_idle_timer():
    timeouts = replace(DEFAULT_TIMEOUTS, idle=0.3)
    reason, written = ending(
        LOGIN, Pause(0.2), b"NOOP\r\n", Pause(0.2), b"NOOP\r\n", Pause(0.2), b"QUIT\r\n", timeouts=timeouts
    )
    assert (reason, written) == (EndReason.QUIT, GREETING_LINE + LOGGED_IN + ok() * 2 + ok(TEXT_LOGOUT))


def test_login_timeout_closes_silently():
    reason, written = ending(b"USER alice\r\n", HANG, timeouts=replace(DEFAULT_TIMEOUTS, login=0.05))
    assert (reason, written) == (EndReason.TIMEOUT, GREETING_LINE + ok())


def test_login_timeout_is_a_total_not_per_command():
    timeouts = replace(DEFAULT_TIMEOUTS, login=0.3)
    reason, written = ending(Pause(0.2), b"NOOP\r\n", Pause(0.2), LOGIN, timeouts=timeouts)
    assert (reason, written) == (EndReason.TIMEOUT, GREETING_LINE + err(TEXT_WRONG_STATE))


# --- Observer and statistics ----------------------------------------------------------------


def test_observer_hears_open_login_and_close_of_a_quit_session():
    store = alice_store()
    observer = RecordingObserver()
    io = ScriptedIO(b"USER alice\r\nPASS wrong\r\n", LOGIN, b"STAT\r\nQUIT\r\n")
    run(make_session(io, store, observer=observer))
    assert observer.calls == [
        ("opened", io.info),
        ("login_failed", "alice", LoginFailure.BAD_CREDENTIALS, "USER"),
        ("logged_in", "alice", "USER"),
        ("closed", EndReason.QUIT),
    ]
    assert observer.progress_calls == 5  # USER, PASS, USER, PASS, STAT; not QUIT
    assert observer.maildrops == store.maildrops and len(store.maildrops) == 1


def test_observer_hears_timeout_as_the_end_reason():
    observer = RecordingObserver()
    timeouts = replace(DEFAULT_TIMEOUTS, login=0.01)
    run(make_session(ScriptedIO(HANG), alice_store(), observer=observer, timeouts=timeouts))
    assert [call[0] for call in observer.calls] == ["opened", "closed"]
    assert observer.calls[-1] == ("closed", EndReason.TIMEOUT)


def test_session_stats_count_commands_bytes_retrievals_and_deletions():
    store = alice_store()
    observer = RecordingObserver()
    io = ScriptedIO(LOGIN, b"RETR 2\r\nTOP 3 1\r\nDELE 1\r\nQUIT\r\n")
    session = make_session(io, store, observer=observer)
    run(session)
    assert session.stats == SessionStats(
        commands=6,  # USER PASS RETR TOP DELE QUIT
        bytes_in=len(io.sent),
        bytes_out=len(io.written),
        retr_count=1,
        retr_bytes=len(b"+OK 47 octets\r\n") + len(M2_ON_THE_WIRE),  # 68: every byte of the reply
        top_count=1,
        top_bytes=len(b"+OK\r\n") + 24 + len(b"l1\r\n") + len(b".\r\n"),  # 36
        deleted_count=1,
        deleted_bytes=23,
        marked_count=1,
        marked_bytes=23,
        message_count=3,
        message_bytes=106,
    )
    assert (session.stats.retr_bytes, session.stats.top_bytes, session.stats.bytes_in) == (68, 36, 56)
    assert observer.final_stats == session.stats
    assert session.username == "alice"


# --- Bugs pinned for a fix ------------------------------------------------------------------


def test_retr_is_complete_when_the_maildrop_yields_an_empty_chunk():
    written = transcript(LOGIN, b"RETR 2\r\n", store=alice_store(maildrop_class=EmptyChunkMaildrop))
    assert written == GREETING_LINE + LOGGED_IN + b"+OK 47 octets\r\n" + M2_ON_THE_WIRE


def test_client_that_stops_reading_is_timed_out_and_the_lock_released():
    store = alice_store()

    def stop_reading() -> None:
        io.drain_stalled = True

    io = ScriptedIO(LOGIN, stop_reading, b"RETR 1\r\n")
    session = make_session(io, store, timeouts=replace(DEFAULT_TIMEOUTS, idle=0.05))

    async def scenario() -> EndReason | None:
        task = asyncio.create_task(session.run())
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:
            session.kick(EndReason.SHUTDOWN)
            await task
            return None
        return task.result()

    assert asyncio.run(scenario()) is EndReason.TIMEOUT
    assert_untouched(store)


class ReleaseFailsMaildrop(MemoryMaildrop):
    """Breaks the contract: release() raises (after giving the lock back)."""

    async def release(self) -> None:
        await super().release()
        raise RuntimeError("release failed")


def test_every_teardown_step_runs_when_release_raises(caplog):
    store = alice_store(maildrop_class=ReleaseFailsMaildrop)
    observer = RecordingObserver()
    io = ScriptedIO(LOGIN, b"STAT\r\n")
    with caplog.at_level(logging.ERROR, logger="pop3.session"):
        reason = run(make_session(io, store, observer=observer))
    assert reason is EndReason.DROPPED
    assert (observer.calls[-1], io.closed) == (("closed", EndReason.DROPPED), True)
    assert [(record.getMessage(), record.exc_info[0]) for record in caplog.records] == [
        ("POP3 session 0123abcd: teardown failed", RuntimeError)
    ]


def test_quit_is_answered_when_the_release_raises(caplog):
    store = alice_store(maildrop_class=ReleaseFailsMaildrop)
    io = ScriptedIO(LOGIN, b"DELE 1\r\nQUIT\r\n")
    with caplog.at_level(logging.ERROR, logger="pop3.session"):
        reason = run(make_session(io, store))
    assert reason is EndReason.QUIT
    assert bytes(io.written) == GREETING_LINE + LOGGED_IN + ok(TEXT_MARKED) + ok(TEXT_LOGOUT_DELETED)
    assert [uidl for uidl, _ in store.messages] == ["uid-2", "uid-3"]
    assert [(record.getMessage(), record.exc_info[0]) for record in caplog.records] == [
        ("POP3 session 0123abcd: releasing the maildrop failed", RuntimeError)
    ]


def test_quit_is_answered_when_the_session_is_cancelled_during_its_release():
    """The server's shutdown cancels what is left after its grace period: a QUIT whose deletions
    are done still says so, and its release goes on."""
    store = alice_store()
    releasing, released = asyncio.Event(), asyncio.Event()

    class SlowReleaseMaildrop(MemoryMaildrop):
        async def release(self) -> None:
            releasing.set()
            await released.wait()
            await super().release()

    store.maildrop_class = SlowReleaseMaildrop
    io = ScriptedIO(LOGIN, b"DELE 1\r\nQUIT\r\n")
    session = make_session(io, store)

    async def scenario() -> EndReason:
        task = asyncio.create_task(session.run())
        await until_set(releasing, task)
        task.cancel()
        reason = await task
        released.set()
        await asyncio.sleep(0)  # the shielded release finishes
        return reason

    assert asyncio.run(scenario()) is EndReason.QUIT
    assert bytes(io.written) == GREETING_LINE + LOGGED_IN + ok(TEXT_MARKED) + ok(TEXT_LOGOUT_DELETED)
    assert store.lock_owner is None
    assert [uidl for uidl, _ in store.messages] == ["uid-2", "uid-3"]


# --- Log lines (P9) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_text", "logged"),
    [
        ("alice@example.test", "alice@example.test"),
        ("jürgen@exämple.test", "jürgen@exämple.test"),
        ('a\\b"c', "a\\x5cb\\x22c"),
        ("tab\there\x00", "tab\\x09here\\x00"),
        ("rtl\u202eoverride\u00a0", "rtl\\u202eoverride\\xa0"),
        ("\U000e0041tag", "\\U000e0041tag"),
    ],
)
def test_log_text_escapes_delimiters_spaces_and_unprintables(client_text, logged):
    assert log_text(client_text) == logged
