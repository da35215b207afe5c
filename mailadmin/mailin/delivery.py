"""The one way mail gets in: ``deliver(recipients, stream)``.

It knows nothing of LMTP or exit codes; the doors (``manage.py deliver``, the LMTP listener)
translate its per-recipient results with small tables of their own.
"""

import contextlib
import email.header
import email.utils
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from django.conf import settings
from django.db import DataError, IntegrityError, transaction
from django.utils import timezone, translation

from mailadmin.addresses import domain_of_login, normalise_address
from mailadmin.executors import DATABASE_ERRORS
from mailadmin.hosting import commits, figures, store
from mailadmin.hosting import expansion as expansion_rules
from mailadmin.mailin.messagefile import MessageTooLarge, Readable, SpooledMessage, spool_message
from mailadmin.mailin.status import DeliveryStatus
from mailadmin.models import Mailbox
from mailadmin.units import format_size
from pop3.session import log_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecipientResult:
    recipient: str
    status: DeliveryStatus
    uidl: str | None = None
    # A recipient DELIVERED through an alias: the results of its mailboxes that refused a copy.
    missed: tuple["RecipientResult", ...] = ()

    @property
    def delivered(self) -> bool:
        return self.status is DeliveryStatus.DELIVERED


def deliver(
    recipients: Sequence[str],
    stream: Readable | Iterable[bytes],
    *,
    sender: str = "",
    all_or_none: bool = False,
) -> list[RecipientResult]:
    """Deliver one message to each recipient; return one result per recipient, in order.

    Each recipient's copy gets ``Return-Path:`` and ``Delivered-To:`` lines prepended. The
    copies are stored in one transaction, a recipient refused (unknown, disabled, full) on its
    own; with ``all_or_none`` one refusal stores nothing at all, so a retry after a failure can
    never duplicate a copy. A message of no bytes at all is refused (EMPTY_MESSAGE): it is a
    pipe that delivered nothing, not mail. Returns only after the stored copies are committed.
    """
    try:
        message = spool_message(stream)
    except MessageTooLarge:
        return record_refusals(
            [RecipientResult(recipient, DeliveryStatus.TOO_LARGE) for recipient in recipients]
        )
    with message:
        if message.size_bytes == 0:
            return record_refusals(
                [RecipientResult(recipient, DeliveryStatus.EMPTY_MESSAGE) for recipient in recipients]
            )
        return _deliver_spooled(recipients, message, sender=sender, all_or_none=all_or_none)


def _deliver_spooled(
    recipients: Sequence[str], message: SpooledMessage, *, sender: str = "", all_or_none: bool = False
) -> list[RecipientResult]:
    """:func:`deliver` once the message is spooled: look every recipient up, store as a group."""
    try:
        found = [look_up_recipient(recipient, message.size_bytes) for recipient in recipients]
        accepted = [entry for entry in found if isinstance(entry, Recipient)]
        if all_or_none and len(accepted) < len(found):
            return record_refusals(
                [_not_attempted_unless_refused(r, entry) for r, entry in zip(recipients, found, strict=True)]
            )
        tally = figures.DeliveryTally()
        for r, entry in zip(recipients, found, strict=True):
            if not isinstance(entry, Recipient):
                count_refusal(tally, r, outcome_name(entry))
        group = [Delivery(accepted, message, sender)]
        stored = iter(deliver_group(group, all_or_none=all_or_none, tally=tally)[0])
    except DATABASE_ERRORS:
        logger.exception("delivery to %s failed", " ".join(map(log_text, recipients)))
        return [RecipientResult(recipient, DeliveryStatus.TEMPORARY_FAILURE) for recipient in recipients]
    return [
        next(stored) if isinstance(entry, Recipient) else RecipientResult(r, entry)
        for r, entry in zip(recipients, found, strict=True)
    ]


def outcome_name(status: DeliveryStatus) -> str:
    """How the delivery figures name an outcome: ``over_quota``, ``no_such_mailbox``, ..."""
    return status.name.lower()


def count_refusal(tally: figures.DeliveryTally, recipient: str, outcome: str) -> None:
    """Count a recipient refused before its group commit, under its domain when it names one."""
    tally.add(domain_of_login(recipient), outcome)


