"""Transcripts of the sans-IO core alone: client bytes in, exact events and reply bytes out.

Row ids (G03, A14, ...) refer to /work/shared/POP3-CHECKLIST.md section 1.
"""

import base64

import pytest

from pop3.protocol import (
    MAX_BAD_COMMANDS_AFTER_LOGIN,
    MAX_BAD_COMMANDS_BEFORE_LOGIN,
    MAX_COMMANDS_BEFORE_LOGIN,
    MAX_LINE_AFTER_LOGIN,
    MAX_LINE_BEFORE_LOGIN,
    MAX_REPLY_LINE,
    MAX_SASL_FIELD,
    MAX_SASL_LINE,
    NEED_DATA,
    TEXT_APOP_DISABLED,
    TEXT_AUTH_ABORTED,
    TEXT_BAD_ENCODING,
    TEXT_BEGIN_TLS,
    TEXT_BYE,
    TEXT_LINE_TOO_LONG,
    TEXT_NO_USERNAME,
    TEXT_NUL,
    TEXT_PLAINTEXT_DISALLOWED,
    TEXT_STLS_PIPELINED,
    TEXT_SYNTAX,
    TEXT_TLS_ACTIVE,
    TEXT_TLS_UNAVAILABLE,
    TEXT_TOO_MANY_BAD,
    TEXT_TOO_MANY_COMMANDS,
    TEXT_UNKNOWN_COMMAND,
    TEXT_UNSUPPORTED_MECHANISM,
    TEXT_UTF8,
    TEXT_WRONG_STATE,
    AuthRejected,
    Close,
    Connection,
    Credentials,
    Dele,
    DotStuffer,
    Event,
    ListMessages,
    LocalProtocolError,
    Noop,
    Policy,
    Quit,
    Reply,
    ResponseCode,
    Retr,
    Rset,
    StartTls,
    Stat,
    State,
    Top,
    TopLimiter,
    Uidl,
    decode_sasl_base64,
    encode_plain,
    err,
    multiline,
    ok,
    parse_number,
    parse_plain,
    unstuff,
)

TRUSTED = Policy(cleartext_trusted=True)  # loopback: USER/PASS and AUTH allowed without TLS
UNTRUSTED = Policy()  # plain port, no certificate, not a trusted network
STLS_PORT = Policy(stls_available=True)  # plain port with a certificate configured
IMPLICIT_TLS = Policy(tls_active=True)

BASE_CAPS = ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "EXPIRE NEVER", "UTF8 USER")
CLEARTEXT_CAPS = ("USER", "SASL PLAIN LOGIN")

PLAIN_ALICE = base64.b64encode(b"\x00alice\x00secret").decode()  # AGFsaWNlAHNlY3JldA==


# --- Helpers --------------------------------------------------------------------------------


def connection(policy: Policy = TRUSTED, *, logged_in: bool = False) -> Connection:
    conn = Connection(policy)
    if logged_in:
        conn.login_succeeded()
    return conn


def feed(conn: Connection, data: bytes) -> list[Event]:
    """Feed ``data`` and pull every event it completes (NEED_DATA excluded), stopping at Close."""
    conn.receive_data(data)
    events: list[Event] = []
    while conn.state is not State.CLOSED:
        event = conn.next_event()
        if event is NEED_DATA:
            break
        events.append(event)
    return events


def one(conn: Connection, line: bytes) -> Event:
    """The single event produced by one command line (CRLF appended)."""
    events = feed(conn, line + b"\r\n")
    assert len(events) == 1, events
    return events[0]


def bad(text: str) -> Reply:
    """A -ERR the connection counts as a bad command (G18)."""
    return Reply(err(text), bad_command=True)


def capa_reply(*caps: str) -> bytes:
    return b"+OK Capability list follows.\r\n" + b"".join(c.encode() + b"\r\n" for c in caps) + b".\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# --- Reply formatting (G02, G08, G11) -------------------------------------------------------


def test_status_indicators_are_exact_upper_case_with_crlf():
    assert ok() == b"+OK\r\n"
    assert ok("Logged in.") == b"+OK Logged in.\r\n"
    assert err("Nope.") == b"-ERR Nope.\r\n"
    assert err("Authentication failed.", ResponseCode.AUTH) == b"-ERR [AUTH] Authentication failed.\r\n"
    assert err("x", ResponseCode.SYS_TEMP) == b"-ERR [SYS/TEMP] x\r\n"
    assert err("x", ResponseCode.IN_USE) == b"-ERR [IN-USE] x\r\n"
    assert err("x", ResponseCode.LOGIN_DELAY) == b"-ERR [LOGIN-DELAY] x\r\n"


def test_reply_line_of_512_octets_is_allowed_and_513_refused():
    assert len(ok("a" * (MAX_REPLY_LINE - 6))) == 512
    with pytest.raises(LocalProtocolError):
        ok("a" * (MAX_REPLY_LINE - 5))


@pytest.mark.parametrize("text", ["a\r\nb", "a\nb", "a\rb"])
def test_reply_text_with_a_line_break_is_refused(text: str):
    with pytest.raises(LocalProtocolError):
        err(text)


def test_empty_multiline_is_ok_line_then_terminator():
    assert multiline("0 messages (0 octets)", []) == b"+OK 0 messages (0 octets)\r\n.\r\n"


def test_multiline_stuffs_lines_starting_with_a_dot():
    assert multiline("x", [".", "..x", "a.b", ".dot"]) == b"+OK x\r\n..\r\n...x\r\na.b\r\n..dot\r\n.\r\n"


# --- Framing (G03-G10) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"list 1", ListMessages(1)),
        (b"LiSt 1", ListMessages(1)),
        (b"stat", Stat()),
        (b"uidl", Uidl(None)),
        (b"Uidl 2", Uidl(2)),
        (b"retr 3", Retr(3)),
        (b"dele 4", Dele(4)),
        (b"top 1 2", Top(1, 2)),
        (b"noop", Noop()),
        (b"rset", Rset()),
        (b"quit", Quit()),
    ],
)
def test_transaction_keywords_are_case_insensitive(line: bytes, event: Event):
    assert one(connection(logged_in=True), line) == event


@pytest.mark.parametrize("line", [b"user alice", b"User alice", b"uSeR alice"])
def test_authorization_keywords_are_case_insensitive(line: bytes):
    conn = connection()
    assert one(conn, line) == Reply(ok())
    assert one(conn, b"pass secret") == Credentials("alice", "secret", "USER")


def test_auth_mechanism_name_is_case_insensitive():
    assert one(connection(), b"auth plain") == Reply(b"+ \r\n")
    assert one(connection(), b"AUTH login") == Reply(b"+ VXNlcm5hbWU6\r\n")


def test_quit_keyword_is_case_insensitive_before_login():
    assert one(connection(), b"quit") == Close(ok(TEXT_BYE), "quit")


