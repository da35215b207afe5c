"""``kickpop3 ADDRESS|SESSION``: end live POP3 sessions without applying their deletions."""

import uuid

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, store_errors


class Command(OperatorCommand):
    help = "End the POP3 sessions of a mailbox, or one session by id, on whichever server holds them."

    def add_arguments(self, parser):
        parser.add_argument("target", metavar="ADDRESS|SESSION", help="A mailbox address or a session id.")

    def handle(self, *args, target: str, **options):
        with store_errors():
            if _is_session_id(target):
                count = services.kick_sessions(Actor.cli(), session_ids=[target])
            else:
                count = services.kick_sessions(Actor.cli(), address=target)
        self.stdout.write(f"kick requested for {count} session{'s' if count != 1 else ''}")


def _is_session_id(target: str) -> bool:
    try:
        uuid.UUID(target)
    except ValueError:
        return False
    return True
