"""``revoketoken PREFIX``: the token stops working at once, on every host."""

from django.core.management.base import CommandParser

from mailadmin.hosting import services, tokens
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, store_errors


class Command(OperatorCommand):
    help = "Revoke a provisioning API token, named by its prefix (the 8 characters after mat_)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("prefix", metavar="PREFIX", help="The token's prefix, as listed in the admin.")

    def handle(self, *args, prefix: str, **options) -> None:
        with store_errors():
            token = services.revoke_token(Actor.cli(), _bare(prefix))
        self.stdout.write(f"revoked token {token.prefix}")


def _bare(text: str) -> str:
    """The prefix, given bare (``1a2b3c4d``), with its mark (``mat_1a2b3c4d``) or as the whole token."""
    text = text.strip()
    return tokens.prefix_of(text) or text.removeprefix(tokens.MARK)