def record_refusals(results: list[RecipientResult]) -> list[RecipientResult]:
    """Write the refusals among ``results`` in a transaction of their own, for a door that made
    no other (the pipe's one delivery per process); a database that fails loses only them."""
    tally = figures.DeliveryTally()
    for result in results:
        if result.status not in UNCOUNTED:
            count_refusal(tally, result.recipient, outcome_name(result.status))
    if len(tally):
        try:
            with transaction.atomic():
                figures.add_deliveries([], [], tally.drain())
        except DATABASE_ERRORS:
            logger.warning("delivery figures not written: the database is unavailable")
    return results


def _not_attempted_unless_refused(recipient: str, entry: "Recipient | DeliveryStatus") -> RecipientResult:
    return RecipientResult(recipient, DeliveryStatus.NOT_ATTEMPTED if isinstance(entry, Recipient) else entry)


@dataclass(frozen=True)
class Recipient:
    """An accepted recipient: the address as the client gave it, and the mailboxes it reaches.

    One mailbox for a mailbox's address; for an alias, each distinct mailbox it expands to (at
    that time), with the aliases passed through, whose counters the delivery moves.
    """

    address: str
    mailboxes: tuple[Mailbox, ...]
    alias_ids: tuple[int, ...] = ()
    # Whether every one of them had room at RCPT; an alias keeps one that had not, to be tried
    # at commit, where its domain may well still be full: see deliver_group.
    all_had_room: bool = True


@dataclass(frozen=True)
class Delivery:
    """One message for recipients looked up before (LMTP's RCPT), as part of a group."""

    recipients: Sequence[Recipient]
    message: SpooledMessage
    sender: str = ""


def look_up_recipient(recipient: str, size_hint: int = 0) -> Recipient | DeliveryStatus:
    """The recipient, if a delivery of ``size_hint`` bytes looks possible now; else why not.

    For LMTP's RCPT stage, as Dovecot looks the user up at RCPT: the delivery then stores into
    this mailbox, and its quota is charged (and checked again, by the same rule) atomically in
    the group. A mailbox's address costs one query (``store.find_recipient``, the expansion's
    first question); only an address that is no mailbox is looked up in the alias tables
    (:mod:`mailadmin.hosting.expansion`).
    """
    address = _normalised_or_none(recipient)
    if address is None:
        return DeliveryStatus.NO_SUCH_MAILBOX
    try:
        expansion = expansion_rules.expand(address, store.StoreDirectory(_size_asked(size_hint)))
    except expansion_rules.ExpansionError as error:
        logger.warning("RCPT %s refused: %s", log_text(recipient), error)
        return DeliveryStatus.ALIAS_LOOP
    if expansion.outside:
        logger.warning(
            "RCPT %s refused: forwards to %s (outside addresses are for the MTA to expand)",
            log_text(recipient),
            ", ".join(map(log_text, expansion.outside)),
        )
        return DeliveryStatus.OUTSIDE_DESTINATION
    return _accepted(recipient, list(expansion.mailboxes.values()), tuple(expansion.alias_ids))


def _size_asked(size_hint: int) -> int:
    """The size a look-up asks room for: a client that named none (or 0) still needs a byte."""
    return max(size_hint, 1)


async def look_up_recipient_on_the_loop(
    recipient: str, size_hint: int, statements: "store.LoopStatements"
) -> Recipient | DeliveryStatus | None:
    """:func:`look_up_recipient` for an address that is a mailbox, asked from the event loop
    (``store.LoopStatements``, PostgreSQL); None when the address is no mailbox (an alias, or
    unknown: asked again there, one look-up more) or the statement went unanswered:
    :func:`look_up_recipient` then answers, in a database thread, what it would have anyway."""
    address = _normalised_or_none(recipient)
    if address is None:
        return DeliveryStatus.NO_SUCH_MAILBOX
    try:
        found = await statements.find_recipient(address, _size_asked(size_hint))
    except store.Unanswered:
        return None
    return None if found is None else _accepted(recipient, [found], ())


