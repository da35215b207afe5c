"""Domains, mailbox logins and their settings: the rows that hold the counters."""

import hashlib
import math
import secrets
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import check_password, identify_hasher, make_password
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, F, Max, Sum
from django.utils.translation import gettext

from mailadmin.addresses import domain_of, normalise_address, normalise_domain
from mailadmin.hosting import dovecothashes
from mailadmin.hosting.store.aliases import require_new_mailbox_address, require_not_alias_domain
from mailadmin.hosting.store.errors import (
    AlreadyExists,
    DomainNotFound,
    InvalidInput,
    LimitReached,
    MailboxNotFound,
    StillInUse,
    StoreError,
)
from mailadmin.hosting.store.fastsql import find_mailbox, lock_domain
from mailadmin.models import (
    Domain,
    Mailbox,
    Message,
    MessageChunk,
    UidValidityCounter,
    parse_percents,
)

MAX_BIGINT = 2**63 - 1
MAX_INT32 = 2**31 - 1  # PositiveIntegerField on PostgreSQL
GENERATED_PASSWORD_BYTES = 18
PASSWORD_COLUMN_LENGTH = 128  # auth.User.password
MAILBOX_SETTINGS = frozenset({"active", "quota_bytes", "quota_messages"})
DOMAIN_SETTINGS = frozenset(
    {
        "active",
        "quota_bytes",
        "max_mailboxes",
        "default_mailbox_quota_bytes",
        "quota_warning_percents",
        "max_aliases",
        "allow_outside_destinations",
        "language",
    }
)


def get_domain(name: str) -> Domain:
    domain_name = normalised_or_refused(normalise_domain, name)
    try:
        return Domain.objects.get(name=domain_name)
    except Domain.DoesNotExist:
        raise DomainNotFound(gettext("no such domain: %(name)s") % {"name": domain_name}) from None


def get_mailbox(address: str) -> Mailbox:
    normalised = normalised_or_refused(normalise_address, address)
    mailbox = find_mailbox(normalised)
    if mailbox is None:
        raise MailboxNotFound(gettext("no such mailbox: %(address)s") % {"address": normalised})
    return mailbox


def create_mailbox(
    address: str,
    *,
    password: str | None = None,
    password_hash: str | None = None,
    quota_bytes: int | None = None,
    quota_messages: int = 0,
    create_domain: bool = False,
) -> Mailbox:
    """Create the login user and its mailbox, with exactly one of ``password`` and ``password_hash``.

    ``quota_bytes=None`` takes the domain's default.
    """
    normalised = normalised_or_refused(normalise_address, address)
    if (password is None) == (password_hash is None):
        raise InvalidInput(gettext("give exactly one of a password and a password hash"))
    if quota_bytes is not None:
        _require_in_range(quota_bytes=quota_bytes)
    _require_in_range(MAX_INT32, quota_messages=quota_messages)
    if password_hash is not None:
        password_hash = storable_password_hash(password_hash)
    else:
        password_hash = hash_new_password(password, normalised)
    # Inside a caller's transaction (the service's, with its audit entry) no savepoint of its own.
    with transaction.atomic(savepoint=False):
        domain = _domain_for_new_mailbox(domain_of(normalised), create_domain)
        require_new_mailbox_address(normalised)
        user = get_user_model()(username=normalised, email=normalised, password=password_hash)
        user.save()
        mailbox = Mailbox.objects.create(
            user=user,
            domain=domain,
            password_set_digest=hash_digest(password_hash),
            uid_validity=next_uid_validity(),
            quota_bytes=domain.default_mailbox_quota_bytes if quota_bytes is None else quota_bytes,
            quota_messages=quota_messages,
        )
    return mailbox