@pytest.mark.parametrize("logged_in", [False, True])
@pytest.mark.parametrize("line", [b"FOO", b"", b" ", b"XTND XMIT", b"STATS"])
def test_unknown_or_empty_command_is_refused_and_state_unchanged(line: bytes, logged_in: bool):
    conn = connection(logged_in=logged_in)
    state = conn.state
    assert one(conn, line) == bad(TEXT_UNKNOWN_COMMAND)
    assert conn.state is state


def test_last_is_an_unknown_command():
    # X17: LAST left the standard with RFC 1725; fetchmail copes with -ERR.
    assert one(connection(logged_in=True), b"LAST") == Reply(b"-ERR Unknown command.\r\n", bad_command=True)


AUTHORIZATION_ONLY = [
    b"USER alice",
    b"PASS secret",
    b"APOP alice 0123456789abcdef0123456789abcdef",
    b"AUTH",
    b"AUTH PLAIN",
    b"STLS",
    b"UTF8",
]
TRANSACTION_ONLY = [
    b"STAT",
    b"LIST",
    b"LIST 1",
    b"RETR 1",
    b"DELE 1",
    b"NOOP",
    b"RSET",
    b"TOP 1 0",
    b"UIDL",
    b"UIDL 1",
]


@pytest.mark.parametrize("line", TRANSACTION_ONLY)
def test_transaction_command_before_login_is_wrong_state(line: bytes):
    conn = connection(STLS_PORT)
    assert one(conn, line) == bad(TEXT_WRONG_STATE)
    assert conn.state is State.AUTHORIZATION


@pytest.mark.parametrize("line", AUTHORIZATION_ONLY)
def test_authorization_command_after_login_is_wrong_state(line: bytes):
    conn = connection(Policy(cleartext_trusted=True, stls_available=True), logged_in=True)
    assert one(conn, line) == bad(TEXT_WRONG_STATE)
    assert conn.state is State.TRANSACTION


@pytest.mark.parametrize("logged_in", [False, True])
def test_capa_and_quit_are_valid_in_both_states(logged_in: bool):
    conn = connection(logged_in=logged_in)
    implementation = ("IMPLEMENTATION mailadmin",) if logged_in else ()
    assert one(conn, b"CAPA") == Reply(capa_reply(*BASE_CAPS, *CLEARTEXT_CAPS, *implementation))
    assert one(conn, b"QUIT") == (Quit() if logged_in else Close(ok(TEXT_BYE), "quit"))


def test_user_with_254_character_name_is_accepted():
    # G06: RFC 2449 section 4 requires command lines of at least 255 octets.
    name = "a" * 254
    conn = connection()
    assert one(conn, b"USER " + name.encode()) == Reply(ok())
    assert one(conn, b"PASS secret") == Credentials(name, "secret", "USER")


@pytest.mark.parametrize(
    ("logged_in", "limit"), [(False, MAX_LINE_BEFORE_LOGIN), (True, MAX_LINE_AFTER_LOGIN)]
)
def test_line_of_exactly_the_limit_including_crlf_is_parsed(logged_in: bool, limit: int):
    line = b"NOOP " + b"x" * (limit - len(b"NOOP \r\n")) + b"\r\n"
    assert len(line) == limit
    expected = [Noop()] if logged_in else [bad(TEXT_WRONG_STATE)]
    assert feed(connection(logged_in=logged_in), line) == expected


@pytest.mark.parametrize(
    ("logged_in", "limit"), [(False, MAX_LINE_BEFORE_LOGIN), (True, MAX_LINE_AFTER_LOGIN)]
)
def test_line_one_octet_over_the_limit_closes(logged_in: bool, limit: int):
    conn = connection(logged_in=logged_in)
    line = b"NOOP " + b"x" * (limit + 1 - len(b"NOOP \r\n")) + b"\r\n"
    assert feed(conn, line) == [Close(err(TEXT_LINE_TOO_LONG), "line too long")]
    assert conn.state is State.CLOSED


def test_line_without_newline_closes_as_soon_as_the_limit_is_buffered():
    # G07: nothing is buffered without bound; the close does not wait for a newline.
    conn = connection()
    assert feed(conn, b"U" * (MAX_LINE_BEFORE_LOGIN - 1)) == []
    assert feed(conn, b"U") == [Close(b"-ERR Input line too long.\r\n", "line too long")]


def test_next_event_after_close_is_a_local_error():
    conn = connection()
    feed(conn, b"x" * MAX_LINE_BEFORE_LOGIN)
    with pytest.raises(LocalProtocolError):
        conn.next_event()


@pytest.mark.parametrize(
    ("logged_in", "line", "reply"),
    [
        (True, b"NOOP\r\r\n", bad(TEXT_UNKNOWN_COMMAND)),
        (False, b"NOOP\r\r\n", bad(TEXT_UNKNOWN_COMMAND)),
        (True, b"LIST " + b"a" * 1500 + b"\r\n", bad(TEXT_SYNTAX)),
        (True, b"RETR \x1b[31mred\r\n", bad(TEXT_SYNTAX)),
        (False, b"X\x1b]0;title\x07\r\n", bad(TEXT_UNKNOWN_COMMAND)),
        (False, b"HELO\xff\xfe\r\n", bad(TEXT_BAD_ENCODING)),
        (True, b"LIST 1\x00evil\r\n", bad(TEXT_NUL)),
        (False, b"GET / HTTP/1.1\r\n", bad(TEXT_UNKNOWN_COMMAND)),
    ],
)
def test_client_bytes_are_never_echoed(logged_in: bool, line: bytes, reply: Reply):
    # G08, G09: fixed texts only, so no reflection and every line stays under 512 octets.
    [event] = feed(connection(logged_in=logged_in), line)
    assert event == reply
    assert len(event.data) <= MAX_REPLY_LINE
    for marker in (b"\r\r", b"aaaa", b"\x1b", b"\x07", b"\xff", b"\x00", b"evil", b"HTTP", b"HELO", b"title"):
        assert marker not in event.data


@pytest.mark.parametrize("line", [b"LIST 1\x00", b"\x00LIST 1", b"US\x00ER alice"])
def test_nul_in_a_command_is_rejected_not_truncated(line: bytes):
    # G10: Dovecot treats "LIST 1\0" as "LIST 1"; we refuse it.
    assert one(connection(logged_in=True), line) == Reply(
        b"-ERR NUL bytes are not allowed in commands.\r\n", bad_command=True
    )


def test_bare_lf_line_ending_is_accepted():
    conn = connection()
    assert feed(conn, b"USER alice\nPASS secret\n") == [Reply(ok()), Credentials("alice", "secret", "USER")]
    conn.login_succeeded()
    assert feed(conn, b"LIST 1\n") == [ListMessages(1)]