def _accepted(
    recipient: str, found: list[tuple[Mailbox, bool]], alias_ids: tuple[int, ...]
) -> Recipient | DeliveryStatus:
    """A recipient of the usable mailboxes found, if one of them has room now; else why not.

    Through an alias, a disabled mailbox among several is left out (as a deleted one is), and
    one that is full now is still tried at commit: it may have room by then, and its refusal
    then fails its copy alone.
    """
    usable = [(mailbox, fits) for mailbox, fits in found if _active(mailbox)]
    if not found:
        return DeliveryStatus.NO_SUCH_MAILBOX
    if not usable:
        return DeliveryStatus.MAILBOX_INACTIVE
    if not any(fits for _, fits in usable):
        return DeliveryStatus.OVER_QUOTA
    all_had_room = all(fits for _, fits in usable)
    return Recipient(recipient, tuple(mailbox for mailbox, _ in usable), alias_ids, all_had_room)


# Outcomes that are not refusals of their own: the recipient's copy was not even tried.
UNCOUNTED = frozenset({DeliveryStatus.DELIVERED, DeliveryStatus.NOT_ATTEMPTED})


def deliver_group(
    deliveries: Sequence[Delivery],
    tally: figures.DeliveryTally | None = None,
    *,
    all_or_none: bool = False,
) -> list[list[RecipientResult]]:
    """Store several deliveries in one transaction: one commit (one fsync) for all of them.

    A group that is one copy and nothing else, the usual LMTP delivery, is stored on
    PostgreSQL by one statement committed on its own instead (:func:`_stored_alone`), with the
    same charges, rows and figures; a copy that statement does not store goes as below.

    The copies go in together (``store.append_messages_in_group``: a few statements for the
    whole group), and their domains are charged last, just before the figures and the commit
    (``store.DomainChargesLast``: a domain's row is every delivery's to it); a domain without
    room by then has the group stored again with each domain charged along with its mailbox,
    as a group is stored from the start when a mailbox of it had no room at RCPT.
    A copy that no longer fits (or whose mailbox went away since it was looked
    up) is refused on its own without a savepoint; the others are stored, unless
    ``all_or_none``: then one refusal rolls everything back and the other copies are
    NOT_ATTEMPTED. When storing them together fails in a way that may be one copy's
    (:data:`COPY_ERRORS`: a constraint, a value the database refuses, a bug), the group is rolled
    back and stored again one copy at a time, which finds the copy: the group is rolled back
    once more and stored without it, so it alone is a TEMPORARY_FAILURE (one retry per failing
    copy). Returns one result list per delivery once the commit is done. When the database
    itself fails (or, on the one-statement path, anything but the statement's refusal), raises,
    and nothing of the group was stored unless it raised after the commit; or for SQLite's
    ``LogNotFlushed``: committed, and not known to be durable (not with ``all_or_none``, which
    commits at FULL). Either way none of its copies may be acknowledged.

    The group's stored copies and refusals, and the refusals waiting in ``tally``, are added to
    the delivery figures in the same transaction: counting costs no commit of its own.
    """
    _summarise_before_the_transaction(deliveries)
    alone = _stored_alone(deliveries, tally)
    if alone is not None:
        return alone
    failed: set[_Position] = set()  # copies that failed
    one_by_one = False
    # A copy for a mailbox that was full at RCPT is likely refused again: charging its domain
    # last would only find that out after writing the whole group, and write it twice.
    domains_last = all(recipient.all_had_room for delivery in deliveries for recipient in delivery.recipients)
    while True:
        try:
            return _store_group(
                deliveries, failed, all_or_none, tally or figures.DeliveryTally(), one_by_one, domains_last
            )
        except _DomainFull:
            domains_last = False  # again, each domain charged with its mailbox: see DomainChargesLast
        except _GroupFailed as failure:
            logger.warning(
                "a group of %d deliveries failed; storing its copies one at a time",
                len(deliveries),
                exc_info=failure.__cause__,
            )
            one_by_one = True
        except _CopyFailed as failure:
            logger.error("delivery to %s failed", log_text(failure.address), exc_info=failure.__cause__)
            failed.add(failure.position)


