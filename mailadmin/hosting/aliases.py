"""Aliases, catch-alls and alias domains: every change to them, as functions taking the actor first.

Part of the service layer (see ``services``, whose scope helpers these use): each function
checks the actor's scope and writes its audit entry in the same transaction as the change.
The scope rule for these rows: an actor whose scope is every domain may do everything. A domain
administrator may create, change and delete the aliases and catch-all of their domains, with
destinations in their domains, and outside addresses (domains not hosted here) only where the
alias's domain allows it (``Domain.allow_outside_destinations``); an address of another hosted
domain is refused as any domain outside their scope is. An alias domain claims a domain name,
so only operators of every domain create or delete one.

Rules on the rows themselves: addresses are normalised as mailboxes' are; an alias never has a
mailbox's address, nor a mailbox an alias's (``store.require_address_free``); a local destination
is an existing mailbox or alias; a domain holds at most ``max_aliases`` aliases (0: no limit;
its catch-all is not counted); and an alias that would expand into a loop, or deeper than
``expansion.MAX_DEPTH``, is refused when it is saved.
"""

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from django.db import transaction
from django.db.models import Q, QuerySet, Sum
from django.utils.translation import gettext, gettext_lazy

from mailadmin.addresses import domain_of, normalise_address, normalise_domain
from mailadmin.hosting import aliascsv, audit, expansion, scopes, store
from mailadmin.hosting.actors import Actor
from mailadmin.hosting.services import NotPermitted, Saved, _domain_in_scope, _require_domain_manager
from mailadmin.hosting.store.aliases import RECENT_DAYS as RECENT_DAYS  # for the doors
from mailadmin.hosting.store.aliases import first_recent_day
from mailadmin.models import CATCH_ALL_PREFIX, Alias, AliasDestination, AliasDomain, Domain

CREATING_ALIAS_DOMAINS_REFUSED = gettext_lazy(
    "not permitted: only an operator of every domain may create alias domains"
)
DELETING_ALIAS_DOMAINS_REFUSED = gettext_lazy(
    "not permitted: only an operator of every domain may delete alias domains"
)


# --- Reading ---------------------------------------------------------------------------------


def with_recent_counts(aliases: QuerySet) -> QuerySet:
    """Aliases annotated with ``received_recently``: messages received in the last RECENT_DAYS
    days, summed from at most that many daily rows each."""
    received = Sum("daily_counts__messages", filter=Q(daily_counts__day__gte=first_recent_day()), default=0)
    return aliases.annotate(received_recently=received)


def list_aliases(actor: Actor, domain_name: str | None = None) -> list[Alias]:
    """The aliases and catch-alls the actor may see, by domain, with destinations and counts."""
    aliases = scopes.visible_to(actor, Alias).select_related("domain")
    if domain_name is not None:
        aliases = aliases.filter(domain=_domain_in_scope(actor, domain_name))
    aliases = with_recent_counts(aliases).prefetch_related("destinations")
    return list(aliases.order_by("domain__name", "source"))


def get_alias(actor: Actor, source: str) -> Alias:
    return _alias_in_scope(actor, source)


def destinations_of(alias: Alias) -> list[str]:
    return [destination.address for destination in alias.destinations.all()]


# --- Aliases ---------------------------------------------------------------------------------


def create_alias(actor: Actor, source: str, destinations: Iterable[str], *, active: bool = True) -> Alias:
    """A new alias of ``source`` (``local@domain``) to ``destinations``."""
    wanted = _normalised_destinations(destinations)
    with transaction.atomic():
        alias = _new_alias(actor, _alias_source(actor, source), wanted, active)
        _require_valid_destinations(actor, alias.domain, alias.source, wanted)
        changes = {"destinations": [None, list(wanted)], "active": [None, active]}
        audit.record(actor, "create", "alias", alias.source, domain=alias.domain, changes=changes)
    return alias


def update_alias(
    actor: Actor, source: str, *, destinations: Iterable[str] | None = None, active: bool | None = None
) -> Alias:
    """Change an alias's destinations (replacing them all) or active flag; only what is given."""
    wanted = None if destinations is None else _normalised_destinations(destinations)
    with transaction.atomic():
        alias = _locked(_alias_in_scope(actor, source))
        _apply(actor, alias, wanted, active, object_type="catch-all" if alias.is_catch_all else "alias")
    return alias


