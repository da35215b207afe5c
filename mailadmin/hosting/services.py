"""The service layer: every change a person or system makes, as a function taking the actor first.

Each function checks the actor's scope, leaves the row-level rules to the store, and writes its
audit entry in the same transaction as the change. Commands, admin pages and the API are doors
onto these functions and hold no rules of their own.

The scope rule, written once here: an actor whose scope is every domain (the command line, a
superuser) may do everything. A domain administrator, within the domains they administer only,
may create, change, delete and set passwords of mailboxes, kick their sessions, recalculate
their quota, and change a domain's ``DOMAIN_ADMINISTRATOR_SETTINGS``; they may not create,
delete, suspend or reactivate a domain, change its quota cap or mailbox limit, or make
administrators. Outside their domains every request is refused alike, whether or not the
domain or mailbox exists, so a refusal reveals nothing. Aliases, catch-alls and alias domains
follow the same rule (``aliases``, whose docstring says what it adds for destinations). A
person also needs a permission of its own for each action beyond editing: ``kick_pop3session``
to kick, ``set_mailbox_password`` to reset a password, ``suspend_mailbox`` to suspend or resume,
``recalculate_quota`` to recount usage (domain administrators have these four),
``view_message_body`` to read mail (nobody has it unless given). Viewing is not enough.

Passwords are hashed before a function opens its transaction: argon2 costs ~100 ms and
~100 MiB a hash, and a transaction held meanwhile stalls deliveries and logins.
"""

import ipaddress
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import TextIO

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.contrib.auth.models import Group, Permission
from django.db import transaction
from django.db.models import QuerySet
from django.db.models.functions import Now
from django.utils import timezone
from django.utils.translation import gettext, gettext_lazy

from mailadmin.addresses import domain_of, normalise_address, normalise_domain
from mailadmin.api.models import ApiToken
from mailadmin.hosting import audit, history, mailboxcsv, scopes, store, tokens
from mailadmin.hosting.actors import Actor, ActorKind
from mailadmin.models import (
    Alias,
    AliasDomain,
    AuditEntry,
    Domain,
    DomainAdministrator,
    Mailbox,
    Message,
    Pop3Session,
)

DOMAIN_CREATION_SETTINGS = ("quota_bytes", "max_mailboxes", "default_mailbox_quota_bytes")
DOMAIN_ADMINISTRATOR_SETTINGS = frozenset(
    {"default_mailbox_quota_bytes", "quota_warning_percents", "language"}
)
ADMINISTRATORS_GROUP = "Domain administrators"
DRY_RUN_SALT = "dryrun"
KICK_PERMISSION = "mailadmin.kick_pop3session"
SET_PASSWORD_PERMISSION = "mailadmin.set_mailbox_password"
SUSPEND_PERMISSION = "mailadmin.suspend_mailbox"
READ_BODY_PERMISSION = "mailadmin.view_message_body"
RECALCULATE_PERMISSION = "mailadmin.recalculate_quota"
# What the admin lets a domain administrator do; scopes narrow every one to their domains.
ADMINISTRATOR_PERMISSIONS = (
    "view_domain",
    "change_domain",
    "view_mailbox",
    "recalculate_quota",
    "add_mailbox",
    "change_mailbox",
    "delete_mailbox",
    "set_mailbox_password",
    "suspend_mailbox",
    "view_message",
    "view_pop3session",
    "kick_pop3session",
    "view_authfailure",
    "view_auditentry",
    "view_alias",
    "add_alias",
    "change_alias",
    "delete_alias",
    "view_domaincatchall",
    "add_domaincatchall",
    "change_domaincatchall",
    "delete_domaincatchall",
    "view_aliasdomain",
)


# Refusals given in more than one place; each translated as one whole sentence.
CREATING_DOMAINS_REFUSED = gettext_lazy("not permitted: only an operator of every domain may create domains")
DELETING_DOMAINS_REFUSED = gettext_lazy("not permitted: only an operator of every domain may delete domains")
EVERY_DOMAIN_TOKEN_REFUSED = gettext_lazy(
    "not permitted: only an operator of every domain may make a token for every domain"
)
PASSWORD_PERMISSION_MISSING = gettext_lazy("not permitted: resetting passwords needs the password permission")


class NotPermitted(store.StoreError):
    """The actor's scope does not cover the request."""


class OutOfScope(NotPermitted):
    """The domain (or what is in it) lies outside the actor's domains, whether or not it exists:
    a door may answer it as "not found", as it would an object that does not exist."""


class MessageNotFound(store.StoreError):
    """No message by that id within the actor's scope."""


@dataclass(frozen=True)
class NewMailbox:
    mailbox: Mailbox
    generated_password: str | None


@dataclass(frozen=True)
class MessageText:
    """The start of a message, as much as a person is shown of it."""

    message: Message
    text: str
    shown_bytes: int
    truncated: bool


# --- Scope checks ----------------------------------------------------------------------------


def may_manage_domains(actor: Actor) -> bool:
    """Create, delete, suspend domains and change their caps: operators of every domain only."""
    return actor.all_domains


def editable_domain_settings(actor: Actor) -> frozenset[str]:
    return store.DOMAIN_SETTINGS if may_manage_domains(actor) else DOMAIN_ADMINISTRATOR_SETTINGS


