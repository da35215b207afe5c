"""What the store refuses, as exceptions whose messages an operator can read as they are."""

from django.utils.translation import gettext


class StoreError(Exception):
    """A request the store refuses; the message is fit to show an operator as it is."""


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


class LeaseLost(StoreError):
    """The session no longer holds the mailbox lock (it lapsed and was taken over)."""


def on_line(line: int, error: Exception) -> str:
    """An error's message, naming the line of an import file it is about."""
    return gettext("line %(line)d: %(error)s") % {"line": line, "error": error}
