"""Domains, mailbox logins and their settings: the rows that hold the counters."""

import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import get_hasher, identify_hasher
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Count, F, Sum

from mailadmin.addresses import domain_of, normalise_address, normalise_domain
from mailadmin.hosting.store.errors import (
    AlreadyExists,
    DomainNotFound,
    InvalidInput,
    LimitReached,
    MailboxNotFound,
)
from mailadmin.hosting.store.fastsql import find_mailbox
from mailadmin.models import Domain, Mailbox, Message, MessageChunk, parse_percents

MAX_BIGINT = 2**63 - 1
MAX_INT32 = 2**31 - 1  # PositiveIntegerField on PostgreSQL
GENERATED_PASSWORD_BYTES = 18
MAILBOX_SETTINGS = frozenset({"active", "quota_bytes", "quota_messages"})
DOMAIN_SETTINGS = frozenset(
    {"active", "quota_bytes", "max_mailboxes", "default_mailbox_quota_bytes", "quota_warning_percents"}
)


def get_domain(name: str) -> Domain:
    domain_name = _checked(normalise_domain, name)
    try:
        return Domain.objects.get(name=domain_name)
    except Domain.DoesNotExist:
        raise DomainNotFound(f"no such domain: {domain_name}") from None


def get_mailbox(address: str) -> Mailbox:
    normalised = _checked(normalise_address, address)
    mailbox = find_mailbox(normalised)
    if mailbox is None:
        raise MailboxNotFound(f"no such mailbox: {normalised}")
    return mailbox


@dataclass(frozen=True)
class NewMailbox:
    mailbox: Mailbox
    generated_password: str | None


def create_mailbox(
    address: str,
    *,
    password: str | None = None,
    password_hash: str | None = None,
    quota_bytes: int | None = None,
    quota_messages: int = 0,
    create_domain: bool = False,
) -> NewMailbox:
    """Create the login user and its mailbox.

    With neither ``password`` nor ``password_hash`` a random password is generated and
    returned once in ``generated_password``. ``quota_bytes=None`` takes the domain's default.
    """
    normalised = _checked(normalise_address, address)
    if password is not None and password_hash is not None:
        raise InvalidInput("give a password or a password hash, not both")
    if password_hash is not None:
        check_password_hash(password_hash)
    generated = None
    if password is None and password_hash is None:
        generated = password = secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
    if quota_bytes is not None:
        _require_in_range(quota_bytes=quota_bytes)
    _require_in_range(MAX_INT32, quota_messages=quota_messages)
    if password is not None:
        validate_new_password(password, normalised)
    with transaction.atomic():
        domain = _domain_for_new_mailbox(domain_of(normalised), create_domain)
        user_model = get_user_model()
        if user_model.objects.filter(username=normalised).exists():
            raise AlreadyExists(f"mailbox {normalised} already exists")
        user = user_model(username=normalised, email=normalised)
        if password_hash is not None:
            user.password = password_hash
        else:
            user.set_password(password)
        user.save()
        mailbox = Mailbox.objects.create(
            user=user,
            domain=domain,
            quota_bytes=domain.default_mailbox_quota_bytes if quota_bytes is None else quota_bytes,
            quota_messages=quota_messages,
        )
    return NewMailbox(mailbox, generated)


def _domain_for_new_mailbox(domain_name: str, create_missing: bool) -> Domain:
    """The domain, row-locked so two concurrent creations cannot both take its last slot."""
    domain = Domain.objects.select_for_update().filter(name=domain_name).first()
    if domain is None:
        if not create_missing:
            raise DomainNotFound(f"no such domain: {domain_name} (create it first, or pass --create-domain)")
        domain = Domain.objects.create(name=domain_name)
    if domain.max_mailboxes and domain.mailboxes.count() >= domain.max_mailboxes:
        raise LimitReached(
            f"domain {domain_name} already has its maximum of {domain.max_mailboxes} mailboxes"
        )
    return domain


def check_password_hash(password_hash: str) -> None:
    """Raise InvalidInput unless one of the configured hashers understands ``password_hash``."""
    try:
        hasher = identify_hasher(password_hash)
        get_hasher(hasher.algorithm)
        hasher.decode(password_hash)
    except (ValueError, TypeError, KeyError, IndexError):
        raise InvalidInput("password hash is not in a format the configured hashers accept") from None


def set_password(address: str, password: str) -> None:
    mailbox = get_mailbox(address)
    validate_new_password(password, mailbox.address)
    mailbox.user.set_password(password)
    mailbox.user.save(update_fields=["password"])


def set_password_hash(address: str, password_hash: str) -> None:
    """Store a hash made elsewhere (a migration from another system) as the mailbox's password."""
    check_password_hash(password_hash)
    mailbox = get_mailbox(address)
    get_user_model().objects.filter(pk=mailbox.user_id).update(password=password_hash)


