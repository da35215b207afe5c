"""LMTP replies exactly as an MTA reads them: what the transcripts and the socket tests expect.

Written out here rather than imported from the server, so a changed reply text fails a test.
"""

HOSTNAME = "lmtp.test"
DEFAULT_MAX_MESSAGE_BYTES = 50 * 1024 * 1024

GREETING = f"220 {HOSTNAME} LMTP ready"
USE_LHLO = "500 5.5.1 This is LMTP: use LHLO"
VRFY_REFUSED = "502 5.5.1 VRFY is not supported"
UNKNOWN_COMMAND = "500 5.5.1 Unknown command"
LHLO_SYNTAX = "501 5.5.4 LHLO needs a host name"
MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address>"
RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address>"
SIZE_SYNTAX = "501 5.5.4 Syntax: SIZE=<number of octets>"
BAD_PARAMETER = "555 5.5.4 Unsupported MAIL parameter"
LHLO_FIRST = "503 5.5.1 Send LHLO first"
SENDER_GIVEN = "503 5.5.1 Sender already given"
MAIL_FIRST = "503 5.5.1 Send MAIL first"
NO_VALID_RECIPIENTS = "503 5.5.1 No valid recipients"
SENDER_OK = "250 2.1.0 Ok"
RECIPIENT_OK = "250 2.1.5 Ok"
OK = "250 2.0.0 Ok"
BYE = "221 2.0.0 Bye"
START_DATA = "354 2.0.0 End data with <CR><LF>.<CR><LF>"
SAVED = "250 2.0.0 <{rcpt}> Saved"
USER_UNKNOWN = "550 5.1.1 <{rcpt}> User unknown"
MAILBOX_DISABLED = "550 5.2.1 <{rcpt}> Mailbox disabled"
FULL_TEMPORARY = "452 4.2.2 <{rcpt}> Mailbox is full"
FULL_PERMANENT = "552 5.2.2 <{rcpt}> Mailbox is full"
TEMPORARY_FAILURE = "451 4.3.0 <{rcpt}> Temporary internal failure"
TOO_BIG = "552 5.3.4 Message too big for system"
LINE_TOO_LONG = "500 5.5.2 Message line too long"
DATABASE_DOWN = "451 4.3.0 Temporary internal failure"
SHUTTING_DOWN = "421 4.3.2 Shutting down"
IDLE_TOO_LONG = "421 4.4.2 Idle for too long, closing connection"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
COMMAND_TOO_LONG = "500 5.5.2 Line too long"


def lhlo_reply(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[str]:
    return [
        f"250-{HOSTNAME}",
        "250-PIPELINING",
        "250-ENHANCEDSTATUSCODES",
        "250-8BITMIME",
        f"250 SIZE {max_message_bytes}",
    ]


def wire(*lines: str) -> bytes:
    """Reply (or command) lines as they travel, each with its CRLF."""
    return "".join(line + "\r\n" for line in lines).encode()