def _summarise_before_the_transaction(deliveries: Sequence[Delivery]) -> None:
    """Parse each message's Subject and From for its row now: inside the transaction, on
    SQLite, every other writer of every process would wait for the parsing too."""
    for delivery in deliveries:
        _ = delivery.message.summary


def _stored_alone(
    deliveries: Sequence[Delivery], tally: figures.DeliveryTally | None
) -> list[list[RecipientResult]] | None:
    """The results of a group that is one copy and nothing else, stored by a statement of its
    own (``store.append_lone_copy``); None when the group is more, or the copy was not stored.

    Outside any transaction only. Whatever this path does not store, it leaves as it was, for
    the group's transaction to store or refuse as any other.
    """
    copy = lone_copy_of(deliveries, tally)
    if copy is None or transaction.get_connection().in_atomic_block:
        return None
    try:
        stored = store.append_lone_copy(copy, figures.hour_of(timezone.now()))
    except COPY_ERRORS:
        # Refused with its statement, which wrote nothing: the group's transaction stores the
        # copy again and finds it at fault. Any other error is raised (the group path would
        # make a copy's own error a TEMPORARY_FAILURE): one after the commit, caught here, would
        # have the group store the copy twice, and the group answers as its caller answers a
        # database error, with temporary failures.
        return None
    if stored is None:
        return None
    results, stored_copy = lone_results(deliveries[0], copy, stored)
    _warn_if_quota_crossed(stored_copy)
    return results


async def stored_alone_on_the_loop(
    deliveries: Sequence[Delivery],
    tally: figures.DeliveryTally | None,
    statements: "store.LoopStatements",
    in_a_thread: Callable[..., Awaitable],
) -> list[list[RecipientResult]] | None:
    """:func:`_stored_alone` with the statement sent from the event loop (``store.LoopStatements``,
    PostgreSQL); None, with nothing stored, for a group this cannot store, which goes on to
    :func:`deliver_group` in a database thread as any other. ``in_a_thread(function, *args)``
    runs the rare work that needs Django's connection: a quota warning to deliver.

    Raises when the statement may have stored the copy and its answer was lost with the
    connection: the caller answers it as a database error, with temporary failures.
    """
    copy = lone_copy_of(deliveries, tally)
    lone = None if copy is None else store.lone_copy(copy, figures.hour_of(timezone.now()))
    if lone is None:
        return None
    try:
        stored = store.stored_lone_copy(copy, await statements.store_lone_copy(lone))
    except store.Unanswered:
        return None
    if stored is None:
        return None
    results, stored_copy = lone_results(deliveries[0], copy, stored)
    try:  # the copy is committed: from here on nothing may fail its delivery
        if quota_warning_due(stored_copy) is not None:
            await in_a_thread(_warn_if_quota_crossed, stored_copy)
    except Exception:
        logger.exception("quota warning for %s failed", copy.mailbox.address)
    return results


def lone_copy_of(
    deliveries: Sequence[Delivery], tally: figures.DeliveryTally | None
) -> store.GroupCopy | None:
    """The one copy of a group that may be stored by a statement of its own, or None.

    One delivery to one mailbox, reached by address (not through an alias), that had room at
    RCPT, with no refusals waiting to be counted: the usual LMTP delivery.
    """
    if len(deliveries) != 1 or (tally is not None and len(tally)):
        return None
    delivery = deliveries[0]
    mailboxes = {mailbox.pk: mailbox for recipient in delivery.recipients for mailbox in recipient.mailboxes}
    if len(mailboxes) != 1 or any(r.alias_ids or not r.all_had_room for r in delivery.recipients):
        return None
    (mailbox,) = mailboxes.values()
    prefix = trace_headers(delivery.sender, mailbox.address)
    return store.GroupCopy(mailbox, delivery.message, prefix, delivery.sender)


def lone_results(
    delivery: Delivery, copy: store.GroupCopy, stored: store.StoredMessage
) -> tuple[list[list[RecipientResult]], "_Copy"]:
    """The results of a lone copy stored, and the stored copy (for its quota warning)."""
    copies: list[_Copy] = []
    result = _copy_result(copy.mailbox, stored, copies)
    return [_delivery_results(0, delivery, {(0, copy.mailbox.pk): result})], copies[0]