def _require_domain_manager(actor: Actor, refusal: str) -> None:
    """``refusal``: the whole message (such as ``CREATING_DOMAINS_REFUSED``), so each is
    translated as one sentence."""
    _require(may_manage_domains(actor), refusal)


def _person_has(actor: Actor, permission: str) -> bool:
    """A person needs ``permission`` on top of their scope; the command line and tokens are
    bounded by their scope alone (each door that gives tokens an action says so)."""
    if actor.kind != ActorKind.USER:
        return True
    user = get_user_model().objects.filter(pk=actor.user_id).first()
    return user is not None and user.has_perm(permission)


def _require(allowed: bool, refusal: str) -> None:
    if not allowed:
        raise NotPermitted(str(refusal))


def may_set_password(actor: Actor) -> bool:
    return _person_has(actor, SET_PASSWORD_PERMISSION)


def may_suspend_mailboxes(actor: Actor) -> bool:
    return _person_has(actor, SUSPEND_PERMISSION)


def may_read_bodies(actor: Actor) -> bool:
    """Reading mail is for people given the permission, and the command line; no token."""
    return actor.kind != ActorKind.TOKEN and _person_has(actor, READ_BODY_PERMISSION)


def _domain_in_scope(actor: Actor, name: str) -> Domain:
    domain_name = store.normalised_or_refused(normalise_domain, name)
    if actor.all_domains:
        return store.get_domain(domain_name)
    domain = Domain.objects.filter(name=domain_name, pk__in=actor.domain_ids).first()
    if domain is None:
        raise OutOfScope(
            gettext("not permitted: %(name)s is not a domain you administer") % {"name": domain_name}
        )
    return domain


def _mailbox_in_scope(actor: Actor, address: str) -> Mailbox:
    """The mailbox, if the actor's scope covers the domain it belongs to (its row, not its name)."""
    normalised = store.normalised_or_refused(normalise_address, address)
    if actor.all_domains:
        return store.get_mailbox(normalised)
    mailbox = store.find_mailbox(normalised)
    if mailbox is not None and mailbox.domain_id in actor.domain_ids:
        return mailbox
    _domain_in_scope(actor, domain_of(normalised))  # outside their domains: refused alike
    raise store.MailboxNotFound(gettext("no such mailbox: %(address)s") % {"address": normalised})


# --- Domains ---------------------------------------------------------------------------------


def create_domain(
    actor: Actor,
    name: str,
    *,
    quota_bytes: int = 0,
    max_mailboxes: int = 0,
    default_mailbox_quota_bytes: int = 0,
) -> Domain:
    _require_domain_manager(actor, CREATING_DOMAINS_REFUSED)
    settings = {
        "quota_bytes": quota_bytes,
        "max_mailboxes": max_mailboxes,
        "default_mailbox_quota_bytes": default_mailbox_quota_bytes,
    }
    with transaction.atomic():
        domain = store.create_domain(name, **settings)
        audit.record(actor, "create", "domain", domain.name, domain=domain, changes=_created(settings))
    return domain


def update_domain(actor: Actor, name: str, **settings: int | bool | str) -> Domain:
    """Change only the settings given (see ``store.DOMAIN_SETTINGS``); return the domain as saved."""
    _domain_in_scope(actor, name)  # another's domain is refused alike, whatever the settings
    refused = sorted(set(settings) & store.DOMAIN_SETTINGS - editable_domain_settings(actor))
    if refused:
        raise NotPermitted(
            gettext("not permitted: only an operator of every domain may change %(names)s")
            % {"names": ", ".join(refused)}
        )
    with transaction.atomic():
        domain = _locked_domain(_domain_in_scope(actor, name))
        changes = audit.changed_fields({field: getattr(domain, field, None) for field in settings}, settings)
        store.update_domain_settings(domain.pk, settings)
        if changes:
            action = _change_action(changes)
            audit.record(actor, action, "domain", domain.name, domain=domain, changes=changes)
    domain.refresh_from_db()
    return domain


@dataclass(frozen=True)
class Saved:
    """What a create-or-update call left: the row as stored, and whether it was made just now."""

    row: Domain | Mailbox | Alias
    created: bool


def save_domain(actor: Actor, name: str, **settings: int | bool | str) -> Saved:
    """Create the domain with these settings, or change an existing one's to them.

    Safe to repeat: the second call changes nothing. Creating needs an operator of every
    domain; an actor confined to some domains gets the same refusal for any other domain,
    whether it exists or not.
    """
    try:
        existing = _domain_in_scope(actor, name)
    except store.DomainNotFound:
        existing = None
    if existing is not None:
        return Saved(update_domain(actor, existing.name, **settings), created=False)
    creation = {field: settings.pop(field) for field in DOMAIN_CREATION_SETTINGS if field in settings}
    try:
        with transaction.atomic():
            domain = create_domain(actor, name, **creation)
            if settings:
                domain = update_domain(actor, domain.name, **settings)
    except store.AlreadyExists:  # made meanwhile by a concurrent call: set it as asked
        return Saved(update_domain(actor, name, **creation, **settings), created=False)
    return Saved(domain, created=True)