def _domain_for_new_mailbox(domain_name: str, create_missing: bool) -> Domain:
    """The domain, row-locked so two concurrent creations cannot both take its last slot."""
    domain = lock_domain(domain_name)
    if domain is None:
        if not create_missing:
            raise DomainNotFound(
                gettext("no such domain: %(name)s (create it first, or pass --create-domain)")
                % {"name": domain_name}
            )
        require_not_alias_domain(domain_name)
        domain = Domain.objects.create(name=domain_name)
    if domain.max_mailboxes:  # no maximum, nothing to count (a scan of the domain's mailboxes)
        require_room_for_mailboxes(domain, domain.mailboxes.count(), 1)
    return domain


def require_room_for_mailboxes(domain: Domain, existing: int, adding: int) -> None:
    """Refuse adding ``adding`` mailboxes to a domain that has ``existing`` if that passes its maximum."""
    if domain.max_mailboxes and existing + adding > domain.max_mailboxes:
        raise LimitReached(
            gettext("domain %(name)s already has its maximum of %(count)d mailboxes")
            % {"name": domain.name, "count": domain.max_mailboxes}
        )


@dataclass(frozen=True)
class NewMailbox:
    """One mailbox for ``create_mailboxes``: a hash already accepted, ``quota_bytes=None`` the default."""

    address: str
    password_hash: str
    quota_bytes: int | None = None
    quota_messages: int = 0


class BatchRefusal(Exception):
    """``create_mailboxes`` refused the batch: ``error`` is about ``batch[index]``."""

    def __init__(self, index: int, error: StoreError) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


BATCH_SIZE = 500


def create_mailboxes(batch: list[NewMailbox]) -> list[Mailbox]:
    """Create the logins and mailboxes of ``batch``, all or none, with the rules of ``create_mailbox``.

    Statements do not grow with the rows' count one by one: the domains are row-locked and their
    mailboxes counted once, existing logins looked up in chunks, the ``uid_validity`` values
    taken from the counter in one step, and the rows inserted in batches. A refusal is a
    ``BatchRefusal`` naming the first row it concerns (the earliest, when several rows are wrong).
    Call inside a transaction.
    """
    if not batch:
        return []
    refusals: list[BatchRefusal] = []
    addresses: list[str] = []
    hashes: list[str] = []
    for index, new in enumerate(batch):
        try:
            address, password_hash = _checked_new_mailbox(new)
        except InvalidInput as error:
            refusals.append(BatchRefusal(index, error))
            address = password_hash = ""
        addresses.append(address)
        hashes.append(password_hash)
    rows_of_domain: dict[str, list[int]] = {}
    for index, address in enumerate(addresses):
        if address:
            rows_of_domain.setdefault(domain_of(address), []).append(index)
    domains = {
        domain.name: domain
        for domain in Domain.objects.select_for_update().filter(name__in=list(rows_of_domain)).order_by("pk")
    }
    counts = dict(
        Mailbox.objects.filter(domain__in=list(domains.values()))
        .values_list("domain")
        .annotate(count=Count("id"))
        .values_list("domain", "count")
    )
    for name, indexes in rows_of_domain.items():
        domain = domains.get(name)
        if domain is None:
            missing = gettext("no such domain: %(name)s (create it first, or pass --create-domain)")
            refusals.append(BatchRefusal(indexes[0], DomainNotFound(missing % {"name": name})))
            continue
        existing = counts.get(domain.pk, 0)
        try:
            require_room_for_mailboxes(domain, existing, len(indexes))
        except LimitReached as error:
            refusals.append(BatchRefusal(indexes[max(domain.max_mailboxes - existing, 0)], error))
    user_model = get_user_model()
    index_of = {address: index for index, address in enumerate(addresses) if address}
    for start in range(0, len(addresses), BATCH_SIZE):
        chunk = [address for address in addresses[start : start + BATCH_SIZE] if address]
        taken = user_model.objects.filter(username__in=chunk)
        for username in taken.values_list("username", flat=True):
            exists = gettext("mailbox %(address)s already exists") % {"address": username}
            refusals.append(BatchRefusal(index_of[username], AlreadyExists(exists)))
    _raise_first(refusals)
    users = user_model.objects.bulk_create(
        [
            user_model(username=address, email=address, password=password_hash)
            for address, password_hash in zip(addresses, hashes, strict=True)
        ],
        batch_size=BATCH_SIZE,
    )
    first_uid_validity = next_uid_validity(len(batch))
    mailboxes = []
    for offset, (user, address, new) in enumerate(zip(users, addresses, batch, strict=True)):
        domain = domains[domain_of(address)]
        quota_bytes = domain.default_mailbox_quota_bytes if new.quota_bytes is None else new.quota_bytes
        mailboxes.append(
            Mailbox(
                user=user,
                domain=domain,
                password_set_digest=hash_digest(user.password),
                uid_validity=first_uid_validity + offset,
                quota_bytes=quota_bytes,
                quota_messages=new.quota_messages,
            )
        )
    return Mailbox.objects.bulk_create(mailboxes, batch_size=BATCH_SIZE)


