"""``importmailboxes (FILE.csv | --dovecot-passwd FILE)``: create many mailboxes in one
transaction, all or none."""

from django.core.management.base import CommandError, CommandParser

from mailadmin.hosting import dovecotpasswd, mailboxcsv, services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, progress, quota_text, store_errors


class Command(OperatorCommand):
    help = (
        f"Create the mailboxes listed in a CSV file with the header {','.join(mailboxcsv.HEADER)}: "
        "one of password or password_hash per row (quote hashes that contain commas, like argon2's); "
        "an empty quota takes the domain's default. Or, with --dovecot-passwd, the users of a Dovecot "
        "passwd-file, keeping their {SCHEME} password hashes. "
        "Domains must exist. Passwords are hashed first (a progress bar shows on a terminal), then all rows "
        "are created in one short transaction, or none if any row is wrong."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "file",
            metavar="FILE.csv",
            nargs="?",
            help=f"UTF-8 CSV; first line exactly {','.join(mailboxcsv.HEADER)}.",
        )
        parser.add_argument(
            "--dovecot-passwd",
            metavar="FILE",
            help=(
                "Read a Dovecot passwd-file instead "
                "(user:{SCHEME}hash:uid:gid:gecos:home:shell:extra_fields, users as full addresses; "
                "a quota from userdb_quota_rule=*:storage=SIZE). "
                "The hashes are replaced by argon2 at each user's first login."
            ),
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Check every row against the database, then write nothing."
        )

    def handle(self, *args, file: str | None, dovecot_passwd: str | None, dry_run: bool, **options) -> None:
        if (file is None) == (dovecot_passwd is None):
            raise CommandError("give either FILE.csv or --dovecot-passwd FILE")
        path = file or dovecot_passwd
        parse = mailboxcsv.parse if file else dovecotpasswd.parse
        try:
            with open(path, encoding="utf-8-sig", newline="") as handle, store_errors():
                created = services.import_mailboxes(
                    Actor.cli(), handle, dry_run=dry_run, progress=progress("hashing passwords"), parse=parse
                )
        except OSError as error:
            raise CommandError(f"cannot read {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise CommandError(f"{path} is not UTF-8 text") from None
        verb = "would create" if dry_run else "created"
        for mailbox in created:
            self.stdout.write(f"{verb} {mailbox.address} (quota {quota_text(mailbox.quota_bytes)})")
        if dry_run:
            self.stdout.write(f"dry run: {len(created)} mailboxes would be created; nothing was written")
        else:
            self.stdout.write(f"imported {len(created)} mailboxes")