def set_domain_active(actor: Actor, name: str, active: bool) -> Domain:
    """Suspend (``active=False``) or reactivate a domain: its mailboxes can neither log in nor receive."""
    return update_domain(actor, name, active=active)


def delete_domain(actor: Actor, name: str, *, force: bool = False) -> None:
    """Delete a domain; refused while anything is still in it (see
    ``store.domain_deletion_refusal``), unless ``force`` deletes that first in the same
    transaction, each thing with its own audit entry."""
    found = _domain_in_scope(actor, name)  # another's domain is refused alike, existing or not
    _require_domain_manager(actor, DELETING_DOMAINS_REFUSED)
    with transaction.atomic():
        if force:
            _delete_domain_contents(actor, found)
        domain = store.delete_domain(found.name)
        changes = _deleted(domain)
        audit.record(actor, "delete", "domain", domain.name, domain_name=domain.name, changes=changes)


def _delete_domain_contents(actor: Actor, domain: Domain) -> None:
    """The domain's mailboxes with their mail, its aliases and catch-all, and its alias domains."""
    from mailadmin.hosting import aliases  # built on this module's scope checks: imported late

    # Every mailbox locked first, in id order, before the first delete charges the domain's row
    # back: mailbox then domain, the order a delivery and a POP3 QUIT take them in.
    in_domain = Mailbox.objects.select_for_update(of=("self",)).filter(domain=domain)
    list(in_domain.order_by("pk").values_list("pk", flat=True))
    for mailbox in list_mailboxes(actor, domain.name):
        delete_mailbox(actor, mailbox.address)
    for alias in aliases.list_aliases(actor, domain.name):
        aliases.delete_alias(actor, alias.source)
    for alias_domain in AliasDomain.objects.filter(target=domain).order_by("name"):
        aliases.delete_alias_domain(actor, alias_domain.name)


def domain_deletion_refusal(actor: Actor, name: str) -> str | None:
    """Why ``delete_domain`` would refuse this actor this domain now, or None."""
    try:
        _require_domain_manager(actor, DELETING_DOMAINS_REFUSED)
        return store.domain_deletion_refusal(store.get_domain(name))
    except store.StoreError as error:
        return str(error)


def _locked_domain(domain: Domain) -> Domain:
    return Domain.objects.select_for_update().get(pk=domain.pk)


def _change_action(changes: dict) -> str:
    if set(changes) == {"active"}:
        return "activate" if changes["active"][1] else "suspend"
    return "update"


def _created(settings: dict) -> dict[str, list]:
    return {field: [None, value] for field, value in settings.items()}


def _deleted(domain: Domain) -> dict[str, list]:
    return {
        field: [getattr(domain, field), None]
        for field in ("quota_bytes", "max_mailboxes", "default_mailbox_quota_bytes")
    }


# --- Mailboxes -------------------------------------------------------------------------------


def create_mailbox(
    actor: Actor,
    address: str,
    *,
    password: str | None = None,
    password_hash: str | None = None,
    quota_bytes: int | None = None,
    quota_messages: int = 0,
    create_domain: bool = False,
) -> NewMailbox:
    """Create a mailbox and its login; ``quota_bytes=None`` takes the domain's default quota.

    With neither ``password`` nor ``password_hash`` a random password is generated and returned
    once in ``generated_password``. ``create_domain`` creates a missing domain first, which only
    a domain manager may do.
    """
    normalised = store.normalised_or_refused(normalise_address, address)
    domain_name = domain_of(normalised)
    if create_domain:
        _require_domain_manager(actor, CREATING_DOMAINS_REFUSED)
    elif not actor.all_domains:
        _domain_in_scope(actor, domain_name)
    generated = None
    if password is None and password_hash is None:
        generated = password = store.generate_password()
    if password is not None and password_hash is None:
        password_hash, password = store.hash_new_password(password, normalised), None
    with transaction.atomic():
        domain_existed = not create_domain or Domain.objects.filter(name=domain_name).exists()
        mailbox = store.create_mailbox(
            address,
            password=password,
            password_hash=password_hash,
            quota_bytes=quota_bytes,
            quota_messages=quota_messages,
            create_domain=create_domain,
        )
        if not domain_existed:
            audit.record(actor, "create", "domain", domain_name, domain=mailbox.domain)
        _creation_entry(actor, mailbox).save(force_insert=True)
    return NewMailbox(mailbox, generated)


def update_mailbox(actor: Actor, address: str, **settings: int | bool) -> Mailbox:
    """Change only the settings given (see ``store.MAILBOX_SETTINGS``); return the mailbox as saved.

    Suspending (``active=False``) ends the mailbox's open sessions: runpop3's monitor ends every
    session whose mailbox is no longer usable, and the authenticator refuses its logins.
    """
    _require_settings_permitted(actor, settings)
    with transaction.atomic():
        locked = _locked_mailbox(_mailbox_in_scope(actor, address))
        _apply_mailbox_settings(actor, locked, settings)
    return locked


def _require_settings_permitted(actor: Actor, settings: dict) -> None:
    if "active" in settings:
        _require(
            may_suspend_mailboxes(actor),
            gettext("not permitted: suspending mailboxes needs the suspend permission"),
        )


