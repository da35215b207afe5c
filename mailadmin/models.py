"""Domains, mailboxes and stored messages.

Counters (``used_bytes``, ``used_messages``, ``next_uid``, ...) are written only by
``mailadmin.hosting.store``, always with conditional ``UPDATE`` statements in the same transaction
as the message rows they count; :class:`StoreCounters` keeps every ``save()`` away from them.
"""

import time
from datetime import datetime

from django.conf import settings
from django.contrib.auth.hashers import UNUSABLE_PASSWORD_PREFIX, get_hasher
from django.contrib.auth.models import User
from django.db import models
from django.db.models import F, Q
from django.db.models.functions import Coalesce, Greatest, Now
from django.utils import timezone
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from mailadmin.units import SqlInteger, usage_percent_sql
from pop3 import mailbox as pop3_mailbox


def _unix_time_now() -> int:
    return int(time.time())


def parse_percents(text: str) -> list[int]:
    """'80, 95' -> [80, 95]; each between 1 and 100."""
    try:
        percents = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(
            gettext("%(text)r is not a comma-separated list of percentages") % {"text": text}
        ) from None
    if any(not 1 <= percent <= 100 for percent in percents):
        raise ValueError(gettext("warning percentages must be between 1 and 100"))
    return percents


class StoreCounters:
    """Keeps a model's ``save()`` from writing the columns only the store may write.

    An edit (admin form, serializer, service) loads a row, changes some fields and saves it; a
    full save writes every column back as it was read, so a delivery committed in between
    would be undone and ``next_uid`` would go back to a UID already taken. Here every save of
    an existing row leaves ``STORE_OWNED_FIELDS`` out of its UPDATE, and naming one of them in
    ``update_fields`` is a programming error. The store moves them with queryset updates,
    which never pass through ``save()``. Inserting a new row writes their initial values.

    The alternative, a table of counters apart from the settings, would keep them safe by
    construction too, but would add a join or a second row to every delivery, login and
    listing; one save() rule costs nothing on those paths.
    """

    STORE_OWNED_FIELDS: tuple[str, ...] = ()

    def save(self, *args, force_insert=False, update_fields=None, **kwargs) -> None:
        if update_fields is not None:
            for name in update_fields:
                if name in self.STORE_OWNED_FIELDS:
                    raise ValueError(f"{name} is written only by the store (mailadmin.hosting.store)")
        elif self.pk is not None and not force_insert:
            skipped = {*self.STORE_OWNED_FIELDS, *self.get_deferred_fields()}
            update_fields = [
                field.name
                for field in self._meta.concrete_fields
                if not field.primary_key and field.name not in skipped and field.attname not in skipped
            ]
        super().save(*args, force_insert=force_insert, update_fields=update_fields, **kwargs)


def _default_language() -> str:
    return settings.LANGUAGE_CODE


def language_choices() -> list[tuple[str, str]]:
    """The configured languages, named in the reader's language (Django's catalogue names them)."""
    return [(code, _(name)) for code, name in settings.LANGUAGES]


