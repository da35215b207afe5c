"""The mail store: the one place that writes mailboxes' messages, chunks and counters.

Invariants kept here (and checked by ``recalculate_quota``):

* a mailbox's ``used_bytes`` / ``used_messages`` equal the sum / count of its messages, and a
  domain's ``used_bytes`` the sum over its mailboxes, after every committed transaction;
* quota is charged by one conditional ``UPDATE`` per counter row (``used + size <= quota``) in
  the same transaction as the message insert, so concurrent deliveries can never overshoot,
  on PostgreSQL (row locks) and on SQLite (``BEGIN IMMEDIATE``) alike;
* UIDs come from ``Mailbox.next_uid`` in that same UPDATE, so a UIDL is never reused.
"""

from mailadmin.hosting.store.accounts import (
    DOMAIN_SETTINGS,
    MAILBOX_SETTINGS,
    check_password_hash,
    create_domain,
    create_mailbox,
    delete_domain,
    delete_mailbox,
    domain_deletion_refusal,
    generate_password,
    get_domain,
    get_mailbox,
    hash_new_password,
    next_uid_validity,
    normalised_or_refused,
    set_password,
    set_password_hash,
    update_domain_settings,
    update_mailbox_settings,
    validate_new_password,
)
from mailadmin.hosting.store.errors import (
    AlreadyExists,
    DomainNotFound,
    InvalidInput,
    LeaseLost,
    LimitReached,
    MailboxNotFound,
    OverQuota,
    StoreError,
)
from mailadmin.hosting.store.fastsql import (
    find_mailbox,
    find_recipient,
    maildrop_snapshot,
    read_chunk,
    read_first_chunks,
)
from mailadmin.hosting.store.leases import (
    acquire_lease,
    commit_maildrop,
    release_lease,
    release_node_leases,
    renew_leases,
)
from mailadmin.hosting.store.messages import (
    ID_BATCH_SIZE,
    ExportEntry,
    StoredMessage,
    append_message,
    append_message_in_group,
    delete_messages,
    existing_import_markers,
    format_uidl,
    iter_mailbox_messages_for_export,
    iter_message_bytes,
    lock_group,
    mark_quota_warning,
    validate_uidl,
)
from mailadmin.hosting.store.quota import Drift, recalculate_quota

__all__ = [
    "DOMAIN_SETTINGS",
    "MAILBOX_SETTINGS",
    "AlreadyExists",
    "DomainNotFound",
    "Drift",
    "ExportEntry",
    "ID_BATCH_SIZE",
    "InvalidInput",
    "LeaseLost",
    "LimitReached",
    "MailboxNotFound",
    "OverQuota",
    "StoreError",
    "StoredMessage",
    "acquire_lease",
    "append_message",
    "append_message_in_group",
    "check_password_hash",
    "commit_maildrop",
    "create_domain",
    "create_mailbox",
    "delete_domain",
    "delete_mailbox",
    "delete_messages",
    "domain_deletion_refusal",
    "existing_import_markers",
    "find_mailbox",
    "find_recipient",
    "format_uidl",
    "generate_password",
    "get_domain",
    "get_mailbox",
    "hash_new_password",
    "iter_mailbox_messages_for_export",
    "iter_message_bytes",
    "lock_group",
    "mark_quota_warning",
    "maildrop_snapshot",
    "next_uid_validity",
    "normalised_or_refused",
    "read_chunk",
    "read_first_chunks",
    "recalculate_quota",
    "release_lease",
    "release_node_leases",
    "renew_leases",
    "set_password",
    "set_password_hash",
    "update_domain_settings",
    "update_mailbox_settings",
    "validate_new_password",
    "validate_uidl",
]