def _locked_mailbox(mailbox: Mailbox) -> Mailbox:
    """The mailbox's row and its login's as they are now, locked until the transaction ends, with
    its domain."""
    locked = Mailbox.objects.select_for_update(of=("self", "user")).select_related("user", "domain")
    try:
        return locked.get(pk=mailbox.pk)
    except Mailbox.DoesNotExist:  # deleted since it was found
        raise store.MailboxNotFound(
            gettext("no such mailbox: %(address)s") % {"address": mailbox.address}
        ) from None


def _apply_mailbox_settings(actor: Actor, locked: Mailbox, settings: dict) -> None:
    """Write ``settings`` to a locked mailbox through the store, audit what changed, and show it
    on ``locked``."""
    changes = audit.changed_fields({field: getattr(locked, field, None) for field in settings}, settings)
    store.update_mailbox_settings(locked.pk, settings)
    for field, value in settings.items():
        setattr(locked, field, value)
    if changes:
        action = _change_action(changes)
        audit.record(actor, action, "mailbox", locked.address, domain=locked.domain, changes=changes)


def save_mailbox(
    actor: Actor,
    address: str,
    *,
    password: str | None = None,
    password_hash: str | None = None,
    **settings: int | bool,
) -> Saved:
    """Create the mailbox with these settings, or change an existing one's to them.

    Safe to repeat after a timeout: the second call leaves the same state. Creating needs a
    password or a password hash; on an existing mailbox either one, if given, replaces the
    password (the one it has already is left as it is, its sessions open), and settings not
    given are left alone.
    """
    if password is not None and password_hash is not None:
        raise store.InvalidInput(
            gettext("give a password or a password hash, not both"), field="password_hash"
        )
    try:
        existing = _mailbox_in_scope(actor, address)
    except store.MailboxNotFound:
        existing = None
    address = existing.address if existing is not None else address
    if existing is not None and password is not None:
        _require(may_set_password(actor), PASSWORD_PERMISSION_MISSING)  # before any comparison
        if store.is_current_password(existing, password):  # a repeated PUT: no hash to write
            try:
                kept = _update_mailbox_and_password(actor, existing, None, settings, compared_with=existing)
                return Saved(kept, created=False)
            except _PasswordChangedMeanwhile:
                pass  # another writer set a password since the comparison: set this one after all
    if password is not None:
        password_hash = store.hash_new_password(password, normalise_address(address))
    elif password_hash is not None:
        with _about_field("password_hash"):
            password_hash = store.storable_password_hash(password_hash)
    if existing is not None:
        return Saved(_update_mailbox_and_password(actor, existing, password_hash, settings), created=False)
    if password_hash is None:
        raise store.InvalidInput(
            gettext("a new mailbox needs a password or a password hash"), field="password"
        )
    # A suspension that follows the creation shares its transaction; alone, the creation has its own.
    suspending = settings.get("active") is False
    try:
        with transaction.atomic() if suspending else nullcontext():
            mailbox = create_mailbox(
                actor,
                address,
                password_hash=password_hash,
                quota_bytes=settings.get("quota_bytes"),
                quota_messages=settings.get("quota_messages", 0),
            ).mailbox
            if suspending:
                mailbox = update_mailbox(actor, mailbox.address, active=False)
    except store.AlreadyExists:  # made meanwhile by a concurrent call: set it as asked
        existing = _mailbox_in_scope(actor, address)
        return Saved(_update_mailbox_and_password(actor, existing, password_hash, settings), created=False)
    return Saved(mailbox, created=True)


class _PasswordChangedMeanwhile(Exception):
    """A password was set on the mailbox after a given one was compared with its login's hash."""


def _update_mailbox_and_password(
    actor: Actor,
    mailbox: Mailbox,
    password_hash: str | None,
    settings: dict,
    compared_with: Mailbox | None = None,
) -> Mailbox:
    """``update_mailbox`` and then ``set_password_hash`` of ``mailbox`` (found in the actor's scope),
    in one transaction that locks its row and its login's once. The mailbox's own hash is not
    written again (``store.is_current_password_hash``): that would audit a change that is none
    and end the mailbox's sessions. ``compared_with``: the mailbox as read when a password given
    was found to be its own; if another password has been set since, nothing is written and
    _PasswordChangedMeanwhile is raised."""
    _require_settings_permitted(actor, settings)
    if password_hash is not None:
        _require(may_set_password(actor), PASSWORD_PERMISSION_MISSING)
    with transaction.atomic():
        locked = _locked_mailbox(mailbox)
        if compared_with is not None and store.password_set_since(compared_with, locked):
            raise _PasswordChangedMeanwhile()
        _apply_mailbox_settings(actor, locked, settings)
        if password_hash is not None and not store.is_current_password_hash(locked, password_hash):
            _apply_password_hash(actor, locked, password_hash)
    return locked


@contextmanager
def _about_field(name: str) -> Iterator[None]:
    """A refusal raised inside is about the input ``name`` (unless it names one already)."""
    try:
        yield
    except store.StoreError as error:
        error.field = error.field or name
        raise


def get_domain(actor: Actor, name: str) -> Domain:
    return _domain_in_scope(actor, name)


def get_mailbox(actor: Actor, address: str) -> Mailbox:
    return _mailbox_in_scope(actor, address)


