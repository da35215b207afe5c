"""Property tests of the sans-IO core: the line parser, SASL decoding and dot-stuffing."""

import base64
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from pop3.protocol import (
    MAX_REPLY_LINE,
    NEED_DATA,
    AuthRejected,
    Close,
    Connection,
    Credentials,
    DotStuffer,
    Event,
    Policy,
    Quit,
    Reply,
    StartTls,
    State,
    decode_sasl_base64,
    encode_plain,
    multiline,
    parse_plain,
    size_listing,
    unstuff,
)

MODEST = settings(max_examples=200, deadline=None)

# Lines that steer the connection through its states and SASL exchanges, mixed with noise.
VOCABULARY = [
    b"USER alice",
    b"PASS secret",
    b"STAT",
    b"LIST",
    b"LIST 1",
    b"UIDL 2",
    b"RETR 1",
    b"TOP 1 0",
    b"DELE 1",
    b"RSET",
    b"NOOP",
    b"CAPA",
    b"UTF8",
    b"STLS",
    b"APOP a b",
    b"AUTH",
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"AUTH PLAIN AGFsaWNlAHNlY3JldA==",
    b"AGFsaWNlAHNlY3JldA==",
    b"YWxpY2U=",
    b"*",
    b"=",
    b"",
    b"QUIT",
    b"LIST \x00",
    b"NOOP\r",
    b"\xff\xfe",
    b"A" * 1100,
    b"A" * 2100,
    b"A" * 8200,
]
ENDINGS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""]
OPENINGS = [b"", b"USER alice\r\nPASS secret\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n"]

lines = st.one_of(st.sampled_from(VOCABULARY), st.sampled_from(VOCABULARY), st.binary(max_size=40))
dialogue = st.tuples(
    st.sampled_from(OPENINGS), st.lists(st.tuples(lines, st.sampled_from(ENDINGS)), max_size=25)
).map(lambda parts: parts[0] + b"".join(line + ending for line, ending in parts[1]))
client_input = st.one_of(dialogue, dialogue, st.binary(max_size=3000))


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points (empty pieces included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def input_and_split(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    data = draw(client_input)
    return data, draw(split(data))


def drive(chunks: list[bytes], policy: Policy) -> list[Event]:
    """Run a connection as a session would: every login succeeds, STLS is honoured, QUIT ends it."""
    conn = Connection(policy)
    events: list[Event] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, (Close, Quit)):
                return events
            if isinstance(event, Credentials):
                conn.login_succeeded()
            elif isinstance(event, StartTls):
                assert conn.buffered_bytes == 0  # T03: nothing plaintext may cross the upgrade
                conn.tls_started()
    assert conn.state in (State.AUTHORIZATION, State.TRANSACTION)
    return events


def reply_bytes(event: Event) -> bytes:
    return event.data if isinstance(event, (Reply, Close, StartTls)) else b""


def assert_clean_reply(data: bytes) -> None:
    """CRLF-terminated lines of at most 512 octets, printable ASCII only (G08, G09)."""
    if not data:
        return
    assert data.endswith(b"\r\n")
    for line in data[:-2].split(b"\r\n"):
        assert len(line) + 2 <= MAX_REPLY_LINE
        assert all(0x20 <= octet <= 0x7E for octet in line), line


# --- (a) the line parser --------------------------------------------------------------------


# The one-number commands, which Connection._command parses from the bytes, and what could
# make a line of them differ from its general path.
NUMBERED_KEYWORDS = [b"LIST", b"list", b"UiDl", b"RETR", b"DELE", b"dele", b"TOP", b"STAT", b"LIS"]
NUMBERED_KEYWORDS += ["\u017ftat".encode(), "l\u0131st".encode()]  # long s, dotless i: upper() to ASCII
# Full-width 5, Arabic-Indic 3 and a superscript 2 are digits to str.isdigit(), not to parse_number.
UNICODE_DIGITS = ["\uff15".encode(), "\u0663".encode(), "\u00b2".encode()]
NUMBERED_ARGUMENTS = [
    *(b"1", b"7", b"07", b"0", b"00", b"4294967295", b"12345678901"),
    *(b"", b" 1", b"1 ", b"1 2", b"\x00", b"-1", b"+1", b"\xb2"),
    *UNICODE_DIGITS,
]
numbered_line = st.tuples(
    st.sampled_from(NUMBERED_KEYWORDS),
    st.sampled_from([b" ", b" ", b"  ", b"", b"\t"]),
    st.one_of(st.sampled_from(NUMBERED_ARGUMENTS), st.binary(max_size=12)),
).map(b"".join)


@MODEST
@given(
    st.lists(numbered_line, min_size=1, max_size=30),
    st.booleans(),
)
def test_the_one_number_commands_parse_as_the_general_path_does(commands: list[bytes], logged_in: bool):
    fast, general = Connection(Policy(cleartext_trusted=True)), Connection(Policy(cleartext_trusted=True))
    if logged_in:
        fast.login_succeeded()
        general.login_succeeded()
    for line in commands:
        if State.CLOSED in (fast.state, general.state):
            break
        assert fast._command(line) == general._parsed_command(line), line
        assert (fast.state, fast._bad_commands) == (general.state, general._bad_commands)


@MODEST
@given(input_and_split())
def test_events_do_not_depend_on_how_input_is_split(case: tuple[bytes, list[bytes]]):
    data, chunks = case
    policy = Policy(cleartext_trusted=True)
    assert drive(chunks, policy) == drive([data], policy)


@MODEST
@given(
    input_and_split(), st.sampled_from([Policy(), Policy(cleartext_trusted=True), Policy(tls_active=True)])
)
def test_replies_are_short_printable_and_never_echo_control_bytes(
    case: tuple[bytes, list[bytes]], policy: Policy
):
    _, chunks = case
    for event in drive(chunks, policy):
        assert_clean_reply(reply_bytes(event))


@MODEST
@given(input_and_split())
def test_stls_never_carries_buffered_plaintext_into_tls(case: tuple[bytes, list[bytes]]):
    # drive() asserts the buffer is empty at every StartTls; here STLS is on offer.
    _, chunks = case
    for event in drive(chunks, Policy(stls_available=True)):
        assert_clean_reply(reply_bytes(event))


@MODEST
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_buffer_never_grows_past_the_line_limit_without_closing(chunks: list[bytes]):
    conn = Connection(Policy(cleartext_trusted=True))
    for chunk in chunks:
        conn.receive_data(chunk)
        while conn.state is not State.CLOSED:
            event = conn.next_event()
            if event is NEED_DATA:
                assert conn.buffered_bytes < 8192
                break
            if isinstance(event, Credentials):
                conn.login_succeeded()
            if isinstance(event, Quit):
                return
        if conn.state is State.CLOSED:
            return


# --- (b) SASL -------------------------------------------------------------------------------


@MODEST
@given(st.binary(min_size=1))
def test_sasl_base64_round_trip(data: bytes):
    assert decode_sasl_base64(base64.b64encode(data).decode()) == data


def test_sasl_empty_response_is_a_single_equals_sign():
    assert decode_sasl_base64("=") == b""


sasl_field = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1
).filter(lambda text: len(text.encode()) <= 255)