def test_only_one_trailing_cr_is_stripped():
    assert one(connection(logged_in=True), b"STAT\r") == bad(TEXT_UNKNOWN_COMMAND)


def test_invalid_utf8_command_is_rejected():
    assert one(connection(), b"USER \xc3\x28") == Reply(
        b"-ERR Command is not valid UTF-8.\r\n", bad_command=True
    )


def test_utf8_username_is_accepted():
    # I03: USER takes UTF-8 (CAPA says "UTF8 USER"); the authenticator decides.
    conn = connection()
    assert one(conn, "USER jörg".encode()) == Reply(ok())
    assert one(conn, "PASS pässword".encode()) == Credentials("jörg", "pässword", "USER")


@pytest.mark.parametrize(
    ("policy", "logged_in", "line"),
    [
        (TRUSTED, True, "ſtat".encode()),  # U+017F LATIN SMALL LETTER LONG S
        (TRUSTED, True, "lıst 1".encode()),  # U+0131 LATIN SMALL LETTER DOTLESS I
        (STLS_PORT, False, "ﬆls".encode()),  # U+FB06 LATIN SMALL LIGATURE ST
    ],
)
def test_non_ascii_lookalike_keyword_is_unknown(policy: Policy, logged_in: bool, line: bytes):
    assert one(connection(policy, logged_in=logged_in), line) == bad(TEXT_UNKNOWN_COMMAND)


def test_non_ascii_lookalike_mechanism_is_unsupported():
    assert one(connection(), "AUTH plaın".encode()) == Reply(
        err(TEXT_UNSUPPORTED_MECHANISM, ResponseCode.AUTH)
    )


# --- Pipelining (G16) -----------------------------------------------------------------------


def test_pipelined_lines_come_out_one_event_at_a_time_in_order():
    conn = connection(logged_in=True)
    conn.receive_data(b"STAT\r\nLIST 1\r\nUIDL\r\nNOOP\r\n")
    assert conn.next_event() == Stat()
    assert conn.buffered_bytes == len(b"LIST 1\r\nUIDL\r\nNOOP\r\n")
    assert conn.next_event() == ListMessages(1)
    assert conn.next_event() == Uidl(None)
    assert conn.next_event() == Noop()
    assert conn.next_event() is NEED_DATA
    assert conn.buffered_bytes == 0


def test_commands_pipelined_after_pass_are_parsed_in_the_state_after_login():
    conn = connection()
    conn.receive_data(b"USER alice\r\nPASS secret\r\nSTAT\r\nRETR 1\r\n")
    assert conn.next_event() == Reply(ok())
    assert conn.next_event() == Credentials("alice", "secret", "USER")
    conn.login_succeeded()
    assert conn.next_event() == Stat()
    assert conn.next_event() == Retr(1)


def test_commands_pipelined_after_a_failed_pass_stay_in_authorization():
    conn = connection()
    conn.receive_data(b"USER alice\r\nPASS wrong\r\nSTAT\r\n")
    assert conn.next_event() == Reply(ok())
    assert conn.next_event() == Credentials("alice", "wrong", "USER")
    assert conn.next_event() == bad(TEXT_WRONG_STATE)


def test_partial_line_waits_for_the_rest():
    conn = connection(logged_in=True)
    assert feed(conn, b"RE") == []
    assert feed(conn, b"TR 1") == []
    assert feed(conn, b"2\r") == []
    assert feed(conn, b"\nST") == [Retr(12)]
    assert feed(conn, b"AT\r\n") == [Stat()]


# --- Bad-command limit (G18) ----------------------------------------------------------------


def test_third_bad_command_before_login_closes():
    conn = connection()
    assert MAX_BAD_COMMANDS_BEFORE_LOGIN == 3
    assert feed(conn, b"FOO\r\nSTAT\r\n") == [bad(TEXT_UNKNOWN_COMMAND), bad(TEXT_WRONG_STATE)]
    assert feed(conn, b"BAR\r\nCAPA\r\n") == [
        Close(b"-ERR Too many bad commands.\r\n", "too many bad commands")
    ]
    assert conn.state is State.CLOSED


def test_good_command_resets_the_bad_command_count():
    conn = connection()
    events = feed(conn, b"FOO\r\nFOO\r\nUSER alice\r\nFOO\r\nFOO\r\n")
    assert events == [bad(TEXT_UNKNOWN_COMMAND)] * 2 + [Reply(ok())] + [bad(TEXT_UNKNOWN_COMMAND)] * 2
    assert feed(conn, b"FOO\r\n") == [Close(err(TEXT_TOO_MANY_BAD), "too many bad commands")]


def test_twentieth_consecutive_bad_command_after_login_closes():
    # The limit counts the closing command itself, as before login (Dovecot's pop3 closes on the 21st).
    assert MAX_BAD_COMMANDS_AFTER_LOGIN == 20
    conn = connection(logged_in=True)
    assert feed(conn, b"RETR x\r\n" * 19) == [bad(TEXT_SYNTAX)] * 19
    assert feed(conn, b"RETR x\r\nSTAT\r\n") == [Close(err(TEXT_TOO_MANY_BAD), "too many bad commands")]


def test_a_pipelined_flood_of_good_commands_before_login_is_cut_off_at_the_limit():
    conn = connection()
    events = feed(conn, b"CAPA\r\n" * (MAX_COMMANDS_BEFORE_LOGIN + 50))
    assert len(events) == MAX_COMMANDS_BEFORE_LOGIN + 1
    assert all(isinstance(event, Reply) and not event.bad_command for event in events[:-1])
    assert events[-1] == Close(err(TEXT_TOO_MANY_COMMANDS), "too many commands before login")