def _checked_new_mailbox(new: NewMailbox) -> tuple[str, str]:
    """The normalised address and the hash as stored, once the row passes the checks
    ``create_mailbox`` makes before the database."""
    normalised = normalised_or_refused(normalise_address, new.address)
    if new.quota_bytes is not None:
        _require_in_range(quota_bytes=new.quota_bytes)
    _require_in_range(MAX_INT32, quota_messages=new.quota_messages)
    return normalised, storable_password_hash(new.password_hash)


def _raise_first(refusals: list[BatchRefusal]) -> None:
    if refusals:
        raise min(refusals, key=lambda refusal: refusal.index)


# An imported hash may cost at most this many times today's default to check: a cost far above
# it ties up a hashing thread per login attempt (PBKDF2 at 2e9 iterations: until killed).
MAX_HASH_COST_FACTOR = 10
# Argon2 holds memory_cost KiB for each check, and runpop3 checks on POP3_AUTH_THREADS threads at
# once: at most twice today's (~200 MiB), so the hashing pool's memory stays bounded.
MAX_ARGON2_MEMORY_FACTOR = 2
# The parameters whose product is the work of one check; each may be in bounds while together
# they are not (argon2 at 10 times the passes and 10 times the memory is 100 times the work).
_WORK_FACTORS = {
    "argon2": ("time_cost", "memory_cost"),
    dovecothashes.ALGORITHM: ("time_cost", "memory_cost"),
    "scrypt": ("work_factor", "block_size", "parallelism"),
}
# OpenSSL's memory limit for scrypt when the hasher's maxmem is 0; above it verification fails.
SCRYPT_DEFAULT_MAXMEM = 32 * 1024**2


@dataclass(frozen=True)
class _HashCost:
    field: str  # the key in the hasher's decode()
    default: str  # the hasher attribute holding today's default
    doubling: bool = False  # each step doubles the cost (bcrypt's rounds)


# The parameters that set what checking a hash costs, per algorithm; hashes without any (MD5) cost
# nothing to check.
_HASH_COSTS: dict[str, tuple[_HashCost, ...]] = {
    "pbkdf2_sha256": (_HashCost("iterations", "iterations"),),
    "pbkdf2_sha1": (_HashCost("iterations", "iterations"),),
    "argon2": (
        _HashCost("time_cost", "time_cost"),
        _HashCost("memory_cost", "memory_cost"),
        _HashCost("parallelism", "parallelism"),
    ),
    "scrypt": (
        _HashCost("work_factor", "work_factor"),
        _HashCost("block_size", "block_size"),
        _HashCost("parallelism", "parallelism"),
    ),
    "bcrypt_sha256": (_HashCost("work_factor", "rounds", doubling=True),),
    "bcrypt": (_HashCost("work_factor", "rounds", doubling=True),),
    # A Dovecot hash has the costs of its scheme's family only (see dovecothashes.costs).
    dovecothashes.ALGORITHM: (
        _HashCost("time_cost", "time_cost"),
        _HashCost("memory_cost", "memory_cost"),
        _HashCost("parallelism", "parallelism"),
        _HashCost("work_factor", "bcrypt_rounds", doubling=True),
        _HashCost("rounds", "sha_crypt_rounds"),
    ),
}
# The hashers whose memory_cost is argon2's.
_ARGON2_MEMORY = frozenset({"argon2", dovecothashes.ALGORITHM})
BCRYPT_MIN_ROUNDS = 4