def set_mailbox_active(actor: Actor, address: str, active: bool) -> Mailbox:
    """Resume (``active=True``) or suspend a mailbox; see ``update_mailbox``."""
    return update_mailbox(actor, address, active=active)


def set_password(actor: Actor, address: str, password: str) -> Mailbox:
    """Replace a mailbox's password. Its open sessions end: runpop3's monitor ends every session
    whose mailbox's password hash is no longer the one it logged in with."""
    _require(may_set_password(actor), PASSWORD_PERMISSION_MISSING)
    mailbox = _mailbox_in_scope(actor, address)
    return set_password_hash(actor, mailbox.address, store.hash_new_password(password, mailbox.address))


def set_password_hash(actor: Actor, address: str, password_hash: str) -> Mailbox:
    _require(may_set_password(actor), PASSWORD_PERMISSION_MISSING)
    with transaction.atomic():
        mailbox = _locked_mailbox(_mailbox_in_scope(actor, address))  # mailbox, then login: as all do
        _apply_password_hash(actor, mailbox, password_hash)
    return mailbox


def _apply_password_hash(actor: Actor, mailbox: Mailbox, password_hash: str) -> None:
    with _about_field("password_hash"):
        store.replace_password_hash(mailbox, password_hash)
    _record_password_change(actor, mailbox)


def _record_password_change(actor: Actor, mailbox: Mailbox) -> None:
    changes = {"password": audit.SECRET_CHANGED}
    audit.record(actor, "set password", "mailbox", mailbox.address, domain=mailbox.domain, changes=changes)


def delete_mailbox(actor: Actor, address: str) -> int:
    """Delete a mailbox, its login and its mail; return the number of messages removed."""
    with transaction.atomic():
        mailbox = _mailbox_in_scope(actor, address)
        removed = store.delete_mailbox(mailbox.address)
        changes = {"quota_bytes": [mailbox.quota_bytes, None], "messages": [removed, None]}
        audit.record(actor, "delete", "mailbox", mailbox.address, domain=mailbox.domain, changes=changes)
    return removed


def list_mailboxes(actor: Actor, domain_name: str | None = None) -> list[Mailbox]:
    mailboxes = _visible_mailboxes(actor, domain_name).select_related("user", "domain")
    return list(mailboxes.order_by("domain__name", "user__username"))


def count_legacy_hashes(actor: Actor, domain_name: str | None = None) -> int:
    """How many of the mailboxes ``list_mailboxes`` lists still have an imported password hash."""
    return _visible_mailboxes(actor, domain_name).legacy_hash().count()


def _visible_mailboxes(actor: Actor, domain_name: str | None):
    mailboxes = scopes.visible_to(actor, Mailbox)
    if domain_name is not None:
        mailboxes = mailboxes.filter(domain=_domain_in_scope(actor, domain_name))
    return mailboxes


def import_mailboxes(
    actor: Actor,
    handle: TextIO,
    *,
    dry_run: bool = False,
    progress: Callable[[list[mailboxcsv.Row]], Iterable[mailboxcsv.Row]] = iter,
    parse: Callable[[TextIO], list[mailboxcsv.Row]] = mailboxcsv.parse,
) -> list[Mailbox]:
    """Create every mailbox of an import file or, on any error, none.

    ``parse`` reads the file: the CSV (``mailboxcsv.parse``, the default) or Dovecot's
    passwd-file (``dovecotpasswd.parse``).

    Each row's domain, password or hash is checked first, so a wrong row costs no hashing; then
    plain passwords are hashed one row at a time, outside any transaction; then every row is
    written in one short transaction. ``progress`` wraps the rows while they are hashed (a
    progress bar). A refusal names the line. ``dry_run`` checks every rule the same way and
    rolls the transaction back; it stores nothing, so it hashes nothing either.
    """
    return import_mailbox_rows(actor, parse(handle), dry_run=dry_run, progress=progress)


def import_mailbox_rows(
    actor: Actor,
    rows: list[mailboxcsv.Row],
    *,
    dry_run: bool = False,
    progress: Callable[[list[mailboxcsv.Row]], Iterable[mailboxcsv.Row]] = iter,
) -> list[Mailbox]:
    """``import_mailboxes`` for rows already parsed (``mailboxcsv.parse`` or ``from_records``)."""
    domains_in_scope: set[str] = set()
    for row in rows:
        with _naming_line(row):
            if domain_of(row.address) not in domains_in_scope:
                domains_in_scope.add(_domain_in_scope(actor, domain_of(row.address)).name)
            if row.password is not None:
                store.validate_new_password(row.password, row.address)
            else:
                store.check_password_hash(row.password_hash)
    hash_row = _stand_in_hash if dry_run else _password_hash
    hashed = [(row, hash_row(row)) for row in progress(rows)]
    batch = [
        store.NewMailbox(row.address, password_hash, row.quota_bytes, row.quota_messages)
        for row, password_hash in hashed
    ]
    with transaction.atomic():
        try:
            created = store.create_mailboxes(batch)
        except store.BatchRefusal as refusal:
            raise rows[refusal.index].refusal(refusal.error) from None
        audit.record_many([_creation_entry(actor, mailbox) for mailbox in created])
        if dry_run:
            transaction.set_rollback(True)
    return created


