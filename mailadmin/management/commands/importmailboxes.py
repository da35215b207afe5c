"""``importmailboxes FILE.csv``: create many mailboxes in one transaction, all or none."""

from django.core.management.base import CommandError, CommandParser

from mailadmin.hosting import mailboxcsv, services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, progress, quota_text, store_errors


class Command(OperatorCommand):
    help = (
        f"Create the mailboxes listed in a CSV file with the header {','.join(mailboxcsv.HEADER)}: "
        "one of password or password_hash per row (quote hashes that contain commas, like argon2's); "
        "an empty quota takes the domain's default. "
        "Domains must exist. Passwords are hashed first (a progress bar shows on a terminal), then all rows "
        "are created in one short transaction, or none if any row is wrong."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "file",
            metavar="FILE.csv",
            help=f"UTF-8 CSV; first line exactly {','.join(mailboxcsv.HEADER)}.",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Check every row against the database, then write nothing."
        )

    def handle(self, *args, file: str, dry_run: bool, **options) -> None:
        try:
            with open(file, encoding="utf-8-sig", newline="") as handle, store_errors():
                created = services.import_mailboxes(
                    Actor.cli(), handle, dry_run=dry_run, progress=progress("hashing passwords")
                )
        except OSError as error:
            raise CommandError(f"cannot read {file}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise CommandError(f"{file} is not UTF-8 text") from None
        verb = "would create" if dry_run else "created"
        for mailbox in created:
            self.stdout.write(f"{verb} {mailbox.address} (quota {quota_text(mailbox.quota_bytes)})")
        if dry_run:
            self.stdout.write(f"dry run: {len(created)} mailboxes would be created; nothing was written")
        else:
            self.stdout.write(f"imported {len(created)} mailboxes")