def save_alias(
    actor: Actor, source: str, destinations: Iterable[str], *, active: bool | None = None
) -> Saved:
    """Create the alias (or, for an ``@domain`` source, the catch-all), or give an existing one
    exactly these destinations. Safe to repeat: the second call changes nothing. ``active``
    not given is True for a new alias and left alone on an existing one."""
    destinations = list(destinations)
    normalised = _any_source(source)
    if normalised.startswith(CATCH_ALL_PREFIX):
        existed = Alias.objects.filter(source=normalised).exists()
        catch_all = set_catch_all(actor, domain_of(normalised), destinations, active=active)
        return Saved(catch_all, created=not existed)
    normalised = _alias_source(actor, normalised)
    if not Alias.objects.filter(source=normalised).exists():
        try:
            with transaction.atomic():
                created = create_alias(actor, normalised, destinations, active=active is not False)
            return Saved(created, created=True)
        except store.AlreadyExists:
            if not Alias.objects.filter(source=normalised).exists():
                raise  # the address is a mailbox's
            # made meanwhile by a concurrent call: set it as asked
    return Saved(update_alias(actor, normalised, destinations=destinations, active=active), created=False)


def delete_alias(actor: Actor, source: str) -> None:
    """Delete an alias (or a catch-all, by its ``@domain`` source) and its counters."""
    with transaction.atomic():
        alias = _locked(_alias_in_scope(actor, source))
        changes = {"destinations": [destinations_of(alias), None]}
        object_type = "catch-all" if alias.is_catch_all else "alias"
        alias.delete()
        audit.record(actor, "delete", object_type, alias.source, domain=alias.domain, changes=changes)


def set_catch_all(
    actor: Actor, domain_name: str, destinations: Iterable[str] | None, *, active: bool | None = True
) -> Alias | None:
    """Give a domain a catch-all to ``destinations`` (replacing any), or none with ``None``.

    A catch-all receives mail for the domain's addresses that are neither mailbox nor alias.
    ``active=None`` leaves an existing catch-all's flag alone (a new one is active).
    """
    wanted = None if destinations is None else _normalised_destinations(destinations)
    with transaction.atomic():
        domain = _locked_domain(_domain_in_scope(actor, domain_name))  # one catch-all made at a time
        source = expansion.catch_all_source(domain.name)
        existing = Alias.objects.filter(source=source).first()
        if wanted is None:
            if existing is not None:
                delete_alias(actor, source)
            return None
        if existing is not None:
            _apply(actor, existing, wanted, active, object_type="catch-all")
            return existing
        alias = Alias.objects.create(source=source, domain=domain, active=active is not False)
        _replace_destinations(alias, wanted)
        _require_valid_destinations(actor, domain, source, wanted)
        changes = {"destinations": [None, list(wanted)]}
        if not alias.active:
            changes["active"] = [None, False]
        audit.record(actor, "create", "catch-all", source, domain=domain, changes=changes)
    return alias


def import_aliases(actor: Actor, handle: TextIO) -> list[Alias]:
    """Create every alias and catch-all of an import file (see ``aliascsv``) or, on any error, none.

    All rows are created first and their destinations checked after, so a row may name an
    alias of a later row. A refusal names the line.
    """
    rows = aliascsv.parse(handle)
    created: list[tuple[aliascsv.Row, Alias]] = []
    with transaction.atomic():
        for row in rows:
            with _naming_line(row):
                if row.is_catch_all:
                    domain = _domain_in_scope(actor, domain_of(row.source))
                    store.require_address_free(row.source)
                    alias = Alias.objects.create(source=row.source, domain=domain)
                    _replace_destinations(alias, row.destinations)
                else:
                    alias = _new_alias(actor, row.source, row.destinations, True)
                created.append((row, alias))
        for row, alias in created:
            with _naming_line(row):
                _require_valid_destinations(actor, alias.domain, alias.source, row.destinations)
                object_type = "catch-all" if row.is_catch_all else "alias"
                changes = {"destinations": [None, list(row.destinations)]}
                audit.record(actor, "import", object_type, alias.source, domain=alias.domain, changes=changes)
    return [alias for _, alias in created]


