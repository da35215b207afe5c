"""What the store refuses, as exceptions whose messages an operator can read as they are."""

from django.utils.translation import gettext


class StoreError(Exception):
    """A request the store refuses; the message is fit to show an operator as it is.

    ``field`` names the input the refusal is about, when it is about one (``quota_bytes``,
    ``password``), so a door can show the message against that field.
    """

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DomainNotFound(StoreError):
    pass


class MailboxNotFound(StoreError):
    pass


class AliasNotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class LimitReached(StoreError):
    pass


class OverQuota(StoreError):
    pass


class InvalidInput(StoreError):
    pass


class StillInUse(InvalidInput):
    """Refused while other rows depend on it (a domain that still has mailboxes)."""


class LeaseLost(StoreError):
    """The session no longer holds the mailbox lock (it lapsed and was taken over)."""


def on_line(line: int, error: Exception) -> str:
    """An error's message, naming the line of an import file it is about."""
    return gettext("line %(line)d: %(error)s") % {"line": line, "error": error}
