"""Turning an incoming byte stream into a stored-message candidate, without holding it in memory.

A message is stored exactly as POP3 will send it before dot-stuffing: every line ends in CRLF
(bare LF and bare CR become CRLF), and a non-empty message always ends in CRLF. Normalising
while spooling makes the stored size the exact octet count that LIST and STAT report.
"""

import email.header
import email.parser
import email.policy
import functools
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from django.conf import settings

READ_SIZE = 64 * 1024


class MessageTooLarge(Exception):
    """The message exceeds the configured maximum size; nothing was stored."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"message exceeds the maximum size of {limit_bytes} bytes")
        self.limit_bytes = limit_bytes


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class CrlfNormaliser:
    """Incremental line-ending normaliser: feed() pieces, then finish() once.

    A CR at the end of a piece is held back, since it may be the first half of a CRLF split
    across two reads.
    """

    def __init__(self) -> None:
        self._held_cr = False
        self._ends_with_crlf = True  # vacuously: an empty message stays empty
        self._empty = True

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if data.endswith(b"\r"):
            self._held_cr = True
            data = data[:-1]
        if not data:
            return b""
        out = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        self._empty = False
        self._ends_with_crlf = out.endswith(b"\r\n")
        return out

    def finish(self) -> bytes:
        if self._held_cr:
            self._held_cr = False
            self._empty = False
            self._ends_with_crlf = True
            return b"\r\n"
        if self._empty or self._ends_with_crlf:
            return b""
        self._ends_with_crlf = True
        return b"\r\n"


def normalise(data: bytes) -> bytes:
    """Normalise a whole (small) message at once."""
    normaliser = CrlfNormaliser()
    return normaliser.feed(data) + normaliser.finish()


class HeaderScanner:
    """Finds where the header block ends (the first empty line) in normalised pieces."""

    def __init__(self, cache_limit: int) -> None:
        self._cache_limit = cache_limit
        self._cached = bytearray()
        self._seen = 0
        self._tail = b""
        self.header_size: int | None = None

    def feed(self, data: bytes) -> None:
        if self.header_size is not None or not data:
            return
        if self._seen == 0 and data.startswith(b"\r\n"):
            self._finish_at(2, data)
            return
        window = self._tail + data
        position = window.find(b"\r\n\r\n")
        if position >= 0:
            self._finish_at(self._seen - len(self._tail) + position + 4, data)
            return
        self._cache(data)
        self._seen += len(data)
        self._tail = window[-3:]

    def _finish_at(self, header_size: int, data: bytes) -> None:
        self._cache(data[: header_size - self._seen])
        self._seen = header_size
        self.header_size = header_size

    def _cache(self, data: bytes) -> None:
        room = self._cache_limit - len(self._cached)
        if room > 0:
            self._cached += data[:room]

    def result(self, total_size: int) -> tuple[bytes, int]:
        """(cached header bytes, full header size); a message without an empty line is all header."""
        header_size = self.header_size if self.header_size is not None else total_size
        return bytes(self._cached[:header_size]), header_size


@dataclass(frozen=True)
class HeaderSummary:
    subject: str
    from_header: str


def summarise_headers(header_block: bytes) -> HeaderSummary:
    """Decoded Subject and From for listings, each on one line; never raises on malformed input.

    The compat32 parser and ``decode_header`` on just these two fields: the default policy
    builds a structured header object for every field, which costs ten times as much on
    every delivery. Raw 8-bit values (RFC 6532) are taken as UTF-8.
    """
    try:
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(header_block)
        subject, from_header = _decoded(parsed.get("Subject")), _decoded(parsed.get("From"))
    except Exception:  # noqa: BLE001 - a summary must never stop a delivery
        return HeaderSummary("", "")
    return HeaderSummary(_one_line(subject), _one_line(from_header))


def _decoded(value: str | email.header.Header | None) -> str:
    """RFC 2047 encoded words decoded; the value as it stands when they do not decode."""
    if value is None:
        return ""
    try:
        parts = email.header.decode_header(value)
    except Exception:  # noqa: BLE001 - e.g. broken base64 in an encoded word
        return str(value)
    return "".join(part if isinstance(part, str) else _text(part, charset) for part, charset in parts)


def _text(data: bytes, charset: str | None) -> str:
    try:
        return data.decode(charset if charset and charset != "unknown-8bit" else "utf-8", "replace")
    except (LookupError, UnicodeError):  # a charset Python does not know, or one that cannot replace
        return data.decode("utf-8", "replace")


def _one_line(text: str) -> str:
    return " ".join(text.split())


class SpooledMessage:
    """A normalised message spooled to memory (up to one chunk) or to a temporary file.

    Use as a context manager; ``chunks()`` may be read any number of times, once per recipient.
    """

    def __init__(self, spool: BinaryIO, size_bytes: int, headers: bytes, header_size_bytes: int) -> None:
        self._spool = spool
        self.size_bytes = size_bytes
        self.headers = headers
        self.header_size_bytes = header_size_bytes

    @functools.cached_property
    def summary(self) -> HeaderSummary:
        """Parsed on first use: on a database thread, or for runlmtp's lone copies on PostgreSQL
        on its event loop (headers held in memory, at most ``MAILADMIN_HEADER_CACHE_BYTES``)."""
        return summarise_headers(self.headers)

    def chunks(self, chunk_size: int) -> Iterator[bytes]:
        self._spool.seek(0)
        while piece := self._spool.read(chunk_size):
            yield piece

    def close(self) -> None:
        self._spool.close()

    def __enter__(self) -> "SpooledMessage":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _pieces(source: Readable | Iterable[bytes]) -> Iterator[bytes]:
    if hasattr(source, "read"):
        while piece := source.read(READ_SIZE):
            yield piece
    else:
        yield from source


class MessageSpooler:
    """Incremental form of :func:`spool_message`, for callers that receive the message in pieces.

    ``write()`` raises MessageTooLarge once the normalised size passes the limit; after that
    the spooler must be closed and dropped.
    """

    def __init__(self, max_size_bytes: int | None = None) -> None:
        self.limit = settings.MAILADMIN_MAX_MESSAGE_SIZE_BYTES if max_size_bytes is None else max_size_bytes
        self.size = 0
        self._spool = tempfile.SpooledTemporaryFile(max_size=settings.MAILADMIN_CHUNK_SIZE_BYTES)
        self._normaliser = CrlfNormaliser()
        self._scanner = HeaderScanner(settings.MAILADMIN_HEADER_CACHE_BYTES)

    def write(self, data: bytes) -> None:
        self._append(self._normaliser.feed(data))

    def finish(self) -> SpooledMessage:
        self._append(self._normaliser.finish())
        headers, header_size = self._scanner.result(self.size)
        return SpooledMessage(self._spool, self.size, headers, header_size)

    def close(self) -> None:
        self._spool.close()

    def _append(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.size > self.limit:
            raise MessageTooLarge(self.limit)
        self._scanner.feed(data)
        self._spool.write(data)


def spool_message(source: Readable | Iterable[bytes], max_size_bytes: int | None = None) -> SpooledMessage:
    """Read ``source`` (a binary file or an iterable of bytes) into a normalised spool.

    Raises MessageTooLarge as soon as the normalised size passes ``max_size_bytes`` (default:
    the MAILADMIN_MAX_MESSAGE_SIZE_BYTES setting); the rest of the source is left unread.
    """
    spooler = MessageSpooler(max_size_bytes)
    try:
        for piece in _pieces(source):
            spooler.write(piece)
        return spooler.finish()
    except BaseException:
        spooler.close()
        raise