def test_sasl_responses_count_against_the_limit_before_login_and_nothing_counts_after():
    conn = connection()
    feed(conn, b"AUTH PLAIN\r\n*\r\n" * (MAX_COMMANDS_BEFORE_LOGIN // 2 - 1) + b"CAPA\r\n")
    assert feed(conn, b"CAPA\r\n") == [Reply(capa_reply(*conn.capabilities()))]
    assert feed(conn, b"CAPA\r\n") == [Close(err(TEXT_TOO_MANY_COMMANDS), "too many commands before login")]
    logged_in = connection()
    feed(logged_in, b"CAPA\r\n" * (MAX_COMMANDS_BEFORE_LOGIN - 1))
    logged_in.login_succeeded()
    assert feed(logged_in, b"NOOP\r\n" * 1000) == [Noop()] * 1000


def test_login_resets_the_bad_command_count():
    conn = connection()
    feed(conn, b"FOO\r\nFOO\r\n")
    conn.login_succeeded()
    assert feed(conn, b"FOO\r\n") == [bad(TEXT_UNKNOWN_COMMAND)]


def test_plaintext_refusal_is_not_a_bad_command():
    conn = connection(UNTRUSTED)
    refusal = Reply(err(TEXT_PLAINTEXT_DISALLOWED, ResponseCode.AUTH))
    assert feed(conn, b"USER a\r\nUSER b\r\nUSER c\r\nUSER d\r\n") == [refusal] * 4
    assert conn.state is State.AUTHORIZATION


# --- USER / PASS (A01, A02, A06, A07, T11) --------------------------------------------------


def test_user_is_accepted_for_any_name_without_lookup():
    assert one(connection(), b"USER nobody-at-all@nowhere.invalid") == Reply(b"+OK\r\n")


@pytest.mark.parametrize("line", [b"USER", b"USER "])
def test_user_without_a_name_is_a_syntax_error(line: bytes):
    assert one(connection(), line) == bad(TEXT_SYNTAX)


def test_pass_without_user_is_refused():
    assert one(connection(), b"PASS secret") == Reply(b"-ERR No username given.\r\n", bad_command=True)


def test_username_is_used_once():
    conn = connection()
    assert feed(conn, b"USER alice\r\nPASS wrong\r\nPASS secret\r\n") == [
        Reply(ok()),
        Credentials("alice", "wrong", "USER"),
        bad(TEXT_NO_USERNAME),
    ]


@pytest.mark.parametrize(
    ("line", "password"),
    [
        (b"PASS secret", "secret"),
        (b"PASS  leading", " leading"),
        (b"PASS trailing ", "trailing "),
        (b"PASS two  inner  spaces", "two  inner  spaces"),
        (b"PASS \ttab", "\ttab"),
        (b"PASS a b c", "a b c"),
    ],
)
def test_password_is_the_rest_of_the_line(line: bytes, password: str):
    conn = connection()
    one(conn, b"USER alice")
    assert one(conn, line) == Credentials("alice", password, "USER")


def test_credentials_repr_hides_the_password():
    assert "secret" not in repr(Credentials("alice", "secret", "USER"))


@pytest.mark.parametrize(
    "lines",
    [
        [b"USER alice", b"PASS secret"],  # the right password
        [b"USER alice", b"PASS wrong"],
        [b"USER nobody", b"PASS x"],
        [b"PASS secret"],
        [b"AUTH PLAIN " + PLAIN_ALICE.encode()],
        [b"AUTH PLAIN"],
        [b"AUTH LOGIN"],
        [b"AUTH LOGIN YWxpY2U="],
    ],
)
def test_cleartext_login_on_untrusted_connection_is_refused_alike_and_never_verified(lines: list[bytes]):
    # A06, A07, T11: the same [AUTH] refusal whatever the credentials; no Credentials event.
    conn = connection(UNTRUSTED)
    refusal = Reply(b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections.\r\n")
    assert feed(conn, b"".join(line + b"\r\n" for line in lines)) == [refusal] * len(lines)
    assert conn.state is State.AUTHORIZATION


def test_user_given_before_refusal_cannot_be_used_later():
    conn = connection(STLS_PORT)
    assert one(conn, b"USER alice") == Reply(err(TEXT_PLAINTEXT_DISALLOWED, ResponseCode.AUTH))
    assert one(conn, b"PASS secret") == Reply(err(TEXT_PLAINTEXT_DISALLOWED, ResponseCode.AUTH))


def test_apop_is_refused_as_not_offered():
    # A11: APOP needs a plaintext-equivalent secret; passwords are one-way hashes.
    event = one(connection(), b"APOP alice c4c9334bac560ecc979e58001b3e22fb")
    assert event == Reply(
        b"-ERR APOP is not offered: passwords are stored as one-way hashes.\r\n", bad_command=True
    )
    assert event == bad(TEXT_APOP_DISABLED)


def test_quit_before_login_says_goodbye_and_closes():
    # A10: QUIT in AUTHORIZATION is +OK and close, no UPDATE; arguments are ignored.
    conn = connection()
    assert feed(conn, b"QUIT now\r\nCAPA\r\n") == [Close(b"+OK Logging out.\r\n", "quit")]
    assert conn.state is State.CLOSED


# --- AUTH (A12-A19) -------------------------------------------------------------------------


def test_bare_auth_lists_mechanisms_when_cleartext_is_allowed():
    assert one(connection(), b"AUTH") == Reply(b"+OK Supported mechanisms follow.\r\nPLAIN\r\nLOGIN\r\n.\r\n")


def test_bare_auth_lists_no_mechanisms_when_cleartext_is_refused():
    assert one(connection(UNTRUSTED), b"AUTH") == Reply(b"+OK Supported mechanisms follow.\r\n.\r\n")


def test_auth_with_a_trailing_space_is_a_syntax_error():
    assert one(connection(), b"AUTH ") == bad(TEXT_SYNTAX)


@pytest.mark.parametrize("policy", [TRUSTED, UNTRUSTED])
@pytest.mark.parametrize("line", [b"AUTH CRAM-MD5", b"AUTH XOAUTH2 abc", b"AUTH GSSAPI", b"AUTH EXTERNAL ="])
def test_unknown_mechanism_is_refused_with_auth_code(line: bytes, policy: Policy):
    event = one(connection(policy), line)
    assert event == Reply(b"-ERR [AUTH] Unsupported authentication mechanism.\r\n")
    assert event == Reply(err(TEXT_UNSUPPORTED_MECHANISM, ResponseCode.AUTH))


def test_auth_plain_without_initial_response_sends_empty_challenge():
    conn = connection()
    assert one(conn, b"AUTH PLAIN") == Reply(b"+ \r\n")
    assert one(conn, PLAIN_ALICE.encode()) == Credentials("alice", "secret", "PLAIN")


def test_auth_plain_with_initial_response():
    assert one(connection(), b"AUTH PLAIN " + PLAIN_ALICE.encode()) == Credentials("alice", "secret", "PLAIN")


def test_auth_plain_with_empty_initial_response_fails_cleanly():
    assert one(connection(), b"AUTH PLAIN =") == AuthRejected("PLAIN", "malformed PLAIN message")


def test_auth_plain_with_empty_continuation_is_rejected():
    conn = connection()
    one(conn, b"AUTH PLAIN")
    assert one(conn, b"") == AuthRejected("PLAIN", "invalid base64")


def test_initial_response_with_a_space_is_rejected():
    assert one(connection(), b"AUTH PLAIN AGFs aWNl") == AuthRejected("PLAIN", "malformed initial response")


@pytest.mark.parametrize("mechanism", [b"PLAIN", b"LOGIN"])
def test_star_cancels_and_stays_in_authorization(mechanism: bytes):
    # A15
    conn = connection()
    one(conn, b"AUTH " + mechanism)
    assert one(conn, b"*") == Reply(b"-ERR Authentication aborted by client.\r\n")
    assert conn.state is State.AUTHORIZATION
    assert one(conn, b"CAPA") == Reply(capa_reply(*BASE_CAPS, *CLEARTEXT_CAPS))


def test_star_cancels_login_at_the_password_stage():
    conn = connection()
    assert feed(conn, b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n*\r\n") == [
        Reply(b"+ VXNlcm5hbWU6\r\n"),
        Reply(b"+ UGFzc3dvcmQ6\r\n"),
        Reply(err(TEXT_AUTH_ABORTED)),
    ]
    assert one(conn, b"USER alice") == Reply(ok())


@pytest.mark.parametrize(
    "encoded", [b"=AAA", b"AAA=BBB", b"AAA", b"!!!!", b"AGFsaWNlAHNlY3JldA", b"AGFsaWNl AHNl"]
)
def test_invalid_base64_in_a_plain_continuation_is_rejected(encoded: bytes):
    # A16: rejected, not ignored.
    conn = connection()
    one(conn, b"AUTH PLAIN")
    assert one(conn, encoded) == AuthRejected("PLAIN", "invalid base64")
    assert conn.state is State.AUTHORIZATION


@pytest.mark.parametrize("encoded", [b"=AAA", b"AAA=BBB", b"AAA", b"!!!!", b"AGFsaWNlAHNlY3JldA"])
def test_invalid_base64_in_a_plain_initial_response_is_rejected(encoded: bytes):
    assert one(connection(), b"AUTH PLAIN " + encoded) == AuthRejected("PLAIN", "invalid base64")


def test_non_ascii_sasl_continuation_is_rejected():
    conn = connection()
    one(conn, b"AUTH PLAIN")
    assert one(conn, "AGFsaWNl\u00e9".encode()) == AuthRejected("PLAIN", "invalid base64")


def test_whole_group_of_padding_is_rejected_as_invalid_base64():
    encoded = b64(b"\x00alice\x00secret12")  # 15 octets: 20 characters, no padding of its own
    assert one(connection(), b"AUTH PLAIN " + encoded) == Credentials("alice", "secret12", "PLAIN")
    assert one(connection(), b"AUTH PLAIN " + encoded + b"====") == AuthRejected("PLAIN", "invalid base64")


def test_sasl_line_of_8_kib_is_read_and_longer_closes():
    # A17: the SASL limit, not the 1 KiB command limit, applies to a continuation.
    conn = connection()
    one(conn, b"AUTH PLAIN")
    line = b"A" * (MAX_SASL_LINE - 2) + b"\r\n"
    assert len(line) == 8192
    assert feed(conn, line) == [AuthRejected("PLAIN", "invalid base64")]

    conn = connection()
    one(conn, b"AUTH PLAIN")
    assert feed(conn, b"A" * (MAX_SASL_LINE - 1) + b"\r\n") == [
        Close(err(TEXT_LINE_TOO_LONG), "line too long")
    ]


def test_valid_base64_sasl_line_over_command_limit_is_decoded():
    conn = connection()
    one(conn, b"AUTH PLAIN")
    encoded = b64(b"\x00" + b"u" * 2000 + b"\x00p")
    assert MAX_LINE_BEFORE_LOGIN < len(encoded) < MAX_SASL_LINE
    assert one(conn, encoded) == AuthRejected("PLAIN", "malformed PLAIN message")  # authcid over 255 octets


@pytest.mark.parametrize(
    ("message", "event"),
    [
        (b"alice\x00alice\x00secret", Credentials("alice", "secret", "PLAIN")),
        (b"\x00alice\x00pass with spaces", Credentials("alice", "pass with spaces", "PLAIN")),
        (b"admin\x00alice\x00secret", AuthRejected("PLAIN", "malformed PLAIN message")),
        (b"\x00alice\x00secret\x00", AuthRejected("PLAIN", "malformed PLAIN message")),
        (b"alice\x00secret", AuthRejected("PLAIN", "malformed PLAIN message")),
        (b"\x00\x00secret", AuthRejected("PLAIN", "malformed PLAIN message")),
        (b"\x00alice\x00", AuthRejected("PLAIN", "malformed PLAIN message")),
        (b"\x00\xff\x00secret", AuthRejected("PLAIN", "malformed PLAIN message")),
    ],
)
def test_plain_message_authzid_and_field_rules(message: bytes, event: Event):
    # A18: authzid empty or equal to authcid; exactly two NULs.
    assert one(connection(), b"AUTH PLAIN " + b64(message)) == event


def test_plain_fields_of_255_octets_are_accepted():
    name, password = "u" * MAX_SASL_FIELD, "p" * MAX_SASL_FIELD
    conn = connection()
    one(conn, b"AUTH PLAIN")
    message = b64(f"{name}\x00{name}\x00{password}".encode())
    assert one(conn, message) == Credentials(name, password, "PLAIN")


def test_login_challenges_are_exact_and_yield_credentials():
    # A19: draft-murchison-sasl-login challenges "Username:" and "Password:".
    conn = connection()
    assert one(conn, b"AUTH LOGIN") == Reply(b"+ VXNlcm5hbWU6\r\n")
    assert one(conn, b64(b"alice")) == Reply(b"+ UGFzc3dvcmQ6\r\n")
    assert one(conn, b64(b"secret")) == Credentials("alice", "secret", "LOGIN")
    assert conn.state is State.AUTHORIZATION


def test_login_with_username_as_initial_response_skips_the_first_challenge():
    conn = connection()
    assert one(conn, b"AUTH LOGIN " + b64(b"alice")) == Reply(b"+ UGFzc3dvcmQ6\r\n")
    assert one(conn, b64(b"secret")) == Credentials("alice", "secret", "LOGIN")


@pytest.mark.parametrize("username", [b"=", b"!!!!", b64(b"\xff\xfe"), b64(b"u" * 256)])
def test_login_with_bad_username_response_is_rejected(username: bytes):
    conn = connection()
    one(conn, b"AUTH LOGIN")
    assert one(conn, username) == AuthRejected("LOGIN", "invalid username response")
    assert one(conn, b"CAPA") == Reply(capa_reply(*BASE_CAPS, *CLEARTEXT_CAPS))


@pytest.mark.parametrize("password", [b"!!!!", b64(b"\xff\xfe"), b64(b"p" * 256)])
def test_login_with_bad_password_response_is_rejected(password: bytes):
    conn = connection()
    feed(conn, b"AUTH LOGIN " + b64(b"alice") + b"\r\n")
    assert one(conn, password) == AuthRejected("LOGIN", "invalid password response")


def test_login_fields_of_255_octets_are_accepted():
    conn = connection()
    feed(conn, b"AUTH LOGIN\r\n" + b64(b"u" * 255) + b"\r\n")
    assert one(conn, b64(b"p" * 255)) == Credentials("u" * 255, "p" * 255, "LOGIN")


# --- CAPA (C01-C05, C09-C11, T05) -----------------------------------------------------------


def test_capa_on_untrusted_plain_connection_exact_bytes():
    assert one(connection(UNTRUSTED), b"CAPA") == Reply(
        b"+OK Capability list follows.\r\n"
        b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nEXPIRE NEVER\r\nUTF8 USER\r\n.\r\n"
    )


@pytest.mark.parametrize(
    ("policy", "logged_in", "caps"),
    [
        (UNTRUSTED, False, BASE_CAPS),
        (STLS_PORT, False, (*BASE_CAPS, "STLS")),
        (TRUSTED, False, (*BASE_CAPS, *CLEARTEXT_CAPS)),
        (Policy(cleartext_trusted=True, stls_available=True), False, (*BASE_CAPS, "STLS", *CLEARTEXT_CAPS)),
        (IMPLICIT_TLS, False, (*BASE_CAPS, *CLEARTEXT_CAPS)),
        (Policy(tls_active=True, stls_available=True), False, (*BASE_CAPS, *CLEARTEXT_CAPS)),
        # C02: USER and SASL are still announced after login; C10: IMPLEMENTATION only then.
        (TRUSTED, True, (*BASE_CAPS, *CLEARTEXT_CAPS, "IMPLEMENTATION mailadmin")),
        (IMPLICIT_TLS, True, (*BASE_CAPS, *CLEARTEXT_CAPS, "IMPLEMENTATION mailadmin")),
        # C11: no STLS after login.
        (
            Policy(cleartext_trusted=True, stls_available=True),
            True,
            (*BASE_CAPS, *CLEARTEXT_CAPS, "IMPLEMENTATION mailadmin"),
        ),
        # C09: LOGIN-DELAY only when configured.
        (Policy(login_delay_seconds=900), False, (*BASE_CAPS, "LOGIN-DELAY 900")),
        (
            Policy(cleartext_trusted=True, login_delay_seconds=900),
            True,
            (*BASE_CAPS, *CLEARTEXT_CAPS, "LOGIN-DELAY 900", "IMPLEMENTATION mailadmin"),
        ),
        (
            Policy(cleartext_trusted=True, implementation="x"),
            True,
            (*BASE_CAPS, *CLEARTEXT_CAPS, "IMPLEMENTATION x"),
        ),
    ],
)
def test_capa_lists_what_is_usable_now(policy: Policy, logged_in: bool, caps: tuple[str, ...]):
    conn = connection(policy, logged_in=logged_in)
    assert one(conn, b"CAPA") == Reply(capa_reply(*caps))
    assert conn.capabilities() == list(caps)


def test_capa_with_an_argument_is_a_syntax_error():
    assert one(connection(), b"CAPA x") == bad(TEXT_SYNTAX)


def test_capa_tags_are_printable_ascii_without_dots_and_short():
    # C01: poplib's capa() splits each line on whitespace.
    conn = connection(Policy(cleartext_trusted=True, stls_available=True, login_delay_seconds=60))
    before = conn.capabilities()
    conn.login_succeeded()
    for cap in before + conn.capabilities():
        tag = cap.split(" ")[0]
        assert tag.isascii() and tag.isprintable() and "." not in tag and len(cap) + 2 <= MAX_REPLY_LINE


# --- UTF8 (I01) -----------------------------------------------------------------------------


def test_utf8_command_switches_mode_before_login():
    conn = connection()
    assert conn.utf8 is False
    assert one(conn, b"UTF8") == Reply(b"+OK UTF-8 mode enabled.\r\n")
    assert one(conn, b"UTF8") == Reply(ok(TEXT_UTF8))
    assert conn.utf8 is True


def test_utf8_with_an_argument_is_a_syntax_error():
    conn = connection()
    assert one(conn, b"UTF8 on") == bad(TEXT_SYNTAX)
    assert conn.utf8 is False


# --- STLS (T01-T05) -------------------------------------------------------------------------


def test_stls_asks_for_the_handshake():
    assert one(connection(STLS_PORT), b"STLS") == StartTls(b"+OK Begin TLS negotiation now.\r\n")
    assert one(connection(STLS_PORT), b"stls") == StartTls(ok(TEXT_BEGIN_TLS))


def test_stls_when_tls_is_active_is_refused():
    assert one(connection(IMPLICIT_TLS), b"STLS") == Reply(
        b"-ERR TLS is already active.\r\n", bad_command=True
    )


def test_stls_after_tls_started_is_refused():
    conn = connection(STLS_PORT)
    assert one(conn, b"STLS") == StartTls(ok(TEXT_BEGIN_TLS))
    conn.tls_started()
    assert one(conn, b"STLS") == bad(TEXT_TLS_ACTIVE)


def test_stls_without_a_certificate_is_refused():
    assert one(connection(UNTRUSTED), b"STLS") == Reply(b"-ERR TLS is not available.\r\n", bad_command=True)
    assert one(connection(TRUSTED), b"STLS") == bad(TEXT_TLS_UNAVAILABLE)


def test_stls_with_an_argument_is_a_syntax_error():
    assert one(connection(STLS_PORT), b"STLS now") == bad(TEXT_SYNTAX)


@pytest.mark.parametrize("tail", [b"CAPA\r\n", b"C", b"\r\n", b"USER alice\r\nPASS secret\r\n"])
def test_bytes_pipelined_behind_stls_close_and_are_never_answered(tail: bytes):
    # T03: CVE-2011-0411 class; the injected command never produces a reply.
    conn = connection(STLS_PORT)
    assert feed(conn, b"STLS\r\n" + tail) == [
        Close(b"-ERR Nothing may follow STLS before the TLS handshake.\r\n", "plaintext pipelined after STLS")
    ]
    assert err(TEXT_STLS_PIPELINED) == b"-ERR Nothing may follow STLS before the TLS handshake.\r\n"
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_user_given_before_stls_is_forgotten():
    # T04: RFC 2595 section 4, all state learned in plaintext is discarded.
    conn = connection(Policy(cleartext_trusted=True, stls_available=True))
    assert one(conn, b"USER alice") == Reply(ok())
    assert one(conn, b"UTF8") == Reply(ok(TEXT_UTF8))
    assert one(conn, b"STLS") == StartTls(ok(TEXT_BEGIN_TLS))
    conn.tls_started()
    assert conn.state is State.AUTHORIZATION
    assert conn.utf8 is False
    assert one(conn, b"PASS secret") == Reply(b"-ERR No username given.\r\n", bad_command=True)


def test_capa_after_tls_started_offers_cleartext_logins_and_no_stls():
    # T05, C05
    conn = connection(STLS_PORT)
    assert one(conn, b"CAPA") == Reply(capa_reply(*BASE_CAPS, "STLS"))
    assert one(conn, b"AUTH") == Reply(b"+OK Supported mechanisms follow.\r\n.\r\n")
    one(conn, b"STLS")
    conn.tls_started()
    assert one(conn, b"CAPA") == Reply(capa_reply(*BASE_CAPS, *CLEARTEXT_CAPS))
    assert one(conn, b"AUTH") == Reply(b"+OK Supported mechanisms follow.\r\nPLAIN\r\nLOGIN\r\n.\r\n")
    assert feed(conn, b"USER alice\r\nPASS secret\r\n") == [
        Reply(ok()),
        Credentials("alice", "secret", "USER"),
    ]


def test_tls_started_keeps_the_rest_of_the_policy():
    conn = connection(Policy(stls_available=True, login_delay_seconds=30, implementation="x"))
    conn.tls_started()
    assert conn.policy == Policy(tls_active=True, login_delay_seconds=30, implementation="x")


# --- TRANSACTION argument syntax (X03, X04) -------------------------------------------------


@pytest.mark.parametrize("command", [b"LIST", b"RETR", b"DELE", b"UIDL"])
@pytest.mark.parametrize(
    "argument",
    [
        b"0",
        b"-1",
        b"+1",
        b"abc",
        b"1" * 25,
        b"12345678901",
        b"1.0",
        b"0x1",
        "\u0661".encode(),
        b"1 2",
        b"1 ",
        b" 1",
        b"",
        b"\t1",
    ],
)
def test_bad_message_number_is_a_syntax_error(command: bytes, argument: bytes):
    conn = connection(logged_in=True)
    assert one(conn, command + b" " + argument) == Reply(
        b"-ERR Syntax error in arguments.\r\n", bad_command=True
    )
    assert conn.state is State.TRANSACTION


@pytest.mark.parametrize("line", [b"RETR", b"DELE"])
def test_required_message_number_missing_is_a_syntax_error(line: bytes):
    assert one(connection(logged_in=True), line) == bad(TEXT_SYNTAX)


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"LIST", ListMessages(None)),
        (b"UIDL", Uidl(None)),
        (b"LIST 1", ListMessages(1)),
        (b"LIST 01", ListMessages(1)),  # leading zeros are accepted, as Dovecot does
        (b"UIDL 7", Uidl(7)),
        (b"RETR 9999999999", Retr(9999999999)),  # ten digits parse; the session answers "No such message."
        (b"DELE 3", Dele(3)),
        (b"TOP 1 0", Top(1, 0)),
        (b"TOP 2 10", Top(2, 10)),
        (b"TOP 2 0010", Top(2, 10)),
        (b"NOOP ignored junk", Noop()),  # arguments to NOOP are ignored
        (b"QUIT x", Quit()),  # as are QUIT's (Dovecot)
    ],
)
def test_well_formed_transaction_commands(line: bytes, event: Event):
    assert one(connection(logged_in=True), line) == event