# What one copy's store may raise without saying anything about the others: its row breaks a
# constraint (a mailbox whose next_uid went back collides on its UIDL), the database refuses
# one of its values, or our code fails on this message. Any other database error (the
# connection, a lock, the disk) is the group's, and fails all of it.
COPY_ERRORS = (IntegrityError, DataError)

# A copy's place in a group: (the delivery's index, the mailbox's id).
_Position = tuple[int, int]


class _CopyFailed(Exception):
    def __init__(self, position: _Position, address: str) -> None:
        super().__init__(f"copy {position} for {address}")
        self.position = position
        self.address = address


class _GroupFailed(Exception):
    """Storing the group's copies together failed with what may be one copy's error."""


class _DomainFull(Exception):
    """A domain had no room for the group's copies when its charge came, last."""


def _store_group(
    deliveries: Sequence[Delivery],
    failed: set[_Position],
    all_or_none: bool,
    tally: figures.DeliveryTally,
    one_by_one: bool,
    domains_last: bool,
) -> list[list[RecipientResult]]:
    """One attempt at :func:`deliver_group`, skipping the copies in ``failed``; with
    ``domains_last``, the domains are charged after every copy is in (``store.DomainChargesLast``)."""
    copies: list[_Copy] = []
    planned = _planned_copies(deliveries, failed)
    domain_charges = store.DomainChargesLast() if domains_last else None
    # All or none (the pipe's one delivery): a commit at FULL, never published unflushed, so that
    # a failure leaves nothing stored and the MTA's retry never duplicates (see LogNotFlushed).
    flushing = contextlib.nullcontext() if all_or_none else commits.flushed_outside_the_write_turn()
    with tally.pending() as waiting, flushing, transaction.atomic():
        store.lock_group((mailbox for _, mailbox, _ in planned), domains=not domains_last)
        outcomes = _store_copies(planned, copies, one_by_one, domain_charges)
        if domain_charges is not None and not domain_charges.charge():
            raise _DomainFull()
        results = [_delivery_results(d, delivery, outcomes) for d, delivery in enumerate(deliveries)]
        refused = any(not result.delivered for group in results for result in group)
        if all_or_none and refused:
            transaction.set_rollback(True)
            copies.clear()
            results = [[_not_attempted_if_delivered(result) for result in group] for group in results]
            tally.restore(waiting)
        else:
            _count(deliveries, results, copies, waiting)
    if all_or_none and refused:
        record_refusals([result for group in results for result in group])
    for copy in copies:
        _warn_if_quota_crossed(copy)
    return results


def _planned_copies(
    deliveries: Sequence[Delivery], failed: set[_Position]
) -> list[tuple[_Position, Mailbox, Delivery]]:
    """One copy per mailbox of each delivery, however many of its recipients reach it.

    An MTA may give the same mailbox twice (two spellings of one address, or a list expanded
    twice), and aliases may reach it too; RFC 2033 still wants one reply per accepted RCPT
    (:func:`_delivery_results`).
    """
    planned: dict[_Position, tuple[_Position, Mailbox, Delivery]] = {}
    for d, delivery in enumerate(deliveries):
        for recipient in delivery.recipients:
            for mailbox in recipient.mailboxes:
                position = (d, mailbox.pk)
                if position not in failed and position not in planned:
                    planned[position] = (position, mailbox, delivery)
    return list(planned.values())


def _store_copies(
    planned: list[tuple[_Position, Mailbox, Delivery]],
    copies: list["_Copy"],
    one_by_one: bool,
    domain_charges: store.DomainChargesLast | None,
) -> dict[_Position, RecipientResult]:
    """Each planned copy's result: together, or (a group of one, or to find a failing copy) one at a time."""
    if one_by_one or len(planned) == 1:
        return {
            position: _store_copy(position, mailbox, delivery, copies, domain_charges)
            for position, mailbox, delivery in planned
        }
    group = [
        store.GroupCopy(
            mailbox, delivery.message, trace_headers(delivery.sender, mailbox.address), delivery.sender
        )
        for _, mailbox, delivery in planned
    ]
    try:
        stored = store.append_messages_in_group(group, domain_charges)
    except COPY_ERRORS as error:
        raise _GroupFailed() from error
    except DATABASE_ERRORS:
        raise
    except Exception as error:
        raise _GroupFailed() from error
    return {
        position: _copy_result(mailbox, one, copies)
        for (position, mailbox, _), one in zip(planned, stored, strict=True)
    }