class Domain(StoreCounters, models.Model):
    name = models.CharField(
        _("name"),
        max_length=253,
        unique=True,
        help_text=_("Lower-case; internationalised names are stored as A-labels."),
    )
    active = models.BooleanField(_("active"), default=True)
    quota_bytes = models.BigIntegerField(
        _("quota"), default=0, help_text=_("Cap on the total size of all mail in the domain; 0 = unlimited.")
    )
    used_bytes = models.BigIntegerField(_("used"), default=0, editable=False)
    max_mailboxes = models.PositiveIntegerField(
        _("maximum mailboxes"), default=0, help_text=_("0 = unlimited.")
    )
    default_mailbox_quota_bytes = models.BigIntegerField(
        _("default mailbox quota"),
        default=0,
        help_text=_("Quota given to new mailboxes when none is named; 0 = unlimited."),
    )
    quota_warning_percents = models.CharField(
        _("quota warning percentages"),
        max_length=50,
        blank=True,
        help_text=_(
            "Usage percentages whose crossing delivers a warning, e.g. '80,95'; blank = the default."
        ),
    )
    language = models.CharField(
        _("language"),
        max_length=16,
        default=_default_language,
        help_text=_("The language of the messages sent to the domain's mailboxes, such as quota warnings."),
    )
    max_aliases = models.PositiveIntegerField(
        _("maximum aliases"), default=0, help_text=_("0 = unlimited; the catch-all is not counted.")
    )
    allow_outside_destinations = models.BooleanField(
        _("allow outside destinations"),
        default=False,
        help_text=_(
            "Whether its domain administrators may forward its aliases to addresses not hosted here."
        ),
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True)

    STORE_OWNED_FIELDS = ("used_bytes",)

    class Meta:
        verbose_name = _("domain")
        verbose_name_plural = _("domains")
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(quota_bytes__gte=0), name="domain_quota_not_negative"),
            models.CheckConstraint(
                condition=Q(default_mailbox_quota_bytes__gte=0), name="domain_default_quota_not_negative"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def warning_percents(self) -> list[int]:
        return parse_percents(self.quota_warning_percents or settings.MAILADMIN_QUOTA_WARNING_PERCENTS)


# A mailbox's use of each quota in whole percent (NULL: unlimited), and of the fuller of the two,
# which is what "% used" means wherever mailboxes are sorted or picked by it. On PostgreSQL
# GREATEST skips NULLs, on SQLite MAX() returns NULL: the COALESCE makes both skip them.
BYTES_PERCENT = usage_percent_sql("used_bytes", "quota_bytes")
MESSAGES_PERCENT = usage_percent_sql("used_messages", "quota_messages")
USED_PERCENT = Coalesce(Greatest(BYTES_PERCENT, MESSAGES_PERCENT), BYTES_PERCENT, MESSAGES_PERCENT)
# What mailboxes are sorted and picked by: "% used", unlimited (-1) below every percentage. Never
# NULL, so one index serves both directions on both databases (SQLite has no NULLS LAST in indexes).
USED_RANK = Coalesce(USED_PERCENT, SqlInteger(-1))


class MailboxQuerySet(models.QuerySet):
    def usable(self) -> "MailboxQuerySet":
        """Mailboxes that may log in and take mail; ``Mailbox.is_usable`` is the same rule."""
        return self.filter(active=True, domain__active=True, user__is_active=True)

    def current_hash(self) -> "MailboxQuerySet":
        """Mailboxes whose password hash is the preferred hasher's (argon2)."""
        return self.filter(user__password__startswith=f"{get_hasher().algorithm}$")

    def legacy_hash(self) -> "MailboxQuerySet":
        """Mailboxes whose password hash is another hasher's (imported from Dovecot, or PBKDF2):
        the preferred hasher replaces it at the next successful login."""
        preferred = Q(user__password__startswith=f"{get_hasher().algorithm}$")
        return self.exclude(preferred | Q(user__password__startswith=UNUSABLE_PASSWORD_PREFIX))

    def with_usage(self) -> "MailboxQuerySet":
        """Annotated with ``bytes_percent``, ``messages_percent``, ``used_percent`` and ``used_rank``."""
        return self.annotate(
            bytes_percent=BYTES_PERCENT,
            messages_percent=MESSAGES_PERCENT,
            used_percent=USED_PERCENT,
            used_rank=USED_RANK,
        )

    def using_at_least(self, percent: int) -> "MailboxQuerySet":
        """Mailboxes using ``percent`` or more of either quota (``usage_percent`` rounds down)."""
        return self.with_usage().filter(used_rank__gte=percent)


class Mailbox(StoreCounters, models.Model):
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="mailbox", verbose_name=_("login")
    )
    domain = models.ForeignKey(
        Domain, on_delete=models.PROTECT, related_name="mailboxes", verbose_name=_("domain")
    )
    active = models.BooleanField(_("active"), default=True)
    quota_bytes = models.BigIntegerField(_("quota"), default=0, help_text=_("0 = unlimited."))
    quota_messages = models.PositiveIntegerField(_("message quota"), default=0, help_text=_("0 = unlimited."))
    used_bytes = models.BigIntegerField(_("used"), default=0, editable=False)
    used_messages = models.PositiveIntegerField(_("messages"), default=0, editable=False)
    # The highest warning percentage already announced; lowered again when usage falls.
    quota_warning_percent = models.PositiveSmallIntegerField(
        _("last quota warning"), default=0, editable=False
    )
    # UIDs are never reused: the next one comes from this counter, bumped in the delivering
    # transaction. uid_validity makes UIDLs of a re-created mailbox differ from the old one's:
    # the store gives each new mailbox one from UidValidityCounter, larger than any before.
    next_uid = models.BigIntegerField(_("next UID"), default=1, editable=False)
    uid_validity = models.BigIntegerField(_("UID validity"), default=_unix_time_now, editable=False)
    # Moved on in every transaction that stores or deletes any of the mailbox's messages (and by
    # recalcquota): runpop3 takes a login snapshot it kept only while this has not moved. A default
    # in the database too, for rows inserted by SQL of their own (a bulk load, the bench's seeds).
    changes = models.BigIntegerField(_("changes to its messages"), default=0, db_default=0, editable=False)
    # The SHA-256 of the password hash last set (as stored), which the first login's upgrade to
    # argon2 leaves: setting that hash again (a provisioning system repeating its call) is then
    # known for what it is, no change.
    password_set_digest = models.CharField(
        _("digest of the password hash set"),
        max_length=64,
        blank=True,
        default="",
        db_default="",
        editable=False,
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    # The last successful POP3 login, written by the session registry with the session's row;
    # kept here because session rows are pruned and a mailbox's last login must outlive them.
    last_login_at = models.DateTimeField(_("last login"), null=True, blank=True, editable=False)
    last_login_from = models.CharField(_("last login from"), max_length=64, blank=True, editable=False)

    STORE_OWNED_FIELDS = (
        "used_bytes",
        "used_messages",
        "next_uid",
        "uid_validity",
        "changes",
        "quota_warning_percent",
        "last_login_at",
        "last_login_from",
    )

    objects = MailboxQuerySet.as_manager()

    class Meta:
        verbose_name = _("mailbox")
        verbose_name_plural = _("mailboxes")
        ordering = ["user__username"]
        permissions = [
            ("set_mailbox_password", _("Can reset the password of a mailbox")),
            ("suspend_mailbox", _("Can suspend and resume a mailbox")),
            ("recalculate_quota", _("Can recalculate quota counters")),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(quota_bytes__gte=0), name="mailbox_quota_not_negative"),
            models.CheckConstraint(condition=Q(used_bytes__gte=0), name="mailbox_used_not_negative"),
        ]
        # The quota page's order (either way, read forwards or backwards) over every mailbox and
        # within a domain, and its "80 % or more" filters.
        indexes = [
            models.Index(USED_RANK, F("id"), name="mailbox_used_rank"),
            models.Index(F("domain"), USED_RANK, F("id"), name="mailbox_domain_used_rank"),
            models.Index(fields=["last_login_at", "id"], name="mailbox_last_login"),
        ]

    def __str__(self) -> str:
        return self.address

    @property
    def address(self) -> str:
        return self.user.username

    def is_usable(self) -> bool:
        """``MailboxQuerySet.usable`` for a mailbox already loaded with its domain and user."""
        return self.active and self.domain.active and self.user.is_active

    def over_quota(self) -> bool:
        """Using more than its byte quota (after the quota was lowered): it receives nothing more."""
        return 0 < self.quota_bytes < self.used_bytes