def storable_password_hash(password_hash: str) -> str:
    """A hash made elsewhere, as it is stored here, once ``check_password_hash`` accepts it.

    Django's own formats are stored as given; Dovecot's ``{SCHEME}hash`` gets the prefix of
    the hasher that checks it (``dovecothashes``), which argon2 replaces at the first login.
    Every way a hash enters (the import files, ``set_password_hash``, a new mailbox, the API)
    comes through here.
    """
    try:
        stored = dovecothashes.to_django(password_hash.strip())
    except dovecothashes.NotADovecotHash as error:
        raise InvalidInput(f"password hash: {error}") from None
    check_password_hash(stored)
    return stored


def check_password_hash(password_hash: str) -> None:
    """Raise InvalidInput unless ``password_hash`` can be checked here, at a sane cost.

    The hash must be in the format of a configured hasher whose library is installed (Django
    finds a missing one only when a login checks the hash), and each of its cost parameters
    must lie between the smallest valid value and ``MAX_HASH_COST_FACTOR`` times the hasher's
    default.
    """
    try:
        hasher = identify_hasher(password_hash)
    except ValueError:
        raise InvalidInput(
            gettext("password hash is not in a format the configured hashers accept")
        ) from None
    if len(password_hash) > PASSWORD_COLUMN_LENGTH:
        raise InvalidInput(
            gettext("password hash is longer than %(length)d characters") % {"length": PASSWORD_COLUMN_LENGTH}
        )
    _require_hasher_usable(hasher)
    try:
        decoded = hasher.decode(password_hash)
    except dovecothashes.NotADovecotHash as error:
        raise InvalidInput(f"password hash: {error}") from None
    except (ValueError, TypeError, KeyError, IndexError, AssertionError):
        raise InvalidInput(
            gettext("password hash is not a valid %(algorithm)s hash") % {"algorithm": hasher.algorithm}
        ) from None
    for cost in _HASH_COSTS.get(hasher.algorithm, ()):
        if cost.field in decoded:
            _require_sane_cost(hasher, cost, decoded[cost.field])
    _require_sane_work(hasher, decoded)
    if hasher.algorithm == "scrypt":
        _require_scrypt_memory(hasher, decoded)


def _require_hasher_usable(hasher) -> None:
    try:
        if hasher.library is not None:
            hasher._load_library()
    except ValueError:
        module = hasher.library[0] if isinstance(hasher.library, tuple | list) else hasher.library
        raise InvalidInput(
            gettext(
                "password hash is %(algorithm)s, which cannot be checked here: "
                "the %(module)s module is not installed"
            )
            % {"algorithm": hasher.algorithm, "module": module}
        ) from None
    if hasher.algorithm == "scrypt" and not hasattr(hashlib, "scrypt"):
        raise InvalidInput(gettext("password hash is scrypt, which this Python's OpenSSL cannot check"))


def _require_sane_cost(hasher, cost: _HashCost, value: int) -> None:
    default = getattr(hasher, cost.default)
    if cost.doubling:
        lowest, highest = BCRYPT_MIN_ROUNDS, default + int(math.log2(MAX_HASH_COST_FACTOR))
    else:
        lowest, highest = 1, default * MAX_HASH_COST_FACTOR
    if not lowest <= value <= highest:
        raise InvalidInput(
            gettext(
                "password hash has %(parameter)s %(value)s: %(algorithm)s hashes here need %(lowest)s to "
                "%(highest)s (at most %(factor)s times the current cost)"
            )
            % {
                "parameter": cost.field.replace("_", " "),
                "value": value,
                "algorithm": hasher.algorithm,
                "lowest": lowest,
                "highest": highest,
                "factor": MAX_HASH_COST_FACTOR,
            }
        )


