"""``auditlog [--domain NAME] [--since DATE]``: the audit log, oldest entry first."""

import argparse
from datetime import datetime

from django.core.management.base import CommandParser
from django.utils import timezone

from mailadmin.addresses import normalise_domain
from mailadmin.hosting import audit
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand


def domain_name(text: str) -> str:
    """argparse type: a domain name, normalised; it need not exist any more."""
    try:
        return normalise_domain(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def since(text: str) -> datetime:
    """argparse type: ``YYYY-MM-DD`` (midnight, local time) or an ISO 8601 time."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid date {text!r}: use YYYY-MM-DD or an ISO time such as 2026-01-31T08:00:00+00:00"
        ) from None
    return timezone.make_aware(moment) if timezone.is_naive(moment) else moment


class Command(OperatorCommand):
    help = "Print the audit log, one line per change, oldest first."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--domain", type=domain_name, metavar="NAME", help="Only changes in this domain (even deleted)."
        )
        parser.add_argument(
            "--since",
            type=since,
            metavar="DATE",
            help="Only changes at or after DATE (YYYY-MM-DD or an ISO time).",
        )

    def handle(self, *args, domain: str | None, since: datetime | None, **options) -> None:
        for entry in audit.entries(Actor.cli(), domain_name=domain, since=since).iterator():
            self.stdout.write(audit.describe(entry))