def _count(
    deliveries: Sequence[Delivery],
    results: list[list[RecipientResult]],
    copies: list["_Copy"],
    waiting: figures.DeliveryCounts,
) -> None:
    """The group's figures: one per stored copy, one per refused recipient (in the domain of its
    first mailbox: an alias's are its own domain's or those it may reach), and ``waiting``."""
    refusals = [
        (recipient.mailboxes[0].domain_id, outcome_name(result.status))
        for delivery, group in zip(deliveries, results, strict=True)
        for recipient, result in zip(delivery.recipients, group, strict=True)
        if result.status not in UNCOUNTED
    ]
    stored = [(copy.mailbox.domain_id, copy.size_bytes) for copy in copies]
    figures.add_deliveries(stored, refusals, waiting)


def _delivery_results(
    index: int, delivery: Delivery, outcomes: dict[_Position, RecipientResult]
) -> list[RecipientResult]:
    """Each recipient's result from its mailboxes' copies (a copy that failed before, and was
    not tried again, a TEMPORARY_FAILURE); the aliases that got the message are counted."""
    results = []
    through_aliases: set[int] = set()  # each alias counts the message once, however often named
    for recipient in delivery.recipients:
        copies = [
            outcomes.get((index, mailbox.pk))
            or RecipientResult(mailbox.address, DeliveryStatus.TEMPORARY_FAILURE)
            for mailbox in recipient.mailboxes
        ]
        result = _recipient_result(recipient, copies)
        if result.delivered:
            through_aliases.update(recipient.alias_ids)
        results.append(result)
    if through_aliases:
        store.count_alias_delivery(sorted(through_aliases))
    return results


def _recipient_result(recipient: Recipient, copies: list[RecipientResult]) -> RecipientResult:
    """A recipient's result from its copies' (one, unless it is an alias).

    An alias is DELIVERED once any of its mailboxes has its copy, naming in ``missed`` those
    that refused theirs (full): a temporary failure would make the MTA send the message again
    to the mailboxes that have it. When none has it, the first copy's refusal is the answer.
    """
    stored = [copy for copy in copies if copy.delivered]
    if not stored:
        return replace(copies[0], recipient=recipient.address)
    missed = tuple(copy for copy in copies if not copy.delivered)
    if missed:
        refusals = ", ".join(f"{copy.recipient} ({copy.status.value})" for copy in missed)
        logger.warning("delivery to %s: stored, but not for %s", log_text(recipient.address), refusals)
    return RecipientResult(recipient.address, DeliveryStatus.DELIVERED, stored[0].uidl, missed)


def _store_copy(
    position: _Position,
    mailbox: Mailbox,
    delivery: Delivery,
    copies: list["_Copy"],
    domain_charges: store.DomainChargesLast | None,
) -> RecipientResult:
    """One copy stored on its own; any error but the database's is this copy's."""
    try:
        stored = store.append_message_in_group(
            mailbox,
            delivery.message,
            prefix=trace_headers(delivery.sender, mailbox.address),
            envelope_sender=delivery.sender,
            domains_last=domain_charges,
        )
    except COPY_ERRORS as error:
        raise _CopyFailed(position, mailbox.address) from error
    except DATABASE_ERRORS:
        raise
    except Exception as error:
        raise _CopyFailed(position, mailbox.address) from error
    return _copy_result(mailbox, stored, copies)


def _copy_result(
    mailbox: Mailbox, stored: store.StoredMessage | None, copies: list["_Copy"]
) -> RecipientResult:
    """One mailbox's copy, as a result under the mailbox's address; a stored one joins ``copies``."""
    if stored is None:
        return RecipientResult(mailbox.address, DeliveryStatus.OVER_QUOTA)
    copies.append(_Copy(stored.uidl, mailbox, stored.mailbox_used_bytes, stored.size_bytes))
    return RecipientResult(mailbox.address, DeliveryStatus.DELIVERED, stored.uidl)