def _stand_in_hash(row: mailboxcsv.Row) -> str:
    """For a dry run, which writes nothing: the row's hash, or a cheap one in place of argon2."""
    if row.password_hash is not None:
        return row.password_hash
    return PBKDF2PasswordHasher().encode(row.password, DRY_RUN_SALT, iterations=1)


def _password_hash(row: mailboxcsv.Row) -> str:
    if row.password_hash is not None:
        return row.password_hash
    with _naming_line(row):
        return store.hash_new_password(row.password, row.address)


def _creation_entry(actor: Actor, mailbox: Mailbox) -> AuditEntry:
    """The audit entry of a new mailbox, as ``create_mailbox`` writes it."""
    settings = {"active": True, "quota_bytes": mailbox.quota_bytes, "quota_messages": mailbox.quota_messages}
    changes = {**_created(settings), "password": audit.SECRET_CHANGED}
    return audit.unsaved(actor, "create", "mailbox", mailbox.address, domain=mailbox.domain, changes=changes)


@contextmanager
def _naming_line(row: mailboxcsv.Row) -> Iterator[None]:
    try:
        yield
    except store.StoreError as error:
        raise row.refusal(error) from None


def may_recalculate_quota(actor: Actor) -> bool:
    """A person needs the recalculate permission (viewing mailboxes is not enough); the command
    line is bounded by its scope alone. Tokens recount nothing until the API gives them a write
    scope."""
    return actor.kind != ActorKind.TOKEN and _person_has(actor, RECALCULATE_PERMISSION)


def recalculate_quota(
    actor: Actor, address: str | None = None, *, domain_name: str | None = None
) -> list[store.Drift]:
    """Recount usage counters from the stored messages: of one mailbox, of one domain's mailboxes,
    or of every mailbox in scope (the default).

    Each row is corrected in its own transaction with its audit entry, so a full recount
    never holds every mailbox at once.
    """
    _require(
        may_recalculate_quota(actor),
        gettext("not permitted: recalculating quota needs the recalculate permission"),
    )

    def record(drifts: list[store.Drift]) -> None:
        _record_drifts(actor, drifts)

    if address is not None:
        return store.recalculate_quota(_mailbox_in_scope(actor, address).address, record=record)
    if domain_name is not None:
        domain_ids = frozenset({_domain_in_scope(actor, domain_name).pk})
        return store.recalculate_quota(domain_ids=domain_ids, record=record)
    return store.recalculate_quota(domain_ids=actor.domain_ids, record=record)


def _record_drifts(actor: Actor, drifts: list[store.Drift]) -> None:
    by_subject: dict[str, dict[str, list[int]]] = {}
    for drift in drifts:
        by_subject.setdefault(drift.subject, {})[drift.counter] = [drift.recorded, drift.actual]
    domains = Domain.objects.in_bulk(
        {subject.rpartition("@")[2] for subject in by_subject}, field_name="name"
    )
    for subject, changes in by_subject.items():
        object_type = "mailbox" if "@" in subject else "domain"
        domain = domains.get(subject.rpartition("@")[2])
        audit.record(actor, "recalculate quota", object_type, subject, domain=domain, changes=changes)


# --- Messages --------------------------------------------------------------------------------


def read_message_body(actor: Actor, message_id: int | str, limit_bytes: int) -> MessageText:
    """The first ``limit_bytes`` of a message, for a person allowed to read mail; each reading
    is recorded (who, which message, when) before anything is read.

    Chunks are read one at a time and no further than the limit, so a 50 MiB message costs
    what its first chunk or two cost.
    """
    _require(
        may_read_bodies(actor),
        gettext("not permitted: reading messages needs the permission to read message bodies"),
    )
    message = (
        scopes.visible_to(actor, Message)
        .select_related("mailbox__user", "mailbox__domain")
        .filter(pk=_message_pk(message_id))
        .first()
    )
    if message is None:
        raise MessageNotFound(gettext("no such message: %(id)s") % {"id": message_id})
    mailbox = message.mailbox
    with transaction.atomic():
        name = f"{mailbox.address} {message.uidl}"
        audit.record(
            actor, "read", "message", name, domain=mailbox.domain, changes={"message id": message.pk}
        )
    shown = bytearray()
    for chunk in store.iter_message_bytes(message.pk):
        shown += chunk[: limit_bytes - len(shown)]
        if len(shown) >= limit_bytes:
            break
    text = bytes(shown).decode("utf-8", errors="replace")
    return MessageText(message, text, len(shown), message.size_bytes > len(shown))


def _message_pk(message_id: int | str) -> int:
    try:
        return int(message_id)
    except ValueError:
        raise MessageNotFound(gettext("no such message: %(id)s") % {"id": message_id}) from None


# --- Mail imported -----------------------------------------------------------------------------


