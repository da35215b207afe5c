"""Reading and writing mail files: mboxrd and Maildir (with Dovecot's ``dovecot-uidlist``).

Pure file handling, no database. Readers stream: an mbox is read line by line (long lines in
bounded fragments) and a message's content is handed out as an iterator of byte pieces, so
neither a whole mbox nor a whole message is ever held in memory.

mboxrd (https://www.loc.gov/preservation/digital/formats/fdd/fdd000385.shtml): each message
starts with a ``From <sender> <asctime date>`` line and ends with one empty separator line;
content lines matching ``^>*From `` carry one extra ``>``.
"""

import email.utils
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

# Longest fragment of a line read at once; longer lines are read (and passed on) in pieces.
LINE_FRAGMENT_BYTES = 64 * 1024
# Enough for any real envelope sender and date; the rest of a longer From line is ignored.
MAX_FROM_LINE_BYTES = 4096
NULL_SENDER = "MAILER-DAEMON"
UIDLIST_NAME = "dovecot-uidlist"
MAILDIR_INFO_SEPARATOR = ":2,"

_QUOTED_FROM = re.compile(rb">+From ")
_FROM_TO_QUOTE = re.compile(rb"(?m)^(>*From )")
# A line start that may still turn into ``>*From `` once more bytes arrive.
_PARTIAL_FROM = re.compile(rb">*(?:F(?:r(?:o(?:m)?)?)?)?")
_BLANK_LINES = (b"\n", b"\r\n")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class MailFileError(Exception):
    """A mail file or folder that cannot be read; the message names it and is fit to show as is."""


# --- mboxrd reading --------------------------------------------------------------------------


@dataclass(frozen=True)
class MboxMessage:
    """One message of an mbox; ``content`` can be read only until the next message is asked for."""

    envelope_sender: str
    received_at: datetime | None
    line_number: int
    content: Iterator[bytes]


class _LineReader:
    """Lines of a binary stream, each as a first fragment plus the rest of the line on demand."""

    def __init__(self, stream: BinaryIO, fragment_bytes: int) -> None:
        self._stream = stream
        self._fragment_bytes = fragment_bytes
        self._in_line = False
        self.line_number = 0

    def next_line(self) -> bytes:
        """The first fragment of the next line (skipping what is left of this one); b"" at the end.

        The fragment is long enough to tell a blank line, a ``From `` line and a quoted one apart.
        """
        for _ in self.rest_of_line():
            pass
        self.line_number += 1
        line = self._fragment()
        while self._in_line and (line == b"\r" or _PARTIAL_FROM.fullmatch(line)):
            line += self._fragment()
        return line

    def rest_of_line(self) -> Iterator[bytes]:
        while self._in_line:
            yield self._fragment()

    def _fragment(self) -> bytes:
        data = self._stream.readline(self._fragment_bytes)
        self._in_line = bool(data) and not data.endswith(b"\n")
        return data


class _MboxBody:
    """The content of one mbox message, read up to the next ``From `` line or the end of file."""

    def __init__(self, lines: _LineReader) -> None:
        self._lines = lines
        self.finished = False
        self.next_from_line: bytes | None = None

    def pieces(self) -> Iterator[bytes]:
        held_blank: bytes | None = None  # the separator, if the next line starts a message
        while not self.finished:
            line = self._lines.next_line()
            if not line or line.startswith(b"From "):
                self.next_from_line = line or None
                self.finished = True
                return
            if held_blank is not None:
                yield held_blank
                held_blank = None
            if line in _BLANK_LINES:
                held_blank = line
                continue
            yield line[1:] if _QUOTED_FROM.match(line) else line
            yield from self._lines.rest_of_line()

    def skip_rest(self) -> None:
        for _ in self.pieces():
            pass


def read_mbox(stream: BinaryIO, *, fragment_bytes: int = LINE_FRAGMENT_BYTES) -> Iterator[MboxMessage]:
    """The messages of an mboxrd file, in file order.

    Raises MailFileError when the first non-empty line is not a ``From `` line. Content that a
    caller leaves unread is skipped.
    """
    lines = _LineReader(stream, fragment_bytes)
    from_line = _first_from_line(lines)
    while from_line is not None:
        line_number = lines.line_number
        sender, received_at = parse_from_line(_whole_from_line(from_line, lines))
        body = _MboxBody(lines)
        yield MboxMessage(sender, received_at, line_number, body.pieces())
        body.skip_rest()
        from_line = body.next_from_line


def _whole_from_line(first_fragment: bytes, lines: _LineReader) -> bytes:
    line = bytearray(first_fragment)
    for fragment in lines.rest_of_line():
        line += fragment[: max(0, MAX_FROM_LINE_BYTES - len(line))]
    return bytes(line)