def _alias_source(actor: Actor, source: str) -> str:
    """The normalised source of a new alias, refused (after the actor's scope) in an alias domain."""
    normalised = store.normalised_or_refused(normalise_address, source)
    if not actor.all_domains:
        _domain_in_scope(actor, domain_of(normalised))  # outside their domains: refused alike
    if AliasDomain.objects.filter(name=domain_of(normalised)).exists():
        raise store.InvalidInput(
            gettext("%(name)s is an alias domain: its addresses are its target domain's")
            % {"name": domain_of(normalised)}
        )
    return normalised


def _new_alias(actor: Actor, source: str, destinations: Sequence[str], active: bool) -> Alias:
    """The alias row and its destinations, once scope, address and limit allow it.

    The domain row is locked first, so concurrent creations take turns at its limit and at
    the check that the address is free.
    """
    domain = _locked_domain(_domain_in_scope(actor, domain_of(source)))
    store.require_address_free(source)
    if domain.max_aliases and domain.aliases.addresses().count() >= domain.max_aliases:
        raise store.LimitReached(
            gettext("domain %(name)s already has its maximum of %(count)d aliases")
            % {"name": domain.name, "count": domain.max_aliases}
        )
    alias = Alias.objects.create(source=source, domain=domain, active=active)
    _replace_destinations(alias, destinations)
    return alias


def _apply(
    actor: Actor, alias: Alias, destinations: Sequence[str] | None, active: bool | None, *, object_type: str
) -> None:
    before = {"destinations": destinations_of(alias), "active": alias.active}
    after: dict = {}
    if destinations is not None:
        after["destinations"] = list(destinations)
        _replace_destinations(alias, destinations)
        _require_valid_destinations(actor, alias.domain, alias.source, destinations)
    if active is not None:
        after["active"] = active
        Alias.objects.filter(pk=alias.pk).update(active=active)
        alias.active = active
    changes = audit.changed_fields(before, after)
    if changes:
        audit.record(actor, "update", object_type, alias.source, domain=alias.domain, changes=changes)


def _replace_destinations(alias: Alias, destinations: Sequence[str]) -> None:
    AliasDestination.objects.filter(alias=alias).delete()
    AliasDestination.objects.bulk_create(
        AliasDestination(alias=alias, address=address) for address in destinations
    )


def _normalised_destinations(destinations: Iterable[str]) -> tuple[str, ...]:
    try:
        return aliascsv.normalise_destinations(list(destinations))
    except ValueError as error:
        raise store.InvalidInput(str(error), field="destinations") from None


def _require_valid_destinations(
    actor: Actor, domain: Domain, source: str, destinations: Sequence[str]
) -> None:
    """Each destination allowed to this actor and existing if local; then no loop, as saved."""
    for destination in destinations:
        _require_allowed_destination(actor, domain, destination)
    entry = expansion.AliasEntry(None, source, tuple(destinations))
    try:
        expansion.check_alias(source, destinations, store.StoreDirectory(proposed=entry))
    except expansion.ExpansionError as error:
        raise store.InvalidInput(
            gettext("%(source)s refused: %(reason)s") % {"source": source, "reason": error}
        ) from None


def _require_allowed_destination(actor: Actor, domain: Domain, destination: str) -> None:
    destination_domain = domain_of(destination)
    hosted = Domain.objects.filter(name=destination_domain).first()
    alias_domain = AliasDomain.objects.filter(name=destination_domain).select_related("target").first()
    if hosted is None and alias_domain is None:
        if not actor.all_domains and not domain.allow_outside_destinations:
            raise NotPermitted(
                gettext(
                    "not permitted: %(name)s does not allow forwarding to outside addresses (%(address)s)"
                )
                % {"name": domain.name, "address": destination}
            )
        return
    owner = hosted if hosted is not None else alias_domain.target
    if not actor.may_see_domain(owner.pk):
        raise NotPermitted(
            gettext("not permitted: %(name)s is not a domain you administer") % {"name": destination_domain}
        )
    if alias_domain is not None:
        local = destination.rpartition("@")[0]
        raise store.InvalidInput(
            gettext("%(address)s is in the alias domain %(name)s: name %(instead)s instead")
            % {"address": destination, "name": alias_domain.name, "instead": f"{local}@{owner.name}"}
        )
    if store.find_mailbox(destination) is None and not Alias.objects.filter(source=destination).exists():
        raise store.InvalidInput(
            gettext("%(address)s is neither a mailbox nor an alias") % {"address": destination}
        )