@pytest.mark.parametrize(
    "line",
    [
        b"TOP",
        b"TOP ",
        b"TOP 1",
        b"TOP 1 ",
        b"TOP 1 -1",
        b"TOP 1 x",
        b"TOP 1 +1",
        b"TOP 1 1 x",
        b"TOP 0 1",
        b"TOP -1 1",
        b"TOP abc 1",
        b"TOP 1  1",
        b"TOP 1 " + b"9" * 11,
    ],
)
def test_bad_top_arguments_are_a_syntax_error(line: bytes):
    assert one(connection(logged_in=True), line) == bad(TEXT_SYNTAX)


@pytest.mark.parametrize("line", [b"LIST  1", b"STAT x", b"STAT ", b"RSET x", b"LIST ", b"UIDL "])
def test_junk_or_extra_spaces_are_a_syntax_error(line: bytes):
    # X04: single-space separators (RFC 1939 section 3); "LIST  1" is refused, unlike Dovecot.
    assert one(connection(logged_in=True), line) == bad(TEXT_SYNTAX)


# --- State changes reported by the caller ---------------------------------------------------


def test_login_succeeded_moves_to_transaction_once():
    conn = connection()
    conn.login_succeeded()
    assert conn.state is State.TRANSACTION
    with pytest.raises(LocalProtocolError):
        conn.login_succeeded()