def _require_sane_work(hasher, decoded: dict) -> None:
    fields = [field for field in _WORK_FACTORS.get(hasher.algorithm, ()) if field in decoded]
    work = math.prod(decoded[field] / getattr(hasher, field) for field in fields)
    if work > MAX_HASH_COST_FACTOR:
        raise InvalidInput(
            gettext(
                "password hash costs %(work)s times the current cost to check: %(algorithm)s hashes here "
                "may cost at most %(factor)s times"
            )
            % {"work": f"{work:.3g}", "algorithm": hasher.algorithm, "factor": MAX_HASH_COST_FACTOR}
        )
    if (
        hasher.algorithm in _ARGON2_MEMORY
        and decoded.get("memory_cost", 0) > hasher.memory_cost * MAX_ARGON2_MEMORY_FACTOR
    ):
        raise InvalidInput(
            gettext(
                "password hash needs %(needed)s KiB to check: "
                "argon2 hashes here may need at most %(most)s KiB"
            )
            % {"needed": decoded["memory_cost"], "most": hasher.memory_cost * MAX_ARGON2_MEMORY_FACTOR}
        )


def _require_scrypt_memory(hasher, decoded: dict) -> None:
    work_factor, block_size = decoded["work_factor"], decoded["block_size"]
    if work_factor < 2 or work_factor & (work_factor - 1):
        raise InvalidInput(
            gettext("password hash has work factor %(factor)s: scrypt needs a power of 2")
            % {"factor": work_factor}
        )
    # OpenSSL's reckoning of what scrypt needs (crypto/evp/pbe_scrypt.c).
    needed = 128 * block_size * (work_factor + 2 + decoded["parallelism"])
    maxmem = hasher.maxmem or SCRYPT_DEFAULT_MAXMEM
    if needed > maxmem:
        raise InvalidInput(
            gettext("password hash needs %(needed)s bytes to check, more than scrypt's %(most)s here")
            % {"needed": needed, "most": maxmem}
        )


def set_password(address: str, password: str) -> None:
    mailbox = get_mailbox(address)
    set_password_hash(mailbox.address, hash_new_password(password, mailbox.address))


def set_password_hash(address: str, password_hash: str) -> None:
    """Store a hash made elsewhere (a migration from another system) as the mailbox's password."""
    stored = storable_password_hash(password_hash)
    replace_password_hash(get_mailbox(address), stored)


def replace_password_hash(mailbox: Mailbox, password_hash: str) -> None:
    """``set_password_hash`` of a mailbox already found: its row written before its login's, the
    order every writer of both takes them in."""
    stored = storable_password_hash(password_hash)
    mailbox.password_set_digest = hash_digest(stored)
    with transaction.atomic(savepoint=False):
        Mailbox.objects.filter(pk=mailbox.pk).update(password_set_digest=mailbox.password_set_digest)
        get_user_model().objects.filter(pk=mailbox.user_id).update(password=stored)


def hash_digest(stored: str) -> str:
    """``Mailbox.password_set_digest`` of a hash as stored."""
    return hashlib.sha256(stored.encode()).hexdigest()


def password_set_since(before: Mailbox, now: Mailbox) -> bool:
    """Whether another password was set on the mailbox between two reads of it. Setting one
    moves the digest (a new hash, a new salt); the first login's upgrade to argon2 does not. A
    mailbox with no digest yet (made before it was kept) compares its hashes instead."""
    if before.password_set_digest:
        return before.password_set_digest != now.password_set_digest
    return before.user.password != now.user.password


