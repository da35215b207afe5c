"""``importmail ADDRESS (--maildir DIR | --mbox FILE)`` and ``importmail --maildir-root DIR``.

Each message is stored in its own transaction and marked with an import key, so an import
that stops (over quota, interrupted) is resumed by running the same command again.
"""

import hashlib
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from mailadmin.hosting import services, store
from mailadmin.hosting.actors import Actor
from mailadmin.mailin import mailfiles
from mailadmin.mailin.messagefile import READ_SIZE, MessageTooLarge, Readable, SpooledMessage, spool_message
from mailadmin.management.commandutils import store_errors
from mailadmin.models import Mailbox, Message

MAX_IMPORT_KEY_LENGTH = Message._meta.get_field("import_key").max_length

logger = logging.getLogger(__name__)


class _MailboxImport:
    """One mailbox's import: what is already there, and what this run stored or skipped."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.uidls, self.import_keys = store.existing_import_markers(mailbox)
        self.imported = 0
        self.skipped = 0

    def is_present(self, import_key: str, uidl: str | None = None) -> bool:
        return import_key in self.import_keys or uidl in self.uidls

    def append(self, label: str, spooled: SpooledMessage, *, import_key: str, **fields: Any) -> None:
        try:
            stored = store.append_message(self.mailbox, spooled, import_key=import_key, **fields)
        except store.StoreError as error:
            raise self.stopped(label, str(error)) from None
        self.uidls.add(stored.uidl)
        self.import_keys.add(import_key)
        self.imported += 1

    @contextmanager
    def spooled(self, label: str, source: Readable | Iterable[bytes]) -> Iterator[SpooledMessage]:
        try:
            spooled = spool_message(source)
        except MessageTooLarge as error:
            raise self.stopped(label, str(error)) from None
        with spooled:
            yield spooled

    def stopped(self, label: str, reason: str) -> CommandError:
        resume = f"{self.imported} imported before it; run again to resume"
        return CommandError(f"{self.mailbox.address}: {label}: {reason} ({resume})")

    def progress(self, total: int, unit: str) -> tqdm:
        return tqdm(
            total=total,
            unit=unit,
            unit_scale=unit == "B",
            desc=self.mailbox.address,
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
        )

    def summary(self) -> str:
        return f"{self.mailbox.address}: {self.imported} imported, {self.skipped} already present"


class Command(BaseCommand):
    help = "Import a Maildir or an mbox into a mailbox, or a folder of Maildirs named by address."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("address", nargs="?", help="Mailbox to import into (not with --maildir-root).")
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--maildir", type=Path, metavar="DIR", help="A Maildir (cur/ and new/).")
        source.add_argument("--mbox", type=Path, metavar="FILE", help="An mboxrd file.")
        source.add_argument(
            "--maildir-root",
            type=Path,
            metavar="DIR",
            help=(
                "One Maildir per mailbox, each named by its address, or one folder per domain holding "
                "a Maildir per local part (Dovecot's %%u or %%d/%%n layouts; a Maildir may be a home "
                "folder's Maildir/)."
            ),
        )

    def handle(
        self,
        *args: Any,
        address: str | None,
        maildir: Path | None,
        mbox: Path | None,
        maildir_root: Path | None,
        **options: Any,
    ) -> None:
        if maildir_root is not None:
            if address:
                raise CommandError(
                    "--maildir-root takes no ADDRESS: each folder is named by its mailbox address"
                )
            for mailbox, folder in _mailbox_folders(maildir_root):
                self._run(mailbox, _import_maildir, folder)
            return
        if not address:
            raise CommandError("give the ADDRESS of the mailbox to import into")
        with store_errors():
            mailbox = services.get_mailbox(Actor.cli(), address)
        if mbox is not None:
            self._run(mailbox, _import_mbox, mbox)
        else:
            self._run(mailbox, _import_maildir, maildir)

    def _run(self, mailbox: Mailbox, importer: Callable[[_MailboxImport, Path], None], path: Path) -> None:
        run = _MailboxImport(mailbox)
        try:
            importer(run, path)
        finally:
            if run.imported:
                services.record_mail_import(Actor.cli(), mailbox, run.imported, str(path))
        self.stdout.write(run.summary())


def _is_mailbox_folder(path: Path) -> bool:
    """A real folder: a symlink could lead the import anywhere outside the root."""
    if path.is_symlink():
        logger.warning("skipped %s: a symbolic link, not a folder of the root", path)
        return False
    return path.is_dir() and not path.name.startswith(".")


def _mailbox_folders(root: Path) -> list[tuple[Mailbox, Path]]:
    """Every mailbox folder under ``root`` with its mailbox, all checked before anything is imported.

    A folder named by an address is that mailbox's (Dovecot's ``mail_location = maildir:DIR/%u``);
    one named by a domain holds a folder per local part (``maildir:DIR/%d/%n``). A mailbox's
    Maildir may also be the ``Maildir`` folder inside it (a home directory, ``maildir:~/Maildir``).
    """
    pairs = []
    for folder in _folders(root):
        if "@" in folder.name:
            pairs.append(_with_mailbox(folder.name, folder))
        else:
            _in_scope(folder, services.get_domain, folder.name)
            pairs.extend(_with_mailbox(f"{local.name}@{folder.name}", local) for local in _folders(folder))
    return pairs


def _folders(parent: Path) -> list[Path]:
    try:
        return sorted(path for path in parent.iterdir() if _is_mailbox_folder(path))
    except OSError as error:
        raise CommandError(f"cannot read {parent}: {error.strerror}") from None


def _with_mailbox(address: str, folder: Path) -> tuple[Mailbox, Path]:
    mailbox = _in_scope(folder, services.get_mailbox, address)
    home_maildir = folder / "Maildir"
    if _is_mailbox_folder(home_maildir) and not (folder / "cur").is_dir():
        return mailbox, home_maildir
    return mailbox, folder


def _in_scope(folder: Path, get, name: str):
    try:
        return get(Actor.cli(), name)
    except store.StoreError as error:
        raise CommandError(f"{folder}: {error}") from None


def _import_mbox(run: _MailboxImport, path: Path) -> None:
    try:
        stream = path.open("rb")
    except OSError as error:
        raise CommandError(f"cannot read {path}: {error.strerror}") from None
    copies: Counter[str] = Counter()
    with stream, run.progress(os.fstat(stream.fileno()).st_size, "B") as progress:
        try:
            for number, message in enumerate(mailfiles.read_mbox(stream), start=1):
                label = f"message {number} (line {message.line_number}) of {path}"
                _import_mbox_message(run, message, label, copies)
                progress.update(stream.tell() - progress.n)
        except mailfiles.MailFileError as error:
            raise CommandError(f"{path}: {error}") from None


def _import_mbox_message(
    run: _MailboxImport, message: mailfiles.MboxMessage, label: str, copies: Counter[str]
) -> None:
    """Mbox messages have no name: the key is their digest, numbered among identical copies."""
    with run.spooled(label, message.content) as spooled:
        digest = _sha256(spooled)
        copies[digest] += 1
        import_key = f"mbox:{digest}:{copies[digest]}"
        if run.is_present(import_key):
            run.skipped += 1
            return
        run.append(
            label,
            spooled,
            import_key=import_key,
            envelope_sender=message.envelope_sender,
            received_at=message.received_at,
        )


def _import_maildir(run: _MailboxImport, directory: Path) -> None:
    try:
        messages = mailfiles.read_maildir(directory)
    except mailfiles.MailFileError as error:
        raise CommandError(str(error)) from None
    with run.progress(len(messages), "msg") as progress:
        for message in messages:
            import_key = _maildir_key(message.base_name)
            if run.is_present(import_key, message.uidl):
                run.skipped += 1
            else:
                _import_maildir_message(run, message, import_key)
            progress.update()


def _import_maildir_message(run: _MailboxImport, message: mailfiles.MaildirMessage, import_key: str) -> None:
    label = str(message.path)
    try:
        handle = mailfiles.open_message_file(message.path)
    except OSError as error:
        raise run.stopped(label, f"cannot read: {error.strerror}") from None
    with handle, run.spooled(label, handle) as spooled:
        run.append(
            label,
            spooled,
            import_key=import_key,
            received_at=message.received_at,
            uidl=message.uidl,
            uid=message.uid,
        )


def _maildir_key(base_name: str) -> str:
    """``maildir:<base name>``, or a digest of the name when it is too long or not printable text."""
    key = f"maildir:{base_name}"
    if len(key) <= MAX_IMPORT_KEY_LENGTH and key.isprintable():
        return key
    return "maildir-sha256:" + hashlib.sha256(base_name.encode("utf-8", "surrogateescape")).hexdigest()


def _sha256(spooled: SpooledMessage) -> str:
    digest = hashlib.sha256()
    for chunk in spooled.chunks(READ_SIZE):
        digest.update(chunk)
    return digest.hexdigest()