def test_quit_in_transaction_enters_update():
    conn = connection(logged_in=True)
    assert one(conn, b"QUIT") == Quit()
    conn.quit_in_transaction()
    assert conn.state is State.UPDATE


# --- parse_number ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "allow_zero", "value"),
    [
        ("1", False, 1),
        ("42", False, 42),
        ("007", False, 7),
        ("9999999999", False, 9999999999),
        ("0", True, 0),
        ("00", True, 0),
        ("0", False, None),
        ("00", False, None),
        ("", False, None),
        ("", True, None),
        ("12345678901", False, None),
        ("+1", False, None),
        ("-1", True, None),
        (" 1", False, None),
        ("1 ", False, None),
        ("1_000", False, None),
        ("\u0661", False, None),  # ARABIC-INDIC DIGIT ONE: isdigit() but not ASCII
        ("\u00b2", False, None),  # SUPERSCRIPT TWO
        ("abc", False, None),
    ],
)
def test_parse_number(text: str, allow_zero: bool, value: int | None):
    assert parse_number(text, allow_zero=allow_zero) == value


# --- decode_sasl_base64 ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("=", b""),
        ("dXNlcg==", b"user"),
        ("AA==", b"\x00"),
        ("AAA=", b"\x00\x00"),
        ("AAAA", b"\x00\x00\x00"),
        (PLAIN_ALICE, b"\x00alice\x00secret"),
        ("", None),
        ("==", None),
        ("====", None),
        ("A===", None),
        ("=AAA", None),
        ("AA=A", None),
        ("AAA=BBB", None),
        ("AAA=BBBB", None),
        ("AA==AA==", None),
        ("dXNlcg", None),  # missing padding
        ("dXNl cg==", None),
        ("dXNlcg==\n", None),
        ("dX\nNlcg==", None),
        ("dXNl\x00cg==", None),
        ("****", None),
        ("éééé", None),
    ],
)
def test_decode_sasl_base64_is_strict(text: str, value: bytes | None):
    assert decode_sasl_base64(text) == value


