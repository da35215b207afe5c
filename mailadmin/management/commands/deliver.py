"""Pipe delivery for an MTA: ``deliver [--sender ADDR] RECIPIENT... < message``.

Exit codes follow sysexits(3), which Postfix's pipe(8) and Exim's pipe transport understand:
0 delivered to every recipient; 65 (EX_DATAERR) the message is empty; 67 (EX_NOUSER) a
recipient does not exist; 69 (EX_UNAVAILABLE) permanently refused (mailbox disabled, message
too large, an alias loop); 75 (EX_TEMPFAIL) try again later (over quota, database unavailable,
anything unexpected); 78 (EX_CONFIG) an alias forwards to outside addresses, which the MTA must
expand itself. Delivery is all or none, so a retry after a non-zero exit never duplicates mail:
an alias gets its copy into every mailbox it reaches, or into none.
"""

import sys

from django.core.management.base import BaseCommand, CommandError

from mailadmin.mailin.delivery import DeliveryStatus, deliver

EX_OK = 0
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78

EXIT_CODES = {
    DeliveryStatus.EMPTY_MESSAGE: EX_DATAERR,
    DeliveryStatus.NO_SUCH_MAILBOX: EX_NOUSER,
    DeliveryStatus.MAILBOX_INACTIVE: EX_UNAVAILABLE,
    DeliveryStatus.TOO_LARGE: EX_UNAVAILABLE,
    DeliveryStatus.OVER_QUOTA: EX_TEMPFAIL,
    DeliveryStatus.TEMPORARY_FAILURE: EX_TEMPFAIL,
    DeliveryStatus.OUTSIDE_DESTINATION: EX_CONFIG,
    DeliveryStatus.ALIAS_LOOP: EX_UNAVAILABLE,
}
# When recipients fail differently, a permanent reason wins: retrying cannot help.
SEVERITY = [EX_DATAERR, EX_NOUSER, EX_UNAVAILABLE, EX_CONFIG, EX_TEMPFAIL]


class Command(BaseCommand):
    help = "Deliver the message on standard input to every RECIPIENT, or to none of them."

    def add_arguments(self, parser):
        parser.add_argument("recipients", nargs="+", metavar="RECIPIENT", help="Mailbox address.")
        parser.add_argument("--sender", default="", help="Envelope sender, written to Return-Path.")

    def execute(self, *args, **options):
        try:
            return super().execute(*args, **options)
        except CommandError:
            raise
        except Exception as error:  # noqa: BLE001 - an MTA must retry, never bounce, on our bugs
            message = f"temporary failure: {error.__class__.__name__}: {error}"
            raise CommandError(message, returncode=EX_TEMPFAIL) from error

    def handle(self, *args, recipients: list[str], sender: str, **options):
        results = deliver(recipients, sys.stdin.buffer, sender=sender, all_or_none=True)
        failures = [result for result in results if result.status in EXIT_CODES]
        if not failures:
            self.stdout.write(" ".join(f"{r.recipient}: delivered as {r.uidl}" for r in results))
            return
        code = min((EXIT_CODES[result.status] for result in failures), key=SEVERITY.index)
        reasons = "; ".join(f"{result.recipient}: {result.status.value}" for result in failures)
        raise CommandError(f"not delivered: {reasons}", returncode=code)