class UidValidityCounter(models.Model):
    """One row: the last ``uid_validity`` given to a mailbox, kept when mailboxes are deleted.

    Written only by the store, with a conditional UPDATE, so values strictly increase across
    processes even when a mailbox is deleted and re-created within one clock second.
    """

    ROW_ID = 1

    id = models.PositiveSmallIntegerField(primary_key=True, default=ROW_ID)
    last_given = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"last uid_validity {self.last_given}"


class MessageQuerySet(models.QuerySet):
    def for_maildrop(self, mailbox: Mailbox | int) -> "MessageQuerySet":
        """The mailbox's messages in delivery order: the order POP3 numbers them."""
        return self.filter(mailbox=mailbox).order_by("id")


class Message(models.Model):
    mailbox = models.ForeignKey(
        Mailbox, on_delete=models.CASCADE, related_name="messages", verbose_name=_("mailbox")
    )
    uidl = models.CharField(
        _("UIDL"), max_length=70, help_text=_("POP3 unique-id: 1-70 printable characters, no '/'.")
    )
    size_bytes = models.BigIntegerField(
        _("size"), help_text=_("Exact octets of the CRLF-normalised message.")
    )
    received_at = models.DateTimeField(_("received"))
    envelope_sender = models.CharField(_("envelope sender"), max_length=320, blank=True)
    # The full header length (through the empty line), so TOP knows where the body starts.
    header_size_bytes = models.BigIntegerField(_("header size"))
    subject = models.CharField(_("subject"), max_length=255, blank=True)
    from_header = models.CharField(_("from"), max_length=255, blank=True)
    # Identifies where an imported message came from so a re-run skips it.
    import_key = models.CharField(_("import key"), max_length=200, null=True, blank=True, editable=False)

    objects = MessageQuerySet.as_manager()

    class Meta:
        verbose_name = _("message")
        verbose_name_plural = _("messages")
        # Reading mail is a privilege apart from seeing that it exists; each reading is audited.
        permissions = [("view_message_body", _("Can read the body of a message"))]
        constraints = [
            models.UniqueConstraint(fields=["mailbox", "uidl"], name="message_uidl_unique_per_mailbox"),
            models.UniqueConstraint(
                fields=["mailbox", "import_key"],
                condition=Q(import_key__isnull=False),
                name="message_import_key_unique_per_mailbox",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.uidl} ({self.size_bytes} bytes)"


class MessageChunk(models.Model):
    """One slice of a message body; a message's chunks, in ``seq`` order, are its exact bytes."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="chunks")
    seq = models.PositiveIntegerField()
    data = models.BinaryField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["message", "seq"], name="chunk_seq_unique")]

    def __str__(self) -> str:
        return f"chunk {self.seq} of message {self.message_id}"


class MaildropLease(models.Model):
    """The POP3 lock on a mailbox: one row per locked mailbox, valid until ``expires_at``.

    Taken with one INSERT that, on the unique mailbox, takes over only a lapsed lease, kept alive
    by the holder's heartbeat, checked by owner token in the UPDATE-state transaction. A holder
    that dies stops heartbeating and the lease lapses; times come from the database clock so
    hosts with skewed clocks agree.
    """

    mailbox = models.OneToOneField(Mailbox, on_delete=models.CASCADE, related_name="lease")
    owner = models.CharField(max_length=64, unique=True)
    node = models.CharField(max_length=200)
    acquired_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"lease on {self.mailbox_id} by {self.node}"


class Pop3Node(models.Model):
    """A running runpop3 process; its heartbeat says whether its open sessions are real."""

    name = models.CharField(_("name"), max_length=200, primary_key=True, help_text=_("host:pid"))
    started_at = models.DateTimeField(_("started"))
    heartbeat_at = models.DateTimeField(_("heartbeat"))

    def __str__(self) -> str:
        return self.name


def _history_indexes(table: str, time_field: str, filters: list[str]) -> list[models.Index]:
    """One index per filter of the history page, each read newest first within the value asked for."""
    return [models.Index(fields=[name, time_field], name=f"{table}_{name}_time") for name in filters]


class Pop3SessionQuerySet(models.QuerySet):
    def open(self) -> "Pop3SessionQuerySet":
        """Sessions not yet ended, including those of a process that died and was not yet swept."""
        return self.filter(ended_at__isnull=True)

    def changed_since(self, moment: datetime) -> "Pop3SessionQuerySet":
        """Rows written after ``moment`` (database time), for a reader that polls for changes.

        A write is stamped when its statement runs and seen when its transaction commits a
        moment later, so a reader should ask from a little before its last look (a second or
        two) and treat rows as idempotent snapshots.
        """
        return self.filter(updated_at__gt=moment)


# The POP3 library's end reasons, as people read them.
END_REASON_LABELS = {
    pop3_mailbox.EndReason.QUIT: _("quit"),
    pop3_mailbox.EndReason.DROPPED: _("dropped"),
    pop3_mailbox.EndReason.TIMEOUT: _("timeout"),
    pop3_mailbox.EndReason.KICKED: _("kicked"),
    pop3_mailbox.EndReason.SHUTDOWN: _("shutdown"),
    pop3_mailbox.EndReason.ERROR: _("error"),
}


class Pop3Session(models.Model):
    """One POP3 connection, written by the runpop3 process that serves it, as it runs."""

    # How a session ended: as the POP3 session reports it, or lost when its process died.
    EndReason = models.TextChoices(
        "EndReason",
        [(reason.name, (reason.value, END_REASON_LABELS[reason])) for reason in pop3_mailbox.EndReason]
        + [("LOST", ("lost", _("lost (its server stopped heartbeating)")))],
    )

    id = models.UUIDField(_("id"), primary_key=True, editable=False)
    node = models.CharField(_("process"), max_length=200, help_text=_("host:pid of the runpop3 process."))
    username = models.CharField(
        _("username"), max_length=320, blank=True, help_text=_("The login name given, if any.")
    )
    # No index of its own on mailbox or domain: the indexes below that begin with them serve
    # every look-up, and each index is more pages to write per row runpop3 adds and prunehistory
    # deletes.
    mailbox = models.ForeignKey(
        Mailbox,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="pop3_sessions",
        verbose_name=_("mailbox"),
        db_index=False,
    )
    # The domain of the login (or of the name tried), so a domain's administrators see its sessions.
    domain = models.ForeignKey(
        Domain,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        verbose_name=_("domain"),
        db_index=False,
    )
    peer_host = models.CharField(_("client address"), max_length=64)
    peer_port = models.PositiveIntegerField(_("client port"))
    local_host = models.CharField(_("server address"), max_length=64)
    local_port = models.PositiveIntegerField(_("server port"))
    implicit_tls = models.BooleanField(_("implicit TLS"), default=False)
    tls_version = models.CharField(_("TLS version"), max_length=32, blank=True)
    tls_cipher = models.CharField(_("TLS cipher"), max_length=100, blank=True)
    started_at = models.DateTimeField(_("started"))
    authenticated_at = models.DateTimeField(_("logged in"), null=True, blank=True)
    ended_at = models.DateTimeField(_("ended"), null=True, blank=True)
    end_reason = models.CharField(_("end reason"), max_length=16, choices=EndReason.choices, blank=True)
    kick_requested_at = models.DateTimeField(_("kick requested"), null=True, blank=True)
    commands = models.PositiveIntegerField(_("commands"), default=0)
    bytes_in = models.BigIntegerField(_("bytes in"), default=0)
    bytes_out = models.BigIntegerField(_("bytes out"), default=0)
    retr_count = models.PositiveIntegerField(_("messages retrieved"), default=0)
    retr_bytes = models.BigIntegerField(_("bytes retrieved"), default=0)
    top_count = models.PositiveIntegerField(_("TOP commands"), default=0)
    top_bytes = models.BigIntegerField(_("bytes sent by TOP"), default=0)
    deleted_count = models.PositiveIntegerField(_("messages deleted"), default=0)
    deleted_bytes = models.BigIntegerField(_("bytes deleted"), default=0)
    # Marked by DELE so far: removed only if the session reaches its UPDATE state.
    marked_count = models.PositiveIntegerField(_("messages marked deleted"), default=0)
    marked_bytes = models.BigIntegerField(_("bytes marked deleted"), default=0)
    message_count = models.PositiveIntegerField(_("messages at login"), default=0)
    message_bytes = models.BigIntegerField(_("bytes at login"), default=0)
    # Database time of the row's last write: every writer sets it (runpop3's registry, the
    # sweep of lost sessions, kicks), so a console fetches only what changed since its last look.
    updated_at = models.DateTimeField(_("updated"), db_default=Now())

    objects = Pop3SessionQuerySet.as_manager()

    class Meta:
        verbose_name = _("POP3 session")
        verbose_name_plural = _("POP3 sessions")
        ordering = ["-started_at"]
        permissions = [("kick_pop3session", _("Can kick POP3 session"))]
        indexes = [
            models.Index(fields=["node", "ended_at"], name="pop3session_node_live"),
            models.Index(fields=["mailbox", "ended_at"], name="pop3session_mailbox_live"),
            models.Index(fields=["-started_at"], name="pop3session_started"),
            # Only the open rows, a few thousand at most beside weeks of history: a domain's
            # live sessions, or all of them, without reading ended ones.
            models.Index(
                fields=["domain", "started_at"], condition=Q(ended_at__isnull=True), name="pop3session_open"
            ),
            models.Index(fields=["updated_at"], name="pop3session_updated"),
            # The history page: newest first, within one login name, domain, client or end reason.
            *_history_indexes("pop3session", "started_at", ["username", "domain", "peer_host", "end_reason"]),
        ]

    def __str__(self) -> str:
        return f"{self.username or '(no login)'} from {self.peer_host}"


class AuthFailure(models.Model):
    """A failed POP3 login: who tried, from where, why. Never the password.

    ``source`` groups addresses the way the penalty does (an IPv4 address, an IPv6 /48), and
    ``attempt`` is a keyed hash of the tried credentials, so repeating the same wrong password
    does not grow the penalty (as in Dovecot).
    """

    created_at = models.DateTimeField(_("created"), db_index=True)
    # No database constraint: the failure row may be written before its session row is flushed.
    # No index either: nothing looks failures up by session (as with domain below, whose
    # look-ups the history index beginning with it serves).
    session = models.ForeignKey(
        Pop3Session,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        related_name="+",
        verbose_name=_("POP3 session"),
    )
    username = models.CharField(_("username"), max_length=320, blank=True)
    # The domain of the name tried, when it is one of ours: what a domain's administrators see.
    domain = models.ForeignKey(
        Domain,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        verbose_name=_("domain"),
        db_index=False,
    )
    peer_host = models.CharField(_("client address"), max_length=64)
    source = models.CharField(_("source"), max_length=64)
    mechanism = models.CharField(_("mechanism"), max_length=16)
    reason = models.CharField(_("reason"), max_length=64)
    attempt = models.CharField(_("attempt"), max_length=32, blank=True)
    # Credential failures grow the source's penalty; a locked mailbox or a session cap does not.
    penalised = models.BooleanField(_("penalised"), default=True)

    class Meta:
        verbose_name = _("failed login")
        verbose_name_plural = _("failed logins")
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["source", "created_at"], name="authfailure_source_time"),
            *_history_indexes("authfailure", "created_at", ["username", "domain", "peer_host", "reason"]),
        ]

    def __str__(self) -> str:
        return f"{self.username or '?'} from {self.peer_host}: {self.reason}"


class DomainAdministrator(models.Model):
    """Ties a staff user to a domain they administer; a user may administer several.

    A domain administrator is never a mailbox login: the service layer refuses to make one.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="administered_domains",
        verbose_name=_("administrator"),
    )
    domain = models.ForeignKey(
        Domain, on_delete=models.CASCADE, related_name="administrators", verbose_name=_("domain")
    )

    class Meta:
        verbose_name = _("domain administration")
        verbose_name_plural = _("domain administrations")
        constraints = [
            models.UniqueConstraint(fields=["user", "domain"], name="domain_administrator_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.user} administers {self.domain}"


class AuditEntry(models.Model):
    """One change made through the service layer: who, what, when and from where.

    The domain is kept twice: a link for scoping, and its name as text so the entry still says
    which domain it was about after the domain is deleted. ``changes`` maps a field to
    ``[before, after]``; a password or hash appears only as ``"changed"``.
    """

    created_at = models.DateTimeField(_("created"), default=timezone.now)
    actor_kind = models.CharField(_("actor kind"), max_length=16)
    actor_name = models.CharField(_("actor"), max_length=200)
    # The user's id as it was; no foreign key, so the entry outlives the user.
    actor_user_id = models.IntegerField(_("actor user id"), null=True, blank=True)
    client_address = models.CharField(_("client address"), max_length=64, blank=True)
    action = models.CharField(_("action"), max_length=40)
    object_type = models.CharField(_("object type"), max_length=40)
    object_name = models.CharField(_("object"), max_length=320)
    domain = models.ForeignKey(
        Domain, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", verbose_name=_("domain")
    )
    domain_name = models.CharField(_("domain name"), max_length=253, blank=True)
    changes = models.JSONField(_("changes"), default=dict, blank=True)

    class Meta:
        verbose_name = _("audit entry")
        verbose_name_plural = _("audit entries")
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["domain", "created_at"], name="auditentry_domain_time"),
            models.Index(fields=["created_at"], name="auditentry_time"),
        ]

    def __str__(self) -> str:
        return f"{self.actor_name} {self.action} {self.object_type} {self.object_name}"