@MODEST
@given(sasl_field, sasl_field)
def test_plain_round_trip(username: str, password: str):
    assert parse_plain(base64.b64decode(encode_plain(username, password))) == (username, password)
    assert parse_plain(f"{username}\x00{username}\x00{password}".encode()) == (username, password)


@MODEST
@given(st.text(st.characters(max_codepoint=127)))
def test_random_ascii_never_crashes_the_decoder(text: str):
    result = decode_sasl_base64(text)
    assert result is None or isinstance(result, bytes)


@MODEST
@given(st.text(st.characters(max_codepoint=127, blacklist_characters="\r\n"), max_size=400))
def test_random_ascii_sasl_continuation_is_answered_as_a_login(text: str):
    for mechanism in (b"PLAIN", b"LOGIN"):
        conn = Connection(Policy(cleartext_trusted=True))
        conn.receive_data(b"AUTH " + mechanism + b"\r\n" + text.encode() + b"\r\n")
        conn.next_event()
        event = conn.next_event()
        assert isinstance(event, (AuthRejected, Credentials, Reply)), event
        assert_clean_reply(reply_bytes(event))


# --- (c) dot-stuffing -----------------------------------------------------------------------

message_line = st.one_of(
    st.sampled_from([b".", b"..", b".x", b"", b"a.b", b"...", b". "]),
    st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
messages = st.lists(message_line, max_size=20).map(lambda ls: b"".join(line + b"\r\n" for line in ls))


@st.composite
def message_and_split(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    message = draw(messages)
    return message, draw(split(message))


def stuff(chunks: list[bytes]) -> tuple[bytes, bytes]:
    """(stuffed body, terminator) of a message fed in ``chunks``."""
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(chunk) for chunk in chunks), stuffer.finish()


@MODEST
@given(message_and_split())
def test_dot_stuffing_round_trips_whatever_the_chunking(case: tuple[bytes, list[bytes]]):
    message, chunks = case
    body, terminator = stuff(chunks)
    assert terminator == b".\r\n"
    assert unstuff(body) == message
    assert (body, terminator) == stuff([message])


@MODEST
@given(message_and_split())
def test_stuffed_body_has_no_premature_terminator(case: tuple[bytes, list[bytes]]):
    message, chunks = case
    body, terminator = stuff(chunks)
    wire_lines = (body + terminator).split(b"\r\n")
    assert wire_lines[-2:] == [b".", b""]
    for line in wire_lines[:-2]:
        assert not line.startswith(b".") or line.startswith(b"..")
    # A client (poplib) un-stuffing the lines gets the stored octets, so the LIST size holds (G12).
    assert len(message) == len(body) - sum(1 for line in wire_lines[:-2] if line.startswith(b"."))


@given(st.lists(st.tuples(st.integers(1, 10**6), st.integers(0, 10**12)), max_size=50), st.text(max_size=20))
def test_size_listing_is_the_multiline_reply_of_the_same_lines(pairs: list[tuple[int, int]], first: str):
    first = first.replace("\r", "").replace("\n", "")
    assert size_listing(first, pairs) == multiline(first, [f"{n} {size}" for n, size in pairs])