def record_mail_import(actor: Actor, mailbox: Mailbox, imported: int, source: str) -> None:
    """One audit entry for an import run: ``importmail`` stores each message through the store in
    a transaction of its own (a run may stop half way and resume), so the entry says how many
    it stored, and from where, once the run ends."""
    if not actor.may_see_domain(mailbox.domain_id):
        raise NotPermitted(
            gettext("not permitted: %(name)s is not a domain you administer") % {"name": mailbox.domain.name}
        )
    with transaction.atomic():
        audit.record(
            actor,
            "import mail",
            "mailbox",
            mailbox.address,
            domain=mailbox.domain,
            changes={"messages imported": [0, imported], "from": ["", source]},
        )


# --- History ---------------------------------------------------------------------------------


def prune_history(actor: Actor, days: int) -> history.Pruned:
    """Delete history older than ``days`` (batched, see ``history.prune_history``); every domain's
    history, so the command line's and superusers' alone. One audit entry says how much went."""
    _require_domain_manager(
        actor, gettext("not permitted: only an operator of every domain may prune the session history")
    )
    pruned = history.prune_history(days)
    with transaction.atomic():
        audit.record(
            actor,
            "prune history",
            "history",
            f"older than {days} days",
            changes={
                "ended sessions": [pruned.sessions, 0],
                "failed logins": [pruned.failures, 0],
                "hourly figures": [pruned.figures, 0],
            },
        )
    return pruned


# --- POP3 sessions ---------------------------------------------------------------------------


def may_kick(actor: Actor) -> bool:
    """A person needs the kick permission (viewing sessions is not enough); the command line and
    API tokens are bounded by their scope alone (the API lets only write tokens change anything)."""
    return _person_has(actor, KICK_PERMISSION)


def kick_sessions(
    actor: Actor, *, address: str | None = None, session_ids: Iterable[uuid.UUID | str] | None = None
) -> int:
    """Ask the POP3 servers to end open sessions of a mailbox, or the sessions named, without
    applying their deletions; return how many were newly marked."""
    if not may_kick(actor):
        raise NotPermitted(gettext("not permitted: kicking POP3 sessions needs the kick permission"))
    sessions = scopes.visible_to(actor, Pop3Session).open().filter(kick_requested_at__isnull=True)
    if address is not None:
        sessions = sessions.filter(mailbox=_mailbox_in_scope(actor, address))
    if session_ids is not None:
        sessions = sessions.filter(pk__in=list(session_ids))
    kicked = 0
    with transaction.atomic():
        for session in sessions.select_related("domain"):
            marked = Pop3Session.objects.filter(pk=session.pk, kick_requested_at__isnull=True).update(
                kick_requested_at=timezone.now(), updated_at=Now()
            )
            if marked:
                kicked += 1
                name = f"{session.username or '(no login)'} {session.pk}"
                audit.record(actor, "kick", "pop3 session", name, domain=session.domain)
    return kicked


# --- Domain administrators -------------------------------------------------------------------


@dataclass(frozen=True)
class Administrator:
    username: str
    created: bool
    domain_names: list[str]


def save_domain_administrator(
    actor: Actor, username: str, domain_names: Iterable[str], password: str | None
) -> Administrator:
    """Create a domain administrator, or give an existing one exactly these domains (and this
    password; ``None`` keeps an existing administrator's).

    An administrator is a staff login of its own, never a mailbox's login nor a superuser (whose
    scope is every domain anyway).
    """
    _require_domain_manager(
        actor, gettext("not permitted: only an operator of every domain may make domain administrators")
    )
    user_model = get_user_model()
    username = user_model.normalize_username(username.strip())
    if not username:
        raise store.InvalidInput(gettext("the username is empty"))
    domains = {domain.name: domain for domain in (store.get_domain(name) for name in domain_names)}
    if not domains:
        raise store.InvalidInput(gettext("name at least one domain"))
    password_hash = None if password is None else store.hash_new_password(password, username)
    with transaction.atomic():
        user = user_model.objects.select_for_update().filter(username=username).first()
        created = user is None
        if created and password_hash is None:
            raise store.InvalidInput(gettext("a new administrator needs a password"))
        if created:
            user = user_model(username=username)
        elif Mailbox.objects.filter(user=user).exists():
            raise store.InvalidInput(
                gettext("%(username)s is a mailbox's login; an administrator needs a login of its own")
                % {"username": username}
            )
        elif user.is_superuser:
            raise store.InvalidInput(
                gettext("%(username)s is a superuser, who administers every domain already")
                % {"username": username}
            )
        before = [] if created else sorted(user.administered_domains.values_list("domain__name", flat=True))
        user.is_staff = True
        if password_hash is not None:
            user.password = password_hash
        user.save()
        user.groups.add(_administrators_group())
        DomainAdministrator.objects.filter(user=user).exclude(domain__in=domains.values()).delete()
        for domain in domains.values():
            DomainAdministrator.objects.get_or_create(user=user, domain=domain)
        after = sorted(domains)
        changes: dict = {} if password_hash is None else {"password": audit.SECRET_CHANGED}
        if before != after:
            changes["domains"] = [before or None, after]
        audit.record(actor, "create" if created else "update", "administrator", username, changes=changes)
    return Administrator(username, created, after)


