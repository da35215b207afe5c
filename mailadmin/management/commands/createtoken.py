"""``createtoken [--domain NAME ...] [--scope read|write] [--expires DAYS] [--allow-ip CIDR ...]``."""

from django.core.management.base import CommandParser

from mailadmin.api.models import ApiToken
from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, count, store_errors


class Command(OperatorCommand):
    help = (
        "Create a provisioning API token and print it once, as the last line (only its digest is "
        "kept). Without --domain the token acts on every domain."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--domain",
            action="append",
            default=[],
            metavar="NAME",
            dest="domains",
            help="A domain the token may act on; repeat for several. None: every domain.",
        )
        parser.add_argument(
            "--scope",
            choices=ApiToken.Scope.values,
            default=ApiToken.Scope.READ,
            help="read (the default) or write.",
        )
        parser.add_argument("--expires", type=count, metavar="DAYS", help="Valid for this many days.")
        parser.add_argument(
            "--allow-ip",
            action="append",
            default=[],
            metavar="CIDR",
            dest="networks",
            help="A network the token may be used from; repeat for several. None: anywhere.",
        )
        parser.add_argument("--name", default="", metavar="TEXT", help="What the token is for.")

    def handle(self, *args, domains, scope, expires, networks, name, **options) -> None:
        with store_errors():
            new = services.create_token(
                Actor.cli(),
                name=name,
                domain_names=domains,
                scope=scope,
                expires_days=expires,
                allowed_networks=networks,
            )
        token = new.token
        reach = ", ".join(sorted(token.domains.values_list("name", flat=True))) or "every domain"
        expiry = token.expires_at.isoformat(timespec="seconds") if token.expires_at else "never"
        self.stdout.write(f"created {token.scope} token {token.prefix} for {reach}, expires {expiry}")
        self.stdout.write("the token is shown this once; keep it now:")
        self.stdout.write(new.secret)
