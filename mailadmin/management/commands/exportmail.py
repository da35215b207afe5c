"""``exportmail ADDRESS --mbox FILE``: a mailbox's messages as mboxrd, in delivery order."""

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from mailadmin.hosting import store
from mailadmin.mailin import mailfiles
from mailadmin.management.commandutils import store_errors
from mailadmin.models import Mailbox


class Command(BaseCommand):
    help = "Export a mailbox to an mboxrd file that importmail --mbox reads back byte for byte."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("address", help="Mailbox to export.")
        parser.add_argument(
            "--mbox",
            type=Path,
            required=True,
            metavar="FILE",
            help="A new file, or a regular file to replace; - for standard output.",
        )

    def handle(self, *args: Any, address: str, mbox: Path, **options: Any) -> None:
        with store_errors():
            mailbox = store.get_mailbox(address)
        to_stdout = str(mbox) == "-"
        try:
            with _to_stdout() if to_stdout else _replacing(mbox) as out:
                exported, left_out = _export(mailbox, out)
        except OSError as error:
            raise CommandError(f"cannot write {mbox}: {error.strerror}") from None
        deleted = f"; {left_out} deleted during the export left out" if left_out else ""
        report = (
            f"{mailbox.address}: {exported} exported to {'standard output' if to_stdout else mbox}{deleted}"
        )
        (self.stderr if to_stdout else self.stdout).write(report)


def _export(mailbox: Mailbox, out: BinaryIO) -> tuple[int, int]:
    """Write every message; return (exported, left out because it was deleted while being read)."""
    exported = left_out = 0
    progress = tqdm(
        total=mailbox.used_messages,
        unit="msg",
        desc=mailbox.address,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
    )
    with progress:
        for entry in store.iter_mailbox_messages_for_export(mailbox):
            start = out.tell()
            written = mailfiles.write_mbox_message(
                out,
                store.iter_message_bytes(entry.message_id),
                sender=entry.envelope_sender,
                received_at=entry.received_at,
            )
            if written == entry.size_bytes:
                exported += 1
            else:
                out.seek(start)
                out.truncate()
                left_out += 1
            progress.update()
    return exported, left_out


@contextmanager
def _to_stdout() -> Iterator[BinaryIO]:
    """Standard output, written once the export is complete: a message deleted mid-read is cut
    from the temporary file, which a pipe could not take back."""
    with tempfile.TemporaryFile() as spool:
        yield spool
        spool.seek(0)
        shutil.copyfileobj(spool, sys.stdout.buffer)
        sys.stdout.buffer.flush()


@contextmanager
def _replacing(target: Path) -> Iterator[BinaryIO]:
    """A temporary file beside ``target`` that replaces it only once complete and on disk.

    Only a regular file is replaced: never a device, a symlink or a directory.
    """
    try:
        kind = os.lstat(target).st_mode
    except FileNotFoundError:
        kind = None
    if kind is not None and not stat.S_ISREG(kind):
        raise CommandError(f"refusing to replace {target}: not a regular file")
    with tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False
    ) as handle:
        temporary = Path(handle.name)
        try:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
