"""``createdomain NAME``: add a mail domain."""

from django.core.management.base import CommandParser

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, count, quota_text, size, store_errors


class Command(OperatorCommand):
    help = "Create a mail domain."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "name",
            metavar="NAME",
            help="Domain name, e.g. example.com (internationalised names are accepted).",
        )
        parser.add_argument(
            "--quota",
            type=size,
            metavar="SIZE",
            default=0,
            help="Cap on all mail in the domain, e.g. 10G (default: unlimited).",
        )
        parser.add_argument(
            "--max-mailboxes",
            type=count,
            metavar="N",
            default=0,
            help="Most mailboxes the domain may hold (default: unlimited).",
        )
        parser.add_argument(
            "--default-mailbox-quota",
            type=size,
            metavar="SIZE",
            default=0,
            help="Quota for new mailboxes created without --quota, e.g. 1G (default: unlimited).",
        )

    def handle(
        self, *args, name: str, quota: int, max_mailboxes: int, default_mailbox_quota: int, **options
    ) -> None:
        with store_errors():
            domain = services.create_domain(
                Actor.cli(),
                name,
                quota_bytes=quota,
                max_mailboxes=max_mailboxes,
                default_mailbox_quota_bytes=default_mailbox_quota,
            )
        self.stdout.write(
            f"created domain {domain.name} (quota {quota_text(domain.quota_bytes)}, "
            f"max mailboxes {domain.max_mailboxes or 'unlimited'}, "
            f"default mailbox quota {quota_text(domain.default_mailbox_quota_bytes)})"
        )