@pytest.mark.parametrize("text", ["AAAA====", "dXNlcjEy====", "AAAAAAAA====", "AAAA========"])
def test_decode_sasl_base64_rejects_superfluous_padding(text: str):
    assert decode_sasl_base64(text) is None


# --- parse_plain / encode_plain -------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "value"),
    [
        (b"\x00alice\x00secret", ("alice", "secret")),
        (b"alice\x00alice\x00secret", ("alice", "secret")),
        (b"\x00alice\x00se\xc3\xa7ret", ("alice", "seçret")),
        (b"\x00alice\x00 spaced ", ("alice", " spaced ")),
        (b"bob\x00alice\x00secret", None),
        (b"ALICE\x00alice\x00secret", None),  # authzid must equal authcid exactly
        (b"\x00alice", None),
        (b"alice\x00secret", None),
        (b"", None),
        (b"\x00\x00", None),
        (b"\x00\x00secret", None),
        (b"\x00alice\x00", None),
        (b"\x00alice\x00secret\x00", None),
        (b"\x00\x00alice\x00secret", None),
        (b"\x00al\xffice\x00secret", None),
        (b"\x00alice\x00sec\xffret", None),
        (b"\x00" + b"u" * 255 + b"\x00" + b"p" * 255, ("u" * 255, "p" * 255)),
        (b"u" * 255 + b"\x00" + b"u" * 255 + b"\x00p", ("u" * 255, "p")),
        (b"\x00" + b"u" * 256 + b"\x00p", None),
        (b"\x00u\x00" + b"p" * 256, None),
    ],
)
def test_parse_plain(message: bytes, value: tuple[str, str] | None):
    assert parse_plain(message) == value