def is_current_password_hash(mailbox: Mailbox, stored: str) -> bool:
    """Whether ``stored`` (as ``storable_password_hash`` gives it) is the mailbox's password hash:
    the one its login has, or the one last set, which only the first login's upgrade to argon2
    (the same password) has replaced since."""
    return stored == mailbox.user.password or hash_digest(stored) == mailbox.password_set_digest


def upgrade_password_hash(user_id: int, old_hash: str, new_hash: str) -> bool:
    """Replace a login's outdated hash of the same password, unless the password changed since
    ``old_hash`` was read (then nothing is written); whether it was replaced."""
    return bool(get_user_model().objects.filter(pk=user_id, password=old_hash).update(password=new_hash))


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
    limits = ("max_mailboxes", "max_aliases")
    _require_in_range(MAX_INT32, **{name: settings[name] for name in limits if name in settings})
    if "quota_warning_percents" in settings:
        try:
            parse_percents(settings["quota_warning_percents"])
        except ValueError as error:
            raise InvalidInput(str(error), field="quota_warning_percents") from None
    if "language" in settings and settings["language"] not in dict(django_settings.LANGUAGES):
        raise InvalidInput(
            gettext("unknown language %(code)r") % {"code": settings["language"]}, field="language"
        )
    Domain.objects.filter(pk=domain_id).update(**settings)


def delete_domain(name: str) -> Domain:
    """Delete a domain that has no mailboxes left; return the row as it was."""
    with transaction.atomic():
        domain = Domain.objects.select_for_update().get(pk=get_domain(name).pk)
        refusal = domain_deletion_refusal(domain)
        if refusal is not None:
            raise StillInUse(refusal)
        Domain.objects.filter(pk=domain.pk).delete()
    return domain


def domain_deletion_refusal(domain: Domain) -> str | None:
    """Why the domain cannot be deleted now, or None: its mailboxes, aliases and alias domains
    protect it."""
    for count, one, several in (
        (domain.mailboxes.count(), "mailbox", "mailboxes"),
        (domain.aliases.count(), "alias or catch-all", "aliases and catch-alls"),
        (domain.alias_domains.count(), "alias domain", "alias domains"),
    ):
        if count:
            return (
                f"domain {domain.name} still has {count} {one if count == 1 else several}; delete them first"
            )
    return None


def delete_mailbox(address: str) -> int:
    """Delete a mailbox, its login and all its mail; return the number of messages removed.

    The mailbox's row is locked before its domain's, the order every writer takes them in: a
    delivery holds the mailbox from its charge to its commit and charges the domain last.
    """
    mailbox = get_mailbox(address)
    with transaction.atomic():
        list(Mailbox.objects.select_for_update().filter(pk=mailbox.pk).values_list("pk"))
        totals = Message.objects.filter(mailbox=mailbox).aggregate(count=Count("id"), size=Sum("size_bytes"))
        MessageChunk.objects.filter(message__mailbox=mailbox).delete()
        Message.objects.filter(mailbox=mailbox).only("id").delete()
        Domain.objects.filter(pk=mailbox.domain_id).update(used_bytes=F("used_bytes") - (totals["size"] or 0))
        mailbox.delete()
        get_user_model().objects.filter(pk=mailbox.user_id).delete()
    return totals["count"]


# --- Helpers ---------------------------------------------------------------------------------


def normalised_or_refused(normalise, value: str) -> str:
    """``normalise(value)`` (an address or domain normaliser), its ValueError an InvalidInput."""
    try:
        return normalise(value)
    except ValueError as error:
        raise InvalidInput(str(error)) from None


def _require_known(settings: Mapping[str, object], known: frozenset[str]) -> None:
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InvalidInput(
            gettext("not a setting that can be changed: %(names)s") % {"names": ", ".join(unknown)}
        )


def _require_in_range(maximum: int = MAX_BIGINT, **values: int) -> None:
    for name, value in values.items():
        if not 0 <= value <= maximum:
            raise InvalidInput(
                gettext("%(name)s must be between 0 and %(maximum)d")
                % {"name": name.replace("_", " "), "maximum": maximum},
                field=name,
            )