def delete_domain_administrator(actor: Actor, username: str) -> None:
    """Delete a domain administrator's login (never another kind of login)."""
    _require_domain_manager(
        actor, gettext("not permitted: only an operator of every domain may delete domain administrators")
    )
    with transaction.atomic():
        user = get_user_model().objects.filter(username=username, administered_domains__isnull=False).first()
        if user is None:
            raise store.InvalidInput(
                gettext("%(username)s is not a domain administrator") % {"username": username}
            )
        domains = sorted(user.administered_domains.values_list("domain__name", flat=True))
        user.delete()
        audit.record(actor, "delete", "administrator", username, changes={"domains": [domains, None]})


def refresh_administrators_group() -> None:
    """Give the administrators' group every permission of ``ADMINISTRATOR_PERMISSIONS``; run after
    each ``migrate``, so administrators made before a permission was added to it get it too."""
    if Group.objects.filter(name=ADMINISTRATORS_GROUP).exists():
        _administrators_group()


def _administrators_group() -> Group:
    group, _ = Group.objects.get_or_create(name=ADMINISTRATORS_GROUP)
    permissions = Permission.objects.filter(
        content_type__app_label="mailadmin", codename__in=ADMINISTRATOR_PERMISSIONS
    )
    group.permissions.add(*permissions)
    return group


# --- API tokens ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewToken:
    token: ApiToken
    secret: str  # the whole token, to show once: only its digest is stored


def create_token(
    actor: Actor,
    *,
    name: str = "",
    domain_names: Iterable[str] = (),
    scope: str = ApiToken.Scope.READ,
    expires_days: int | None = None,
    allowed_networks: Iterable[str] = (),
) -> NewToken:
    """Make an API token for the domains named, within the actor's own domains.

    A token for no domain acts on every domain, so only an operator of every domain may make
    one. ``allowed_networks`` are CIDRs (a bare address is its own network); none: anywhere.
    """
    names = list(domain_names)
    if not names:
        _require_domain_manager(actor, EVERY_DOMAIN_TOKEN_REFUSED)
    if scope not in ApiToken.Scope.values:
        raise store.InvalidInput(
            gettext("scope must be one of %(scopes)s") % {"scopes": ", ".join(ApiToken.Scope.values)},
            field="scope",
        )
    if expires_days is not None and expires_days < 1:
        raise store.InvalidInput(gettext("a token must be valid for 1 day or more"), field="expires_days")
    networks = [_network(text) for text in allowed_networks]
    issued = tokens.issue()
    with transaction.atomic():
        domains = [_domain_in_scope(actor, domain_name) for domain_name in names]
        token = ApiToken.objects.create(
            name=name.strip()[:100],
            prefix=issued.prefix,
            digest=issued.digest,
            scope=scope,
            all_domains=not domains,
            allowed_networks=",".join(networks),
            expires_at=None if expires_days is None else timezone.now() + timedelta(days=expires_days),
            created_by=actor.name,
        )
        token.domains.set(domains)
        changes = {
            "name": [None, token.name],
            "scope": [None, scope],
            "domains": [None, sorted(domain.name for domain in domains) or "all"],
            "networks": [None, networks or "any"],
            "expires": [None, token.expires_at.isoformat() if token.expires_at else "never"],
        }
        audit.record(actor, "create", "api token", token.prefix, domain=_sole(domains), changes=changes)
    return NewToken(token, issued.token)


def revoke_token(actor: Actor, prefix: str) -> ApiToken:
    """Revoke a token the actor may see (see ``tokens_visible_to``); revoking twice changes nothing."""
    with transaction.atomic():
        token = tokens_visible_to(actor).select_for_update().filter(prefix=prefix.strip()).first()
        if token is None:
            raise OutOfScope(gettext("no such token: %(prefix)s") % {"prefix": prefix.strip()})
        if token.revoked_at is None:
            token.revoked_at = timezone.now()
            token.save(update_fields=["revoked_at"])
            domain = _sole(list(token.domains.all()))
            audit.record(actor, "revoke", "api token", token.prefix, domain=domain)
    return token


def tokens_visible_to(actor: Actor) -> QuerySet:
    """Every token for an operator of every domain; otherwise the tokens confined to the actor's
    domains (a token that reaches any other domain belongs to whoever holds that one too).

    Subqueries rather than joins, so the rows need no DISTINCT and can be locked for update.
    """
    rows = ApiToken.objects.all()
    if actor.all_domains:
        return rows
    ties = ApiToken.domains.through.objects
    inside = ties.filter(domain_id__in=actor.domain_ids).values("apitoken_id")
    outside = ties.exclude(domain_id__in=actor.domain_ids).values("apitoken_id")
    return rows.filter(all_domains=False, pk__in=inside).exclude(pk__in=outside)


def token_actor(token: ApiToken, client_address: str, domain_ids: Iterable[int]) -> Actor:
    """The actor a request with ``token`` acts as; ``domain_ids`` are the token's domains (the
    caller reads them, as fast as it can: this runs for every API request)."""
    scope = None if token.all_domains else frozenset(domain_ids)
    return Actor.token(f"token:{token.prefix} {token.name}".strip(), scope, client_address)


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise store.InvalidInput(
            gettext("%(text)r is not a network (CIDR) or address") % {"text": text}, field="allowed_networks"
        ) from None


def _sole(domains: list[Domain]) -> Domain | None:
    """The domain an audit entry is filed under: the only one, so its administrators see it."""
    return domains[0] if len(domains) == 1 else None
