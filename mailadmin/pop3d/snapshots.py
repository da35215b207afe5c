"""Login snapshots of large mailboxes kept between sessions, in each runpop3 process.

A login reads every message's id, size and UIDL: 100,000 rows take 0.15-0.2 s, and a client
that keeps its mail on the server logs in every few minutes to find nothing new. Dovecot
answers from its index files; here a process keeps the last snapshot of each large mailbox and
takes it again when the mailbox has not changed since, which one read of the mailbox row tells
(its *version*):

* ``changes`` moves on in every transaction that stores or deletes any of its messages, and
  when ``recalcquota`` corrects its counters;
* ``uid_validity`` is new for every mailbox created, so a re-created mailbox that happens to get
  the same id is never taken for its predecessor.

Messages never change once stored, so the same version means the same messages. The version is
read before the messages: if it moves in between, the version kept is already behind the
mailbox's and never matches again. Processes and hosts need not tell each other anything. (A
database restored from a backup can repeat a version with other messages: restart runpop3
after restoring one.)

A mailbox is kept once a snapshot showed it large (``POP3_SNAPSHOT_CACHE_MIN_MESSAGES``) and a
later login read its version first: a process reads a large mailbox twice before it keeps it,
and small mailboxes pay no extra query. At most ``POP3_SNAPSHOT_CACHE_MESSAGES`` messages are
kept per process (each runpop3 worker has its own), the least recently used mailbox going first.
"""

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from pop3.mailbox import MessageInfo

# Mailboxes remembered as large (whose next login reads the version), kept or not.
MAX_MAILBOXES = 1024

Version = tuple[int, int]


class SnapshotCache:
    """Snapshots of large mailboxes, keyed by mailbox id and checked against its version.

    Thread-safe: runpop3's database threads share one.
    """

    def __init__(self, budget_messages: int, min_messages: int) -> None:
        self.budget = budget_messages
        self.min_messages = min_messages
        self.kept = 0  # messages in the snapshots kept
        self._entries: OrderedDict[int, tuple[Version | None, Sequence[MessageInfo]]] = OrderedDict()
        self._lock = threading.Lock()

    def snapshot(
        self,
        mailbox_id: int,
        read_version: Callable[[int], Version | None],
        read_messages: Callable[[int], Sequence[MessageInfo]],
    ) -> Sequence[MessageInfo]:
        """The mailbox's messages: the kept ones when its version has not moved, else read."""
        if self.budget <= 0:
            return read_messages(mailbox_id)
        with self._lock:
            known = mailbox_id in self._entries
        version = read_version(mailbox_id) if known else None
        if version is not None:
            kept = self._take(mailbox_id, version)
            if kept is not None:
                return kept
        messages = read_messages(mailbox_id)
        if len(messages) >= self.min_messages:
            self._keep(mailbox_id, version, messages)
        elif known:
            self._drop(mailbox_id)  # no longer large
        return messages

    def _take(self, mailbox_id: int, version: Version) -> Sequence[MessageInfo] | None:
        with self._lock:
            entry = self._entries.get(mailbox_id)
            if entry is None or entry[0] is None or entry[0] != version:
                return None
            self._entries.move_to_end(mailbox_id)
            return entry[1]

    def _keep(self, mailbox_id: int, version: Version | None, messages: Sequence[MessageInfo]) -> None:
        """Keep ``messages`` under ``version``, or (no version read, or more messages than the
        budget) only remember the mailbox as large: its next login reads them again."""
        if version is None or len(messages) > self.budget:
            version, messages = None, ()
        with self._lock:
            self._forget(mailbox_id)
            self._entries[mailbox_id] = (version, messages)
            self.kept += len(messages)
            while self.kept > self.budget or len(self._entries) > MAX_MAILBOXES:
                self._forget(next(iter(self._entries)))

    def _drop(self, mailbox_id: int) -> None:
        with self._lock:
            self._forget(mailbox_id)

    def _forget(self, mailbox_id: int) -> None:
        entry = self._entries.pop(mailbox_id, None)
        if entry is not None:
            self.kept -= len(entry[1])
