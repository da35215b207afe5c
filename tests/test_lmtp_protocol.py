"""Transcripts of the LMTP core alone: client bytes in, exact reply bytes and events out.

No socket, no database, no Django: a small stand-in for the server answers RCPT from a fixed
set of mailboxes and "delivers" by recording the message. Every transcript runs with the
client's bytes fed whole, one byte at a time, and in pieces of seven, and must come out the same.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from mailadmin.mailin.lmtp import protocol
from mailadmin.mailin.lmtp.protocol import (
    MAX_COMMAND_LINE,
    NEED_DATA,
    Close,
    Connection,
    LocalProtocolError,
    MessageData,
    MessageEnd,
    MessageRefused,
    Policy,
    RcptTo,
    Reply,
    State,
    recipient_reply,
)
from tests.lmtp_replies import (
    BAD_PARAMETER,
    BYE,
    COMMAND_TOO_LONG,
    GREETING,
    HOSTNAME,
    LHLO_FIRST,
    LHLO_SYNTAX,
    LINE_TOO_LONG,
    MAIL_FIRST,
    MAIL_SYNTAX,
    NO_VALID_RECIPIENTS,
    OK,
    RCPT_SYNTAX,
    RECIPIENT_OK,
    SAVED,
    SENDER_GIVEN,
    SENDER_OK,
    SIZE_SYNTAX,
    START_DATA,
    TOO_BIG,
    TOO_MANY_RECIPIENTS,
    UNKNOWN_COMMAND,
    USE_LHLO,
    USER_UNKNOWN,
    VRFY_REFUSED,
    lhlo_reply,
    wire,
)

MAX_MESSAGE_BYTES = 10_000
MAX_LINE_BYTES = 2000
POLICY = Policy(
    hostname=HOSTNAME,
    max_message_bytes=MAX_MESSAGE_BYTES,
    max_recipients=3,
    max_data_line_bytes=MAX_LINE_BYTES,
)
MAILBOXES = {"alice@example.test", "bob@example.test", "carol@example.test", "dave@example.test"}
SENDER = "sender@remote.test"

# A message as sent (dot-stuffed, one bare-LF line, final dot) and as the core hands it on:
# one leading dot off each stuffed line, line endings untouched (the spooler normalises them).
WIRE_MESSAGE = (
    b"Subject: mixed\r\nFrom: <sender@remote.test>\r\n\r\n"
    b"first line\r\n..leading dot\r\nbare line feed\n...\r\nlast\r\n.\r\n"
)
UNSTUFFED_MESSAGE = (
    b"Subject: mixed\r\nFrom: <sender@remote.test>\r\n\r\n"
    b"first line\r\n.leading dot\r\nbare line feed\n..\r\nlast\r\n"
)


@dataclass
class Transcript:
    output: bytes
    delivered: list[tuple[str, tuple[str, ...], bytes]] = field(default_factory=list)
    size_hints: list[int] = field(default_factory=list)
    data_events: int = 0
    closed: bool = False


def run_transcript(
    client: bytes, piece: int | None, policy: Policy = POLICY, spool_limit: int = 0
) -> Transcript:
    """Drive a Connection as the server does; ``spool_limit`` refuses messages that grow past it."""
    conn: Connection[str] = Connection(policy)
    pieces = [client] if piece is None else [client[i : i + piece] for i in range(0, len(client), piece)]
    pieces.reverse()
    out = [conn.greeting()]
    result = Transcript(b"")
    message = bytearray()
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            if not pieces:
                break
            conn.receive_data(pieces.pop())
        elif isinstance(event, Reply | MessageRefused):
            out.append(event.data)
            message.clear()
        elif isinstance(event, RcptTo):
            result.size_hints.append(event.size_hint)
            if event.address in MAILBOXES:
                out.append(conn.accept_recipient(event.address))
            else:
                out.append(recipient_reply(protocol.REPLY_USER_UNKNOWN, event.address))
        elif isinstance(event, MessageData):
            result.data_events += 1
            message += event.data
            if spool_limit and len(message) > spool_limit:
                conn.refuse_message(protocol.REPLY_TOO_BIG)
        elif isinstance(event, MessageEnd):
            result.delivered.append((event.sender, event.recipients, bytes(message)))
            out.append(b"".join(recipient_reply(protocol.REPLY_DELIVERED, r) for r in event.recipients))
            message.clear()
        elif isinstance(event, Close):
            out.append(event.data)
            result.closed = True
            conn.closed()
            break
    result.output = b"".join(out)
    return result


@pytest.fixture(params=[None, 1, 7], ids=["whole", "bytewise", "pieces-of-7"])
def transcript(request) -> Callable[..., Transcript]:
    return lambda client, **options: run_transcript(client, request.param, **options)


def commands(*lines: str) -> bytes:
    return wire(*lines)


def greeted(*lines: str) -> list[str]:
    """The replies of a session that starts with LHLO: greeting, the LHLO reply, then ``lines``."""
    return [GREETING, *lhlo_reply(MAX_MESSAGE_BYTES), *lines]


# --- Greeting, LHLO, QUIT and the verbs LMTP refuses ------------------------------------------------


def test_greeting_and_lhlo_list_exactly_pipelining_enhanced_codes_8bitmime_and_the_size_limit(transcript):
    result = transcript(commands("LHLO client.test", "QUIT", "NOOP"))
    assert result.output == wire(*greeted(BYE))
    assert result.closed  # nothing after QUIT is read


def test_smtp_greetings_vrfy_unknown_and_non_ascii_verbs_are_refused(transcript):
    result = transcript(
        commands(
            "HELO client.test", "EHLO client.test", "VRFY alice@example.test", "XYZZY", "r\u017fet", "noop"
        )
    )
    assert result.output == wire(
        GREETING, USE_LHLO, USE_LHLO, VRFY_REFUSED, UNKNOWN_COMMAND, UNKNOWN_COMMAND, OK
    )


def test_lhlo_needs_a_host_name(transcript):
    assert transcript(commands("LHLO", "LHLO ")).output == wire(GREETING, LHLO_SYNTAX, LHLO_SYNTAX)


def test_command_lines_are_limited_to_512_octets_with_their_crlf(transcript):
    """RFC 5321 section 4.5.3.1.4; the reply comes once the over-long line has ended."""
    fits = "NOOP " + "n" * (MAX_COMMAND_LINE - len("NOOP ") - 2)
    one_over = fits + "n"
    result = transcript(commands(fits, one_over, "NOOP " + "n" * 600, "NOOP"))
    assert result.output == wire(GREETING, OK, COMMAND_TOO_LONG, COMMAND_TOO_LONG, OK)


def test_an_over_long_command_line_not_yet_ended_gets_no_reply_until_its_line_feed():
    conn: Connection[str] = Connection(POLICY)
    conn.receive_data(b"N" * 5000)
    assert conn.next_event() is NEED_DATA
    assert conn.buffered_bytes == 0  # skipped, not kept
    conn.receive_data(b"NNN\r\nNOOP\r\n")
    assert conn.next_event() == Reply(wire(COMMAND_TOO_LONG))
    assert conn.next_event() == Reply(wire(OK))


# --- The order of commands ----------------------------------------------------------------------


def test_mail_before_lhlo_rcpt_before_mail_and_data_without_a_valid_recipient_get_503(transcript):
    result = transcript(
        commands(
            f"MAIL FROM:<{SENDER}>",
            "RCPT TO:<alice@example.test>",
            "DATA",
            "LHLO client.test",
            "RCPT TO:<alice@example.test>",
            "DATA",
            f"MAIL FROM:<{SENDER}>",
            f"MAIL FROM:<{SENDER}>",
            "RCPT TO:<nobody@example.test>",
            "DATA",
            "RCPT TO:<alice@example.test>",  # the transaction is still open: a good one can be added
            "DATA",
        )
        + WIRE_MESSAGE
        + commands("QUIT")
    )
    assert result.output == wire(
        GREETING,
        LHLO_FIRST,
        MAIL_FIRST,
        MAIL_FIRST,
        *lhlo_reply(MAX_MESSAGE_BYTES),
        MAIL_FIRST,
        MAIL_FIRST,
        SENDER_OK,
        SENDER_GIVEN,
        USER_UNKNOWN.format(rcpt="nobody@example.test"),
        NO_VALID_RECIPIENTS,
        RECIPIENT_OK,
        START_DATA,
        SAVED.format(rcpt="alice@example.test"),
        BYE,
    )
    assert result.delivered == [(SENDER, ("alice@example.test",), UNSTUFFED_MESSAGE)]


def test_rset_forgets_the_recipients_and_noop_changes_nothing(transcript):
    result = transcript(
        commands(
            "RSET",
            "MAIL FROM:<>",  # RSET does not stand in for LHLO
            "LHLO client.test",
            f"MAIL FROM:<{SENDER}>",
            "RCPT TO:<alice@example.test>",
            "RSET",
            "DATA",
            "NOOP",
            f"MAIL FROM:<{SENDER}>",
            "RCPT TO:<bob@example.test>",
            "DATA",
        )
        + WIRE_MESSAGE
        + commands("NOOP", "QUIT")
    )
    assert result.output == wire(
        GREETING,
        OK,
        LHLO_FIRST,
        *lhlo_reply(MAX_MESSAGE_BYTES),
        SENDER_OK,
        RECIPIENT_OK,
        OK,
        MAIL_FIRST,
        OK,
        SENDER_OK,
        RECIPIENT_OK,
        START_DATA,
        SAVED.format(rcpt="bob@example.test"),
        OK,  # the very next line: DATA sent exactly one reply
        BYE,
    )
    assert result.delivered == [(SENDER, ("bob@example.test",), UNSTUFFED_MESSAGE)]


def test_lhlo_in_a_transaction_starts_over(transcript):
    result = transcript(
        commands("LHLO a.test", "MAIL FROM:<>", "RCPT TO:<alice@example.test>", "LHLO b.test", "DATA")
    )
    assert result.output == wire(
        *greeted(SENDER_OK, RECIPIENT_OK, *lhlo_reply(MAX_MESSAGE_BYTES), MAIL_FIRST)
    )


# --- MAIL and RCPT arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mail", "reply", "size_hint"),
    [
        ("MAIL FROM:<>", SENDER_OK, 0),
        (f"mail from: <{SENDER}> BODY=8BITMIME SIZE=5500", SENDER_OK, 5500),
        (f"MAIL FROM:<{SENDER}> body=7bit", SENDER_OK, 0),
        (f"MAIL FROM:<{SENDER}> SIZE={MAX_MESSAGE_BYTES}", SENDER_OK, MAX_MESSAGE_BYTES),
        (f"MAIL FROM:<{SENDER}> SIZE={MAX_MESSAGE_BYTES + 1}", TOO_BIG, None),
        (f"MAIL FROM:<{SENDER}> SMTPUTF8", BAD_PARAMETER, None),
        (f"MAIL FROM:<{SENDER}> BODY=BINARYMIME", BAD_PARAMETER, None),
        (f"MAIL FROM:{SENDER}", MAIL_SYNTAX, None),
        (f"MAIL TO:<{SENDER}>", MAIL_SYNTAX, None),
        ("MAIL FROM:<a\rb@remote.test>", MAIL_SYNTAX, None),
        ("MAIL FROM:<s\x00x@remote.test>", MAIL_SYNTAX, None),
        (f"MAIL FROM:<{SENDER}> SIZE=\u00b2", SIZE_SYNTAX, None),  # "²".isdigit(), and int() takes "٣"
        (f"MAIL FROM:<{SENDER}> SIZE=\u0663", SIZE_SYNTAX, None),
        (f"MAIL FROM:<{SENDER}> SIZE=", SIZE_SYNTAX, None),
        (f"MAIL FROM:<{SENDER}> SIZE=+5", SIZE_SYNTAX, None),
        (f"MAIL FROM:<{SENDER}> SIZE=1_000", SIZE_SYNTAX, None),
        (f"MAIL FROM:<{SENDER}> SIZE=" + "0" * 20 + "1", SIZE_SYNTAX, None),  # RFC 1870: 1*20DIGIT
        (f"MAIL FROM:<{SENDER}> SIZE=" + "0" * 19 + "1", SENDER_OK, 1),
        (f"MAIL FROM:<{SENDER}> SIZE=" + "9" * 20, TOO_BIG, None),
    ],
)
def test_mail_from_its_parameters_and_the_size_passed_on_to_rcpt(transcript, mail, reply, size_hint):
    result = transcript(commands("LHLO client.test", mail, "RCPT TO:<alice@example.test>"))
    after = RECIPIENT_OK if reply == SENDER_OK else MAIL_FIRST
    assert result.output == wire(*greeted(reply, after))
    assert result.size_hints == ([] if size_hint is None else [size_hint])


@pytest.mark.parametrize(
    "rcpt",
    [
        "RCPT TO:alice@example.test",
        "RCPT FROM:<alice@example.test>",
        "RCPT TO:<alice@example.test> NOTIFY=NEVER",
    ],
)
def test_rcpt_syntax_errors_get_501(transcript, rcpt):
    result = transcript(commands("LHLO client.test", "MAIL FROM:<>", rcpt, "DATA"))
    assert result.output == wire(*greeted(SENDER_OK, RCPT_SYNTAX, NO_VALID_RECIPIENTS))


def test_a_control_character_in_an_address_never_reaches_a_reply(transcript):
    result = transcript(commands("LHLO client.test", "MAIL FROM:<>") + b"RCPT TO:<a\rb@example.test>\r\n")
    assert result.output == wire(*greeted(SENDER_OK, RCPT_SYNTAX))


def test_recipients_beyond_the_limit_get_452_and_the_accepted_ones_are_delivered(transcript):
    recipients = ["alice@example.test", "bob@example.test", "carol@example.test", "dave@example.test"]
    result = transcript(
        commands("LHLO client.test", f"MAIL FROM:<{SENDER}>", *[f"RCPT TO:<{r}>" for r in recipients], "DATA")
        + WIRE_MESSAGE
    )
    assert result.output == wire(
        *greeted(
            SENDER_OK,
            RECIPIENT_OK,
            RECIPIENT_OK,
            RECIPIENT_OK,
            TOO_MANY_RECIPIENTS,
            START_DATA,
            *[SAVED.format(rcpt=r) for r in recipients[:3]],
        )
    )
    assert [recipients for _, recipients, _ in result.delivered] == [tuple(recipients[:3])]


# --- The message: dot-unstuffing, the final dot, limits --------------------------------------------


def one_message(message: bytes, recipients: tuple[str, ...] = ("alice@example.test",)) -> bytes:
    return (
        commands("LHLO client.test", f"MAIL FROM:<{SENDER}>", *[f"RCPT TO:<{r}>" for r in recipients], "DATA")
        + message
    )


def replies_for(recipients: tuple[str, ...], after_data: list[str]) -> bytes:
    return wire(*greeted(SENDER_OK, *[RECIPIENT_OK] * len(recipients), START_DATA, *after_data))


@pytest.mark.parametrize(
    ("sent", "handed_on"),
    [
        (WIRE_MESSAGE, UNSTUFFED_MESSAGE),
        (b"..first line stuffed\r\n.\r\n", b".first line stuffed\r\n"),
        (b".\r\n", b""),  # an empty message
        (b"bare\n.\n", b"bare\n"),  # a final dot with a bare LF
        (b"a\r\n.x\r\n. \r\n.\r\n", b"a\r\nx\r\n \r\n"),  # RFC 5321 s. 4.5.2: any leading dot goes
        (b"not the end:\r\n.\rx\r\n.\r\n", b"not the end:\r\n\rx\r\n"),
    ],
    ids=["stuffed", "first-line", "empty", "bare-lf", "unstuffed-not-unescaped", "dot-cr"],
)
def test_the_message_is_handed_on_unstuffed_up_to_the_final_dot(transcript, sent, handed_on):
    result = transcript(one_message(sent) + commands("NOOP"))
    assert result.output == replies_for(
        ("alice@example.test",), [SAVED.format(rcpt="alice@example.test"), OK]
    )
    assert result.delivered == [(SENDER, ("alice@example.test",), handed_on)]


def test_lines_are_handed_on_once_per_read_not_one_by_one():
    body = b"".join(b"line %d\r\n" % n for n in range(100))
    result = run_transcript(one_message(body + b".\r\n"), piece=None)
    assert result.delivered == [(SENDER, ("alice@example.test",), body)]
    assert result.data_events == 1


def test_an_over_long_line_refuses_the_message_for_every_recipient_and_the_session_goes_on(transcript):
    recipients = ("alice@example.test", "bob@example.test", "carol@example.test")
    head = b"Subject: lines\r\n\r\nbefore\r\n"
    at_the_limit = b"a" * (MAX_LINE_BYTES - 2) + b"\r\n"
    for line in (b"h" * 100_000 + b"\r\n", b"o" * (MAX_LINE_BYTES - 1) + b"\r\n"):
        client = one_message(head + line + b"after\r\n.\r\n", recipients) + commands("NOOP")
        result = transcript(client)
        assert result.output == replies_for(recipients, [LINE_TOO_LONG] * 3 + [OK])
        assert result.delivered == []
    result = transcript(one_message(head + at_the_limit + b"after\r\n.\r\n", recipients))
    assert result.output == replies_for(recipients, [SAVED.format(rcpt=r) for r in recipients])
    assert result.delivered == [(SENDER, recipients, head + at_the_limit + b"after\r\n")]


def test_an_over_long_last_line_is_refused_without_waiting_for_its_end():
    conn: Connection[str] = Connection(POLICY)
    conn.receive_data(one_message(b""))
    while conn.state is not State.DATA:
        event = conn.next_event()
        if isinstance(event, RcptTo):
            conn.accept_recipient(event.address)
    conn.receive_data(b"x" * (MAX_LINE_BYTES * 10))
    assert conn.next_event() is NEED_DATA
    assert conn.buffered_bytes == 0  # nothing of the line is kept
    conn.receive_data(b"\r\n.\r\n")
    assert conn.next_event() == MessageRefused(
        wire(LINE_TOO_LONG), protocol.REPLY_LINE_TOO_LONG, ("alice@example.test",)
    )


def test_a_message_the_server_refuses_mid_way_gets_one_reply_per_recipient_and_the_session_goes_on(
    transcript,
):
    recipients = ("alice@example.test", "bob@example.test", "carol@example.test")
    big = b"".join(b"%05d" % n + b"y" * 73 + b"\r\n" for n in range(200))  # 16,000 bytes
    result = transcript(
        one_message(big + b".\r\n", recipients)
        + one_message(b"small\r\n.\r\n")[len(wire("LHLO client.test")) :],
        spool_limit=10_000,
    )
    assert result.output == wire(
        *greeted(SENDER_OK, *[RECIPIENT_OK] * 3, START_DATA, *[TOO_BIG] * 3),
        SENDER_OK,
        RECIPIENT_OK,
        START_DATA,
        SAVED.format(rcpt="alice@example.test"),
    )
    assert result.delivered == [(SENDER, ("alice@example.test",), b"small\r\n")]


def test_pipelined_commands_and_message_are_answered_in_order(transcript):
    recipients = ("alice@example.test", "bob@example.test", "carol@example.test")
    client = (
        b"LHLO client.test\r\nMAIL FROM:<> BODY=8BITMIME\r\n"
        + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in recipients)
        + b"DATA\r\n"
        + WIRE_MESSAGE
        + b"QUIT\r\n"
    )
    result = transcript(client)
    assert result.output == wire(
        *greeted(SENDER_OK, *[RECIPIENT_OK] * 3, START_DATA, *[SAVED.format(rcpt=r) for r in recipients], BYE)
    )
    assert result.delivered == [("", recipients, UNSTUFFED_MESSAGE)]


# --- Misuse by the caller ------------------------------------------------------------------------------


def test_the_caller_cannot_accept_a_recipient_outside_a_transaction_or_read_after_close():
    conn: Connection[str] = Connection(POLICY)
    with pytest.raises(LocalProtocolError):
        conn.accept_recipient("alice@example.test")
    with pytest.raises(LocalProtocolError):
        conn.refuse_message(protocol.REPLY_TOO_BIG)
    conn.receive_data(b"QUIT\r\n")
    assert conn.next_event() == Close(wire(BYE))
    with pytest.raises(LocalProtocolError):
        conn.next_event()