def _first_from_line(lines: _LineReader) -> bytes | None:
    while (line := lines.next_line()) in _BLANK_LINES:
        pass
    if line and not line.startswith(b"From "):
        raise MailFileError(f"line {lines.line_number}: not an mbox file (expected a line starting 'From ')")
    return line or None


def parse_from_line(line: bytes) -> tuple[str, datetime | None]:
    """(envelope sender, date) of a ``From `` line; the null sender is ""; None for an unreadable date."""
    text = line.decode("utf-8", "replace").removeprefix("From ").strip()
    sender, _, date_text = text.partition(" ")
    return ("" if sender == NULL_SENDER else sender), _parse_date(date_text)


def _parse_date(text: str) -> datetime | None:
    """asctime (``Sat Jan  3 01:05:34 1996``, taken as UTC) or an RFC 5322 date."""
    parsed = email.utils.parsedate_tz(text)
    if parsed is None:
        return None
    try:
        return datetime(*parsed[:6], tzinfo=UTC) - timedelta(seconds=parsed[9] or 0)
    except (ValueError, OverflowError):
        return None


# --- mboxrd writing --------------------------------------------------------------------------


def format_from_line(sender: str, received_at: datetime) -> bytes:
    """``From <sender> <asctime in UTC>``; the sender is kept to one word, locale plays no part."""
    word = "".join(c for c in sender if c.isprintable() and not c.isspace()) or NULL_SENDER
    at = received_at.astimezone(UTC)
    date = f"{_DAYS[at.weekday()]} {_MONTHS[at.month - 1]} {at.day:2d} {at:%H:%M:%S} {at.year}"
    return f"From {word} {date}\n".encode()


class MboxrdEncoder:
    """Turns CRLF message pieces into mboxrd content: LF line ends, ``>*From `` lines quoted.

    Works on pieces cut anywhere: a CR that ends a piece, and a line start that could still
    become ``>*From ``, are held back until the next piece decides them.
    """

    def __init__(self) -> None:
        self._held = b""
        self._at_line_start = True

    def feed(self, data: bytes) -> bytes:
        data = self._held + data
        self._held = b""
        if data.endswith(b"\r"):
            self._held, data = b"\r", data[:-1]
        data = data.replace(b"\r\n", b"\n")
        tail_start = data.rfind(b"\n") + 1
        if (tail_start or self._at_line_start) and _PARTIAL_FROM.fullmatch(data, tail_start):
            self._held, data = data[tail_start:] + self._held, data[:tail_start]
        return self._quote(data)

    def finish(self) -> bytes:
        rest, self._held = self._held, b""
        return self._quote(rest.replace(b"\r\n", b"\n"))

    def _quote(self, data: bytes) -> bytes:
        if not data:
            return b""
        head_end = 0 if self._at_line_start else data.find(b"\n") + 1 or len(data)
        self._at_line_start = data.endswith(b"\n")
        return data[:head_end] + _FROM_TO_QUOTE.sub(rb">\1", data[head_end:])


def write_mbox_message(out: BinaryIO, pieces: Iterable[bytes], *, sender: str, received_at: datetime) -> int:
    """Append one CRLF-normalised message to an mboxrd file; return the message bytes consumed."""
    out.write(format_from_line(sender, received_at))
    encoder = MboxrdEncoder()
    consumed = 0
    for piece in pieces:
        consumed += len(piece)
        out.write(encoder.feed(piece))
    out.write(encoder.finish())
    out.write(b"\n")
    return consumed


# --- Maildir reading -------------------------------------------------------------------------


@dataclass(frozen=True)
class MaildirMessage:
    path: Path
    base_name: str
    received_at: datetime
    # From dovecot-uidlist, when the message is listed there.
    uid: int | None = None
    uidl: str | None = None


@dataclass(frozen=True)
class UidlistEntry:
    uid: int
    base_name: str
    uidl: str


def read_maildir(directory: Path) -> list[MaildirMessage]:
    """The messages in ``cur/`` and ``new/``, in delivery order.

    With a ``dovecot-uidlist``, the messages it lists come first in its order, carrying the UIDL
    clients saw; the rest follow in file-name order (timestamp prefix, then name).
    """
    files = _maildir_files(directory)
    uidlist_path = directory / UIDLIST_NAME
    entries = read_uidlist(uidlist_path) if uidlist_path.exists() else []
    listed = []
    for entry in entries:
        path = files.pop(entry.base_name, None)
        if path is not None:
            listed.append(_maildir_message(path, entry.base_name, uid=entry.uid, uidl=entry.uidl))
    rest = [_maildir_message(path, base_name) for base_name, path in files.items()]
    return listed + sorted(rest, key=lambda message: (message.received_at, message.path.name))


