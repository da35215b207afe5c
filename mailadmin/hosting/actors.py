"""Who is acting: the person or system behind a change, and the domains they may touch.

Every service function takes an :class:`Actor` first. Its scope is either all domains (the
command line, superusers) or a set of domain ids (domain administrators). Any other staff
user's scope is empty: scope is granted by a domain tie, never assumed from the absence of
one, so an administrator whose last domain is removed sees nothing rather than everything.
"""

import getpass
from dataclasses import dataclass
from enum import StrEnum

from mailadmin.models import DomainAdministrator


class ActorKind(StrEnum):
    USER = "user"
    TOKEN = "token"
    CLI = "cli"


@dataclass(frozen=True)
class Actor:
    kind: ActorKind
    name: str
    user_id: int | None = None
    client_address: str = ""
    # None: every domain; otherwise the ids of the domains this actor administers.
    domain_ids: frozenset[int] | None = frozenset()

    @classmethod
    def cli(cls) -> "Actor":
        return cls(ActorKind.CLI, f"cli:{_os_user()}", domain_ids=None)

    @classmethod
    def for_user(cls, user, client_address: str = "") -> "Actor":
        if not user.is_authenticated:
            # A visitor not signed in (the login page asks what it may show): nothing.
            return cls(ActorKind.USER, "", None, client_address or "", frozenset())
        if user.is_superuser:
            domain_ids = None
        else:
            domain_ids = frozenset(
                DomainAdministrator.objects.filter(user=user).values_list("domain_id", flat=True)
            )
        return cls(ActorKind.USER, user.get_username(), user.pk, client_address or "", domain_ids)

    @classmethod
    def token(
        cls, name: str, domain_ids: frozenset[int] | None = frozenset(), client_address: str = ""
    ) -> "Actor":
        return cls(ActorKind.TOKEN, name, None, client_address, domain_ids)

    @property
    def all_domains(self) -> bool:
        return self.domain_ids is None

    def may_see_domain(self, domain_id: int) -> bool:
        return self.domain_ids is None or domain_id in self.domain_ids


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"