def set_quota(address: str, *, quota_bytes: int) -> Mailbox:
    mailbox = get_mailbox(address)
    update_mailbox_settings(mailbox.pk, {"quota_bytes": quota_bytes})
    mailbox.quota_bytes = quota_bytes
    return mailbox


def set_mailbox_active(address: str, active: bool) -> None:
    update_mailbox_settings(get_mailbox(address).pk, {"active": active})


def update_mailbox_settings(mailbox_id: int, settings: Mapping[str, int | bool]) -> None:
    """Write only the named settings (``active``, ``quota_bytes``, ``quota_messages``), never a counter."""
    _require_known(settings, MAILBOX_SETTINGS)
    _require_in_range(**{name: settings[name] for name in ("quota_bytes",) if name in settings})
    _require_in_range(MAX_INT32, **{name: settings[name] for name in ("quota_messages",) if name in settings})
    Mailbox.objects.filter(pk=mailbox_id).update(**settings)


def update_domain_settings(domain_id: int, settings: Mapping[str, int | bool | str]) -> None:
    """Write only the named settings of a domain (see DOMAIN_SETTINGS), never its usage counter."""
    _require_known(settings, DOMAIN_SETTINGS)
    sizes = ("quota_bytes", "default_mailbox_quota_bytes")
    _require_in_range(**{name: settings[name] for name in sizes if name in settings})
    _require_in_range(MAX_INT32, **{name: settings[name] for name in ("max_mailboxes",) if name in settings})
    if "quota_warning_percents" in settings:
        try:
            parse_percents(settings["quota_warning_percents"])
        except ValueError as error:
            raise InvalidInput(str(error)) from None
    Domain.objects.filter(pk=domain_id).update(**settings)


def delete_domain(name: str) -> Domain:
    """Delete a domain that has no mailboxes left; return the row as it was."""
    with transaction.atomic():
        domain = get_domain(name)
        domain = Domain.objects.select_for_update().get(pk=domain.pk)
        mailbox_count = domain.mailboxes.count()
        if mailbox_count:
            raise InvalidInput(
                f"domain {domain.name} still has {mailbox_count} mailbox{'es' if mailbox_count != 1 else ''}:"
                " delete them first"
            )
        Domain.objects.filter(pk=domain.pk).delete()
    return domain


def delete_mailbox(address: str) -> int:
    """Delete a mailbox, its login and all its mail; return the number of messages removed."""
    mailbox = get_mailbox(address)
    with transaction.atomic():
        totals = Message.objects.filter(mailbox=mailbox).aggregate(count=Count("id"), size=Sum("size_bytes"))
        MessageChunk.objects.filter(message__mailbox=mailbox).delete()
        Message.objects.filter(mailbox=mailbox).only("id").delete()
        Domain.objects.filter(pk=mailbox.domain_id).update(used_bytes=F("used_bytes") - (totals["size"] or 0))
        mailbox.delete()
        get_user_model().objects.filter(pk=mailbox.user_id).delete()
    return totals["count"]


# --- Helpers ---------------------------------------------------------------------------------


def _checked(normalise, value: str) -> str:
    try:
        return normalise(value)
    except ValueError as error:
        raise InvalidInput(str(error)) from None


def _require_known(settings: Mapping[str, object], known: frozenset[str]) -> None:
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InvalidInput(f"not a setting that can be changed: {', '.join(unknown)}")


def _require_in_range(maximum: int = MAX_BIGINT, **values: int) -> None:
    for name, value in values.items():
        if not 0 <= value <= maximum:
            raise InvalidInput(f"{name.replace('_', ' ')} must be between 0 and {maximum}")


def validate_new_password(password: str, username: str) -> None:
    """The configured AUTH_PASSWORD_VALIDATORS, for passwords an operator chooses."""
    user = get_user_model()(username=username, email=username if "@" in username else "")
    try:
        validate_password(password, user)
    except ValidationError as error:
        raise InvalidInput("password rejected: " + " ".join(error.messages)) from None


def create_domain(
    name: str, *, quota_bytes: int = 0, max_mailboxes: int = 0, default_mailbox_quota_bytes: int = 0
) -> Domain:
    domain_name = _checked(normalise_domain, name)
    _require_in_range(quota_bytes=quota_bytes, default_mailbox_quota_bytes=default_mailbox_quota_bytes)
    _require_in_range(MAX_INT32, max_mailboxes=max_mailboxes)
    try:
        with transaction.atomic():
            return Domain.objects.create(
                name=domain_name,
                quota_bytes=quota_bytes,
                max_mailboxes=max_mailboxes,
                default_mailbox_quota_bytes=default_mailbox_quota_bytes,
            )
    except IntegrityError:
        raise AlreadyExists(f"domain {domain_name} already exists") from None