def _maildir_files(directory: Path) -> dict[str, Path]:
    """Message files by base name (the name before ``:2,``); tmp/ and dot-files are left out."""
    try:
        return _list_maildir(directory)
    except OSError as error:
        raise MailFileError(f"cannot read {error.filename or directory}: {error.strerror}") from None


def _list_maildir(directory: Path) -> dict[str, Path]:
    """Regular, non-empty files only: a symlink could point anywhere outside the Maildir."""
    if not directory.is_dir():
        raise MailFileError(f"cannot read {directory}: no such directory")
    folders = [folder for folder in (directory / "cur", directory / "new") if folder.is_dir()]
    if not folders:
        raise MailFileError(f"{directory} is not a Maildir (no cur/ or new/ folder)")
    files = {}
    for folder in folders:
        if folder.is_symlink():
            logger.warning("skipped %s: a symbolic link, not a folder of the Maildir", folder)
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and _is_message_file(entry):
                    files[base_name(entry.name)] = folder / entry.name
    return files


def _is_message_file(entry: os.DirEntry) -> bool:
    if not entry.is_file(follow_symlinks=False):
        logger.warning("skipped %s: not a regular file", entry.path)
        return False
    if entry.stat(follow_symlinks=False).st_size == 0:
        logger.warning("skipped %s: an empty file is not a message", entry.path)
        return False
    return True


def open_message_file(path: Path) -> BinaryIO:
    """Open a listed Maildir file for reading, refusing one replaced by a symlink since."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")


def base_name(file_name: str) -> str:
    return file_name.split(MAILDIR_INFO_SEPARATOR, 1)[0]


def _maildir_message(
    path: Path, name: str, *, uid: int | None = None, uidl: str | None = None
) -> MaildirMessage:
    return MaildirMessage(path, name, _maildir_received_at(path), uid, uidl)


def _maildir_received_at(path: Path) -> datetime:
    """The delivery time in the file name (``<seconds>.<unique>.<host>``), else the file's mtime."""
    prefix = path.name.split(".", 1)[0]
    if prefix.isdigit():
        try:
            return datetime.fromtimestamp(int(prefix), UTC)
        except (ValueError, OverflowError, OSError):
            pass
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except OSError as error:
        raise MailFileError(f"cannot read {path}: {error.strerror}") from None


def read_uidlist(path: Path) -> list[UidlistEntry]:
    """The entries of a Dovecot ``dovecot-uidlist`` (versions 1 and 3), in file order.

    The UIDL is the entry's ``P`` field when present, else Dovecot's default pop3_uidl_format
    ``%08Xu%08Xv``, exactly what a Dovecot POP3 server showed clients.
    """
    try:
        lines = path.read_bytes().decode("utf-8", "surrogateescape").splitlines()
    except OSError as error:
        raise MailFileError(f"cannot read {path}: {error.strerror}") from None
    if not lines:
        return []
    version, uid_validity = _uidlist_header(path, lines[0])
    parse = _uidlist_v3_entry if version == 3 else _uidlist_v1_entry
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            entries.append(parse(line, uid_validity))
        except ValueError:
            raise MailFileError(f"{path}: line {number}: malformed entry") from None
    return entries


def _uidlist_header(path: Path, line: str) -> tuple[int, int]:
    fields = line.split()
    try:
        if fields[0] == "1":
            return 1, int(fields[1])
        if fields[0] == "3":
            return 3, int(next(field[1:] for field in fields[1:] if field.startswith("V")))
    except (IndexError, ValueError, StopIteration):
        raise MailFileError(f"{path}: line 1: malformed header") from None
    raise MailFileError(f"{path}: unsupported dovecot-uidlist version {fields[0] if fields else '(none)'}")


def _uidlist_v1_entry(line: str, uid_validity: int) -> UidlistEntry:
    uid_text, file_name = line.split(maxsplit=1)
    return _uidlist_entry(int(uid_text), file_name, uid_validity, pop3_uidl=None)


def _uidlist_v3_entry(line: str, uid_validity: int) -> UidlistEntry:
    """``<uid> [<key><value> ...] :<file name>``; ``P`` holds the POP3 UIDL when it was set."""
    head, separator, file_name = line.partition(" :")
    if not separator:
        raise ValueError(line)
    uid_text, *fields = head.split()
    pop3_uidl = next((field[1:] for field in fields if field.startswith("P") and len(field) > 1), None)
    return _uidlist_entry(int(uid_text), file_name, uid_validity, pop3_uidl)


def _uidlist_entry(uid: int, file_name: str, uid_validity: int, pop3_uidl: str | None) -> UidlistEntry:
    uidl = pop3_uidl if pop3_uidl is not None else f"{uid:08X}{uid_validity:08X}"
    return UidlistEntry(uid, base_name(file_name.strip()), uidl)
