"""Pipe delivery for an MTA: ``deliver [--sender ADDR] RECIPIENT... < message``.

Exit codes follow sysexits(3), which Postfix's pipe(8) and Exim's pipe transport understand:
0 delivered to every recipient; 65 (EX_DATAERR) the message is empty; 67 (EX_NOUSER) a
recipient does not exist; 69 (EX_UNAVAILABLE) permanently refused (mailbox disabled, message
too large, an alias loop); 75 (EX_TEMPFAIL) try again later (over quota, database unavailable,
anything unexpected); 78 (EX_CONFIG) an alias forwards to outside addresses, which the MTA must
expand itself. Delivery is all or none, so a retry after a non-zero exit never duplicates mail.
An alias counts as delivered once any of its mailboxes has its copy (those full are named), as
over LMTP: sending it again would duplicate the copies stored.

``manage.py`` first offers the message to a running runlmtp (:mod:`mailadmin.mailin.pipe`),
without starting Django; this command delivers what that fast path leaves to it.
"""

import sys

from django.core.management.base import BaseCommand, CommandError

from mailadmin.mailin.delivery import deliver
from mailadmin.mailin.pipe import EX_TEMPFAIL, EXIT_CODES, exit_code


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
            self.stdout.write(" ".join(f"{r.recipient}: delivered as {r.uidl}{_missed(r)}" for r in results))
            return
        code = exit_code(result.status for result in failures)
        reasons = "; ".join(f"{result.recipient}: {result.status.value}" for result in failures)
        raise CommandError(f"not delivered: {reasons}", returncode=code)


def _missed(result) -> str:
    """An alias's mailboxes that did not get their copy (full), after the stored ones."""
    if not result.missed:
        return ""
    return " (not for " + ", ".join(f"{copy.recipient}: {copy.status.value}" for copy in result.missed) + ")"
