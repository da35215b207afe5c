"""``createmailbox ADDRESS``: add a mailbox and its login."""

from django.core.management.base import CommandParser

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import (
    OperatorCommand,
    count,
    quota_text,
    read_password,
    size,
    store_errors,
)


class Command(OperatorCommand):
    help = "Create a mailbox. Without --password-stdin a random password is generated and printed once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "address", metavar="ADDRESS", help="Mailbox address, local@domain; it is also the POP3 login."
        )
        parser.add_argument(
            "--quota",
            type=size,
            metavar="SIZE",
            help="Byte quota, e.g. 500M; 0 = unlimited (default: the domain's).",
        )
        parser.add_argument(
            "--quota-messages",
            type=count,
            metavar="N",
            default=0,
            help="Most messages kept (default: unlimited).",
        )
        parser.add_argument(
            "--password-stdin", action="store_true", help="Read the password from stdin, alone on one line."
        )
        parser.add_argument(
            "--create-domain", action="store_true", help="Create the domain first if it is missing."
        )

    def handle(
        self,
        *args,
        address: str,
        quota: int | None,
        quota_messages: int,
        password_stdin: bool,
        create_domain: bool,
        **options,
    ) -> None:
        password = read_password() if password_stdin else None
        with store_errors():
            created = services.create_mailbox(
                Actor.cli(),
                address,
                password=password,
                quota_bytes=quota,
                quota_messages=quota_messages,
                create_domain=create_domain,
            )
        mailbox = created.mailbox
        self.stdout.write(f"created mailbox {mailbox.address} (quota {quota_text(mailbox.quota_bytes)})")
        if created.generated_password is not None:
            self.stdout.write(f"password: {created.generated_password}")
