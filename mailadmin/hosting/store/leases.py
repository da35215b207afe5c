"""POP3 maildrop leases: the lock on a mailbox, and the UPDATE state that checks it."""

from collections.abc import Iterable

from django.db import transaction
from django.db.models import F

from mailadmin.hosting.commits import not_waiting_for_the_disk
from mailadmin.hosting.store import fastsql
from mailadmin.hosting.store.errors import LeaseLost
from mailadmin.hosting.store.messages import ID_BATCH_SIZE, delete_messages
from mailadmin.models import Mailbox, MaildropLease

# Taking and giving back a lease, which every login and every QUIT waits for, commit without
# waiting for the disk (commits.not_waiting_for_the_disk). A crash of the database's host that
# forgets them also ends the sessions that made them: a forgotten taking leaves a mailbox
# unlocked whose holder's UPDATE state still checks its lease and so removes nothing
# (:func:`commit_maildrop`); a forgotten giving back leaves a lease that lapses at its expiry.


def acquire_lease(mailbox_id: int, owner: str, node: str, ttl_seconds: float) -> bool:
    """Lock a mailbox for one POP3 session; False when another live session holds it.

    One statement inserts the lease or takes a lapsed one over; the unique mailbox makes
    concurrent takers wait for each other, and only one wins.
    """
    with not_waiting_for_the_disk():
        return fastsql.take_lease(mailbox_id, owner, node, ttl_seconds)


def renew_leases(owners: Iterable[str], ttl_seconds: float) -> int:
    """Heartbeat: push the expiry of the given leases forward; return how many still exist."""
    owners = list(owners)
    renewed = 0
    for start in range(0, len(owners), ID_BATCH_SIZE):
        batch = owners[start : start + ID_BATCH_SIZE]
        renewed += MaildropLease.objects.filter(owner__in=batch).update(
            expires_at=fastsql.lease_expiry(ttl_seconds)
        )
    return renewed


def release_lease(owner: str) -> None:
    with not_waiting_for_the_disk(), fastsql.prepared_cursor() as cursor:
        cursor.execute(fastsql.RELEASE_LEASE, [owner])


def release_node_leases(node: str) -> int:
    """A stopping runpop3 gives back whatever its sessions still hold."""
    return MaildropLease.objects.filter(node=node).delete()[0]


def commit_maildrop(mailbox_id: int, owner: str, message_ids: Iterable[int]) -> tuple[int, int]:
    """The POP3 UPDATE state: delete the messages if ``owner`` still holds the lock.

    The ownership check is an UPDATE of the lease row inside the same transaction as the
    deletions, so a lease taken over meanwhile makes the whole commit fail (LeaseLost) and
    nothing is removed.
    """
    with transaction.atomic():
        if not MaildropLease.objects.filter(mailbox_id=mailbox_id, owner=owner).update(
            acquired_at=F("acquired_at")
        ):
            raise LeaseLost(f"mailbox {mailbox_id}: the POP3 lock was lost before QUIT")
        mailbox = Mailbox.objects.get(pk=mailbox_id)
        return delete_messages(mailbox, message_ids)