def _any_source(source: str) -> str:
    """``local@domain`` or a catch-all's ``@domain``, normalised, or refused."""
    try:
        return aliascsv.normalise_source(source)
    except ValueError as error:
        raise store.InvalidInput(str(error)) from None


def _alias_in_scope(actor: Actor, source: str) -> Alias:
    """The alias, if the actor's scope covers its domain; outside it, refused alike."""
    normalised = _any_source(source)
    alias = Alias.objects.select_related("domain").filter(source=normalised).first()
    if alias is not None and actor.may_see_domain(alias.domain_id):
        return alias
    if not actor.all_domains:
        _domain_in_scope(actor, domain_of(normalised))
    raise store.AliasNotFound(gettext("no such alias: %(address)s") % {"address": normalised})


def _locked(alias: Alias) -> Alias:
    locked = Alias.objects.select_for_update().select_related("domain").filter(pk=alias.pk).first()
    if locked is None:
        raise store.AliasNotFound(gettext("no such alias: %(address)s") % {"address": alias.source})
    return locked


def _locked_domain(domain: Domain) -> Domain:
    return Domain.objects.select_for_update().get(pk=domain.pk)


@contextmanager
def _naming_line(row: aliascsv.Row) -> Iterator[None]:
    try:
        yield
    except store.StoreError as error:
        raise type(error)(gettext("line %(line)d: %(error)s") % {"line": row.line, "error": error}) from None


# --- Alias domains ---------------------------------------------------------------------------


def create_alias_domain(actor: Actor, name: str, target: str) -> AliasDomain:
    """Make ``name`` another name of the hosted domain ``target``: ``user@name`` is ``user@target``."""
    _require_domain_manager(actor, CREATING_ALIAS_DOMAINS_REFUSED)
    alias_name = store.normalised_or_refused(normalise_domain, name)
    with transaction.atomic():
        target_domain = _locked_domain(store.get_domain(target))
        if alias_name == target_domain.name:
            raise store.InvalidInput(
                gettext("%(name)s cannot be an alias domain of itself") % {"name": alias_name}
            )
        store.require_domain_name_free(alias_name)
        alias_domain = AliasDomain.objects.create(name=alias_name, target=target_domain)
        _recheck_aliases_into(alias_name)
        changes = {"target": [None, target_domain.name]}
        audit.record(actor, "create", "alias domain", alias_name, domain=target_domain, changes=changes)
    return alias_domain


def delete_alias_domain(actor: Actor, name: str) -> None:
    _require_domain_manager(actor, DELETING_ALIAS_DOMAINS_REFUSED)
    alias_name = store.normalised_or_refused(normalise_domain, name)
    with transaction.atomic():
        alias_domain = AliasDomain.objects.select_related("target").filter(name=alias_name).first()
        if alias_domain is None:
            raise store.DomainNotFound(gettext("no such alias domain: %(name)s") % {"name": alias_name})
        alias_domain.delete()
        changes = {"target": [alias_domain.target.name, None]}
        audit.record(actor, "delete", "alias domain", alias_name, domain=alias_domain.target, changes=changes)


def _recheck_aliases_into(domain_name: str) -> None:
    """Aliases forwarding into a name that just became local may now loop: check them again."""
    sources = Alias.objects.filter(destinations__address__endswith=f"@{domain_name}").values_list(
        "source", flat=True
    )
    for source in sources.distinct():
        try:
            expansion.expand(source, store.StoreDirectory())
        except expansion.ExpansionError as error:
            raise store.InvalidInput(
                gettext("refused: the alias %(source)s would loop: %(reason)s")
                % {"source": source, "reason": error}
            ) from None