class LmtpNode(models.Model):
    """A running runlmtp process, heartbeating as :class:`Pop3Node` does for runpop3."""

    name = models.CharField(max_length=200, primary_key=True, help_text="host:pid")
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.name


class HourlyFigures(models.Model):
    """Pruned session history, summed per hour (of ``started_at``) and domain.

    ``prunehistory`` adds each row it deletes to its hour here in the transaction that deletes
    it, so a row is counted once: either here or still in its table, never both. The figures of
    an hour are therefore these plus the rows of that hour not yet pruned (``mailadmin.console.figures``).
    Failed logins count by ``created_at``. Kept for ``MAILADMIN_FIGURES_DAYS``.
    """

    hour = models.DateTimeField()
    domain = models.ForeignKey(Domain, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    sessions = models.BigIntegerField(default=0)
    logins = models.BigIntegerField(default=0)
    failed_logins = models.BigIntegerField(default=0)
    retr_messages = models.BigIntegerField(default=0)
    retr_bytes = models.BigIntegerField(default=0)

    class Meta:
        verbose_name_plural = "hourly figures"
        constraints = [
            # A NULL domain is distinct from every other in a plain unique index: one each way.
            models.UniqueConstraint(
                fields=["hour", "domain"], condition=Q(domain__isnull=False), name="hourlyfigures_hour_domain"
            ),
            models.UniqueConstraint(
                fields=["hour"], condition=Q(domain__isnull=True), name="hourlyfigures_hour_no_domain"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}:00 {self.domain_id or '-'}"


class DeliveryFigures(models.Model):
    """Deliveries per hour, domain and outcome (``delivered`` or the reason of a refusal).

    Counted by the delivering processes in writes they make anyway: the LMTP group commit's
    transaction (stored copies, and refusals batched since the last one), the one statement
    that stores a lone copy on PostgreSQL, or runlmtp's heartbeat.
    The domain is that of the recipient when it is ours, else NULL.
    """

    DELIVERED = "delivered"

    hour = models.DateTimeField()
    domain = models.ForeignKey(Domain, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    outcome = models.CharField(max_length=32)
    messages = models.BigIntegerField(default=0)
    size_bytes = models.BigIntegerField(default=0)

    class Meta:
        verbose_name_plural = "delivery figures"
        constraints = [
            models.UniqueConstraint(
                fields=["hour", "domain", "outcome"],
                condition=Q(domain__isnull=False),
                name="deliveryfigures_key",
            ),
            models.UniqueConstraint(
                fields=["hour", "outcome"],
                condition=Q(domain__isnull=True),
                name="deliveryfigures_key_no_domain",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}:00 {self.domain_id or '-'} {self.outcome}: {self.messages}"


class AdministratorQuerySet(models.QuerySet):
    def administrators(self) -> "AdministratorQuerySet":
        return self.filter(administered_domains__isnull=False).distinct()


class DomainAdministratorLogin(User):
    """The login of a domain administrator, as the admin lists them (a view of ``auth.User``).

    Made and changed through ``services.save_domain_administrator`` only, by superusers.
    """

    objects = AdministratorQuerySet.as_manager()

    class Meta:
        proxy = True
        verbose_name = _("domain administrator")
        verbose_name_plural = _("domain administrators")


# A source of this form, "@domain", is the domain's catch-all (Postfix's virtual(5) notation).
CATCH_ALL_PREFIX = "@"


class AliasQuerySet(models.QuerySet):
    def addresses(self) -> "AliasQuerySet":
        """Aliases of one address, without the domains' catch-alls."""
        return self.exclude(source__startswith=CATCH_ALL_PREFIX)


class Alias(models.Model):
    """An address whose mail goes to other addresses: local mailboxes, other aliases, outside ones.

    A source of the form ``@domain`` is that domain's catch-all, used only for an address that
    is neither a mailbox nor an alias: the same table and notation as Postfix's virtual(5), so
    one expansion rule, one counter and one Postfix view serve both (``DomainCatchAll`` is the
    catch-alls' own admin page). A source is never a mailbox's address, and a mailbox is never
    created over an alias (``store.require_address_free``).
    """

    source = models.CharField(
        _("address"), max_length=320, unique=True, help_text=_("local@domain, or @domain for a catch-all.")
    )
    domain = models.ForeignKey(
        Domain, on_delete=models.PROTECT, related_name="aliases", verbose_name=_("domain")
    )
    active = models.BooleanField(_("active"), default=True)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)

    objects = AliasQuerySet.as_manager()

    class Meta:
        verbose_name = _("alias")
        verbose_name_plural = _("aliases")
        ordering = ["source"]

    def __str__(self) -> str:
        return self.source

    @property
    def is_catch_all(self) -> bool:
        return self.source.startswith(CATCH_ALL_PREFIX)


class CatchAllManager(models.Manager):
    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().filter(source__startswith=CATCH_ALL_PREFIX)


class DomainCatchAll(Alias):
    """The catch-alls among the aliases (source ``@domain``), for a page of their own."""

    objects = CatchAllManager()

    class Meta:
        proxy = True
        verbose_name = _("catch-all")
        verbose_name_plural = _("catch-alls")


class AliasDestination(models.Model):
    """One address an alias delivers to, normalised: a mailbox, another alias or an outside address."""

    alias = models.ForeignKey(Alias, on_delete=models.CASCADE, related_name="destinations")
    address = models.CharField(max_length=320)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["alias", "address"], name="alias_destination_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.alias_id} -> {self.address}"


class AliasDomain(models.Model):
    """Another name for a hosted domain: ``user@name`` is delivered as ``user@target``.

    Its name is no domain of its own (no mailbox or alias can be in it), as in Postfix's
    ``@name @target`` virtual(5) entry.
    """

    name = models.CharField(
        _("name"),
        max_length=253,
        unique=True,
        help_text=_("Lower-case; internationalised names are stored as A-labels."),
    )
    target = models.ForeignKey(
        Domain, on_delete=models.PROTECT, related_name="alias_domains", verbose_name=_("target domain")
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True)

    class Meta:
        verbose_name = _("alias domain")
        verbose_name_plural = _("alias domains")
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} -> {self.target}"


class AliasDailyCount(models.Model):
    """How many messages an alias received on one day (UTC): written by the store as it delivers.

    A row per alias and day keeps "the last 30 days" a sum of at most 30 small rows, with no
    scan of the messages (which do not record the alias they came through).
    """

    alias = models.ForeignKey(Alias, on_delete=models.CASCADE, related_name="daily_counts")
    day = models.DateField()
    messages = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["alias", "day"], name="alias_daily_count_unique")]

    def __str__(self) -> str:
        return f"{self.alias_id} on {self.day}: {self.messages}"