def _not_attempted_if_delivered(result: RecipientResult) -> RecipientResult:
    return RecipientResult(result.recipient, DeliveryStatus.NOT_ATTEMPTED) if result.delivered else result


@dataclass(frozen=True)
class _Copy:
    """One stored copy, with what the quota warning needs to know without asking again."""

    uidl: str
    mailbox: Mailbox
    used_bytes: int
    size_bytes: int


def _active(mailbox: Mailbox) -> bool:
    return mailbox.is_usable()


def _warn_if_quota_crossed(copy: _Copy) -> None:
    """Deliver one warning when usage first reaches a warning percentage (80 %, 95 %).

    The announced percentage is moved with a conditional UPDATE, so concurrent deliveries
    crossing the same line send one warning between them. When usage falls (mail was
    fetched and deleted) the mark falls with it, and the next crossing warns again. It comes
    after the copy's commit: whatever fails here is logged, never raised, since the MTA would
    take an error for a delivery to make again.
    """
    mailbox = copy.mailbox
    try:
        percent = quota_warning_due(copy)
        if percent is not None and store.mark_quota_warning(mailbox.pk, percent):
            _deliver_warning(mailbox, percent, copy.used_bytes)
    except Exception:
        logger.exception("quota warning for %s failed", mailbox.address)


def quota_warning_due(copy: _Copy) -> int | None:
    """The warning percentage the copy's mailbox has reached, when it is not the one announced
    (up or down: see :func:`_warn_if_quota_crossed`); None when nothing is to be done."""
    mailbox = copy.mailbox
    if not mailbox.quota_bytes:
        return None
    reached = [
        p for p in mailbox.domain.warning_percents() if 100 * copy.used_bytes >= p * mailbox.quota_bytes
    ]
    percent = max(reached, default=0)
    return None if percent == mailbox.quota_warning_percent else percent


def _deliver_warning(mailbox: Mailbox, percent: int, used_bytes: int) -> None:
    values = {
        "address": mailbox.address,
        "percent": percent,
        "used": format_size(used_bytes),
        "quota": format_size(mailbox.quota_bytes),
    }
    sender = f"{settings.MAILADMIN_QUOTA_WARNING_FROM}@{mailbox.domain.name}"
    with translation.override(mailbox.domain.language):
        subject = translation.gettext(settings.MAILADMIN_QUOTA_WARNING_SUBJECT).format(**values)
        body = translation.gettext(settings.MAILADMIN_QUOTA_WARNING_BODY).format(**values)
    text = (
        f"From: {sender}\nTo: {mailbox.address}\n"
        f"Subject: {_header_text(subject)}\n"
        f"Date: {email.utils.formatdate(localtime=False)}\n"
        f"Message-ID: {email.utils.make_msgid(domain=mailbox.domain.name)}\n"
        "Auto-Submitted: auto-generated\nContent-Type: text/plain; charset=utf-8\n\n"
        f"{body}"
    )
    with spool_message([text.encode()]) as warning:
        # A warning must reach a nearly full mailbox: it is charged but not refused.
        store.append_message(
            mailbox,
            warning,
            prefix=trace_headers("", mailbox.address),
            envelope_sender="",
            enforce_quota=False,
        )


def _header_text(text: str) -> str:
    """ASCII as it is; other text as RFC 2047 encoded words (a translated subject)."""
    return text if text.isascii() else email.header.Header(text, "utf-8").encode()


def trace_headers(sender: str, recipient: str) -> bytes:
    """The Return-Path and Delivered-To lines of RFC 5321 section 4.4 and RFC 9228."""
    return f"Return-Path: <{_header_safe(sender)}>\r\nDelivered-To: {_header_safe(recipient)}\r\n".encode()


def _header_safe(value: str) -> str:
    """Envelope addresses come from the network: keep them on one line and in ASCII."""
    return "".join(c for c in value if 0x21 <= ord(c) <= 0x7E and c not in "<>")


def _normalised_or_none(recipient: str) -> str | None:
    try:
        return normalise_address(recipient)
    except ValueError:
        return None