def test_encode_plain_has_empty_authzid():
    assert encode_plain("alice", "secret") == "AGFsaWNlAHNlY3JldA=="
    assert encode_plain("jörg", "pw") == base64.b64encode("\x00jörg\x00pw".encode()).decode()


# --- DotStuffer / unstuff -------------------------------------------------------------------


def stuff(*chunks: bytes) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(chunk) for chunk in chunks) + stuffer.finish()


@pytest.mark.parametrize(
    ("chunks", "wire"),
    [
        ([b"a\r\n"], b"a\r\n.\r\n"),
        ([b".\r\n"], b"..\r\n.\r\n"),
        ([b".a\r\n..b\r\n"], b"..a\r\n...b\r\n.\r\n"),
        ([b"a\r\n.\r\nb\r\n"], b"a\r\n..\r\nb\r\n.\r\n"),
        ([b"a.b\r\n a\r\n"], b"a.b\r\n a\r\n.\r\n"),
        ([b"a\r\n", b".b\r\n"], b"a\r\n..b\r\n.\r\n"),  # dot at a chunk boundary after a line end
        ([b"a\r", b"\n.b\r\n"], b"a\r\n..b\r\n.\r\n"),
        ([b"a\r\n.", b"b\r\n"], b"a\r\n..b\r\n.\r\n"),
        ([b"ab", b".c\r\n"], b"ab.c\r\n.\r\n"),  # mid-line dot after a chunk not ending a line
        ([b"a\r\n", b"", b".b\r\n"], b"a\r\n..b\r\n.\r\n"),  # an empty chunk changes nothing
        ([b".", b".", b"\r\n"], b"...\r\n.\r\n"),
        ([b"a\r\n", b".", b"\r\n", b".", b"\r\n"], b"a\r\n..\r\n..\r\n.\r\n"),
        ([], b".\r\n"),
        ([b""], b".\r\n"),
        ([b"no final newline"], b"no final newline\r\n.\r\n"),
        ([b"x\r\n.y"], b"x\r\n..y\r\n.\r\n"),
    ],
)
def test_dot_stuffer(chunks: list[bytes], wire: bytes):
    assert stuff(*chunks) == wire


def test_dot_stuffer_output_per_chunk():
    stuffer = DotStuffer()
    assert stuffer.feed(b"Subject: x\r\n") == b"Subject: x\r\n"
    assert stuffer.feed(b".hidden\r\n.") == b"..hidden\r\n.."
    assert stuffer.feed(b"\r\n") == b"\r\n"
    assert stuffer.finish() == b".\r\n"


@pytest.mark.parametrize(
    ("stuffed", "plain"),
    [
        (b"..a\r\n...b\r\nc\r\n", b".a\r\n..b\r\nc\r\n"),
        (b"..\r\n", b".\r\n"),
        (b"a.b\r\n", b"a.b\r\n"),
        (b"", b""),
        (b"x\r\n..", b"x\r\n."),
    ],
)
def test_unstuff(stuffed: bytes, plain: bytes):
    assert unstuff(stuffed) == plain


# --- TopLimiter -----------------------------------------------------------------------------

MESSAGE = b"Subject: s\r\nX: y\r\n\r\nl1\r\nl2\r\nl3\r\n"
HEADER = b"Subject: s\r\nX: y\r\n\r\n"


def top(message: bytes, header_size: int, lines: int, chunk_size: int) -> tuple[bytes, bool]:
    limiter = TopLimiter(header_size, lines)
    out = b"".join(limiter.feed(message[i : i + chunk_size]) for i in range(0, len(message), chunk_size))
    return out, limiter.done


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 19, 20, 21, 1000])
@pytest.mark.parametrize(
    ("lines", "expected", "done"),
    [
        (0, HEADER, True),
        (1, HEADER + b"l1\r\n", True),
        (2, HEADER + b"l1\r\nl2\r\n", True),
        (3, MESSAGE, True),
        (4, MESSAGE, False),
        (1000, MESSAGE, False),
    ],
)
def test_top_limiter_cuts_after_header_and_k_body_lines(
    chunk_size: int, lines: int, expected: bytes, done: bool
):
    assert top(MESSAGE, len(HEADER), lines, chunk_size) == (expected, done)


def test_top_limiter_stops_emitting_once_done():
    limiter = TopLimiter(len(HEADER), 1)
    assert limiter.feed(MESSAGE) == HEADER + b"l1\r\n"
    assert limiter.done
    assert limiter.feed(b"more\r\n") == b""


def test_top_limiter_with_zero_lines_and_header_ending_a_chunk():
    limiter = TopLimiter(len(HEADER), 0)
    assert limiter.feed(HEADER) == HEADER
    assert limiter.done is False
    assert limiter.feed(b"l1\r\n") == b""
    assert limiter.done is True


@pytest.mark.parametrize("lines", [0, 1, 5])
def test_top_limiter_on_message_without_blank_line_sends_it_whole(lines: int):
    # X07: no header/body separator, so it is all header; no blank line is added.
    message = b"Subject: s\r\nX: y\r\n"
    assert top(message, len(message), lines, 4) == (message, False)


def test_top_limiter_with_empty_header():
    message = b"\r\nbody1\r\nbody2\r\n"
    assert top(message, 2, 1, 3) == (b"\r\nbody1\r\n", True)


def test_top_limiter_counts_a_body_line_split_across_chunks_once():
    limiter = TopLimiter(len(HEADER), 2)
    assert limiter.feed(HEADER + b"l") == HEADER + b"l"
    assert limiter.feed(b"1\r") == b"1\r"
    assert limiter.feed(b"\nl2\r\nl3") == b"\nl2\r\n"
    assert limiter.done