def validate_new_password(password: str, username: str) -> None:
    """The configured AUTH_PASSWORD_VALIDATORS, for passwords an operator chooses, and no control
    character but tab: CR and LF end the PASS line and NUL separates the fields of AUTH PLAIN, so
    a password holding one could never log in over POP3."""
    control = next((char for char in password if unicodedata.category(char) == "Cc" and char != "\t"), None)
    if control is not None:
        raise InvalidInput(
            gettext(
                "password rejected: it contains the control character %(character)s, "
                "which no POP3 client can send"
            )
            % {"character": f"U+{ord(control):04X}"},
            field="password",
        )
    user = get_user_model()(username=username, email=username if "@" in username else "")
    try:
        validate_password(password, user)
    except ValidationError as error:
        raise InvalidInput(
            gettext("password rejected: %(reasons)s") % {"reasons": " ".join(error.messages)},
            field="password",
        ) from None


def generate_password() -> str:
    """A random password for a new mailbox, shown once to whoever creates it."""
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)


def hash_new_password(password: str, username: str) -> str:
    """Validate a password an operator chose (see ``validate_new_password``) and hash it.

    Hashing costs about 100 ms and 100 MiB with argon2: call this before opening a transaction.
    """
    validate_new_password(password, username)
    return make_password(password)


def is_current_password(mailbox: Mailbox, password: str) -> bool:
    """Whether ``password`` is the one the mailbox's login has now (a hash check, as costly as
    hashing it: call this before opening a transaction)."""
    return check_password(password, mailbox.user.password)


def next_uid_validity(count: int = 1) -> int:
    """A ``uid_validity`` for a new mailbox: the clock in seconds, or one more than the last given.

    Strictly increasing, so a mailbox deleted and re-created within one second never repeats
    its predecessor's UIDLs. One UPDATE of the counter row takes the value and returns it: the
    row's lock (PostgreSQL) or the write transaction (SQLite) orders concurrent takers.
    ``count`` takes that many consecutive values in one step and returns the first.
    """
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                _TAKE_UID_VALIDITY, {"now": int(time.time()), "count": count, "id": UidValidityCounter.ROW_ID}
            )
            taken = cursor.fetchone()
        if taken is not None:
            return taken[0] - count + 1
        # The row went with a flushed table; start after every mailbox still here.
        last = Mailbox.objects.aggregate(last=Max("uid_validity"))["last"] or 0
        UidValidityCounter.objects.get_or_create(pk=UidValidityCounter.ROW_ID, defaults={"last_given": last})


# The value given is max(now, last + 1); the row keeps the last of the ``count`` taken.
_TAKE_UID_VALIDITY = (
    f"UPDATE {UidValidityCounter._meta.db_table} SET last_given = CASE WHEN last_given >= %(now)s "
    "THEN last_given + %(count)s ELSE %(now)s + %(count)s - 1 END WHERE id = %(id)s RETURNING last_given"
)


def create_domain(
    name: str, *, quota_bytes: int = 0, max_mailboxes: int = 0, default_mailbox_quota_bytes: int = 0
) -> Domain:
    domain_name = normalised_or_refused(normalise_domain, name)
    _require_in_range(quota_bytes=quota_bytes, default_mailbox_quota_bytes=default_mailbox_quota_bytes)
    _require_in_range(MAX_INT32, max_mailboxes=max_mailboxes)
    try:
        with transaction.atomic():
            require_not_alias_domain(domain_name)
            return Domain.objects.create(
                name=domain_name,
                quota_bytes=quota_bytes,
                max_mailboxes=max_mailboxes,
                default_mailbox_quota_bytes=default_mailbox_quota_bytes,
            )
    except IntegrityError:
        raise AlreadyExists(gettext("domain %(name)s already exists") % {"name": domain_name}) from None
