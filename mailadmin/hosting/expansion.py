"""Alias expansion: from one address to the mailboxes that receive its mail.

The rule, written once here for delivery (``deliver``, ``runlmtp``) and for the check when an
alias is saved. An address that is a mailbox is that mailbox. Otherwise, in this order:

1. its alias, if it has an active one (in an active domain): each destination, expanded alike;
2. if its domain is an alias domain: the same local part in the target domain, expanded alike;
3. its domain's catch-all (``@domain``), if active: each destination, expanded alike;
4. otherwise, in a domain hosted here, it is unknown (a destination left dangling by a deleted
   mailbox is skipped), and in any other domain it is an outside address, which this server
   cannot store: the MTA has to expand such aliases itself (Postfix's ``virtual_alias_maps``).

The same rule as Postfix's virtual(5) table applies, so the MTA and we agree on every address.
A chain that comes back to an address already on it is a loop (:class:`AliasLoop`), and a chain
longer than :data:`MAX_DEPTH`, or an expansion reaching more than :data:`MAX_ADDRESSES`
addresses, is refused too (:class:`ExpansionTooLarge`): at save time, and again at delivery,
where a deleted mailbox can turn a chain into a loop through a catch-all. Mailboxes named on
several paths are listed once.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mailadmin.models import CATCH_ALL_PREFIX

# Aliases and catch-alls one chain may pass through. Postfix's virtual_alias_recursion_limit
# is 1000; real chains are one or two deep, and a long one is a mistake worth naming.
MAX_DEPTH = 10
# Postfix's virtual_alias_expansion_limit: addresses one recipient may expand to.
MAX_ADDRESSES = 1000


class ExpansionError(Exception):
    """An address whose expansion is refused; the message names the chain."""


class AliasLoop(ExpansionError):
    def __init__(self, chain: Sequence[str]) -> None:
        super().__init__(f"alias loop: {' -> '.join(chain)}")
        self.chain = tuple(chain)


class ExpansionTooLarge(ExpansionError):
    pass


@dataclass(frozen=True)
class AliasEntry:
    alias_id: int | None  # None: an alias being checked before it is saved
    source: str
    destinations: tuple[str, ...]


class Directory(Protocol):
    """What expansion asks of the tables; ``mailbox`` returns whatever the caller stores into."""

    def mailbox(self, address: str) -> object | None: ...

    def aliases(self, address: str) -> tuple[AliasEntry | None, AliasEntry | None]:
        """The address's own active alias and its domain's active catch-all (either may be None)."""
        ...

    def alias_domain_target(self, domain: str) -> str | None: ...

    def is_hosted(self, domain: str) -> bool:
        """A domain or alias domain of ours: its addresses are never outside addresses."""
        ...


@dataclass
class Expansion:
    """Where one address's mail goes: each list in the order first reached, without repeats."""

    mailboxes: dict[str, object] = field(default_factory=dict)  # address -> Directory.mailbox()
    outside: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    alias_ids: list[int] = field(default_factory=list)  # aliases and catch-alls passed through
    visits: int = 0

    @property
    def via_alias(self) -> bool:
        return bool(self.alias_ids)


def expand(address: str, directory: Directory) -> Expansion:
    """Expand a normalised address; raises ExpansionError for a loop or an expansion too large.

    The address itself is never an outside address: a domain not hosted here makes it unknown.
    """
    expansion = Expansion()
    _visit(address, (), directory, expansion)
    return expansion


def check_alias(source: str, destinations: Sequence[str], directory: Directory) -> Expansion:
    """Expand an alias (or catch-all) as it would be saved; raise ExpansionError if it loops."""
    expansion = Expansion()
    _follow(AliasEntry(None, source, tuple(destinations)), (), directory, expansion)
    return expansion


def _visit(address: str, path: tuple[str, ...], directory: Directory, expansion: Expansion) -> None:
    _count_visit(address, path, expansion)
    mailbox = directory.mailbox(address)
    if mailbox is not None:
        expansion.mailboxes.setdefault(address, mailbox)
        return
    root = not path
    path = (*path, address)
    local, _, domain = address.rpartition("@")
    own, catch_all = directory.aliases(address)
    if own is not None:
        _follow(own, path, directory, expansion)
    elif (target := directory.alias_domain_target(domain)) is not None:
        _visit(f"{local}@{target}", path, directory, expansion)
    elif catch_all is not None:
        _follow(catch_all, path, directory, expansion)
    elif root or directory.is_hosted(domain):  # the address asked for is never an outside one
        _append_once(expansion.unknown, address)
    else:
        _append_once(expansion.outside, address)


def _follow(entry: AliasEntry, path: tuple[str, ...], directory: Directory, expansion: Expansion) -> None:
    if entry.source != (path[-1] if path else None):
        _count_visit(entry.source, path, expansion)
        path = (*path, entry.source)
    if entry.alias_id is not None and entry.alias_id not in expansion.alias_ids:
        expansion.alias_ids.append(entry.alias_id)
    for destination in entry.destinations:
        _visit(destination, path, directory, expansion)


def _count_visit(address: str, path: tuple[str, ...], expansion: Expansion) -> None:
    if address in path:
        raise AliasLoop([*path, address])
    if len(path) > MAX_DEPTH:
        raise ExpansionTooLarge(f"alias chain deeper than {MAX_DEPTH}: {' -> '.join([*path, address])}")
    expansion.visits += 1
    if expansion.visits > MAX_ADDRESSES:
        raise ExpansionTooLarge(
            f"{path[0] if path else address} expands to more than {MAX_ADDRESSES} addresses"
        )


def _append_once(items: list[str], address: str) -> None:
    if address not in items:
        items.append(address)


def catch_all_source(domain: str) -> str:
    return f"{CATCH_ALL_PREFIX}{domain}"
