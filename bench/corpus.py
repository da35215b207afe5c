"""The benchmark corpus: mailboxes and messages generated deterministically from a seed.

``CorpusSpec`` is plain data the bench process uses to know the addresses and sizes.
``python -m bench.corpus SPEC.json MANIFEST.json`` builds it in a child process with Django set
up (the environment carries DATABASE_URL), through the project's own code paths:
``store.create_mailbox`` for accounts and ``delivery.deliver`` for ordinary mail. The
100,000-message mailbox goes through ``store.append_message`` in batched transactions, which
keeps every counter exact while avoiding one commit (and one fsync) per message.
"""

import base64
import io
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DOMAIN = "bench.test"
# One password for every mailbox; it passes the project's password validators.
PASSWORD = "Bench-corpus-pass-7f3a9c"
SENDER = "loadgen@sender.bench.test"
LINE_WIDTH = 76
# The large mailbox reuses this many message bodies, each spooled once, with a per-message header.
LARGE_MAILBOX_VARIANTS = 32
LARGE_MAILBOX_BATCH = 1000
# One fleet mailbox in this many gets a 1-5 MB MIME message among its text messages.
FLEET_LARGE_ONE_IN = 2
# Fleet messages are cut from a few long texts and attachments, each message with headers of
# its own: generating 1.4 GB of prose message by message would take minutes.
FLEET_TEXT_VARIANTS = 16
FLEET_ATTACHMENT_VARIANTS = 4
WORDS = (
    "mail server mailbox message quota lease session login retrieve delivery chunk header body "
    "provider hosting poll client cache argon password verify network loopback transfer octets "
    "the of and to in is for on with as at by from this that be are was it an or"
).split()


@dataclass(frozen=True)
class CorpusSpec:
    seed: int = 5
    users: int = 10
    messages_per_user: int = 40
    small_bytes: int = 2_000
    medium_count: int = 6
    medium_bytes: int = 50_000
    large_count: int = 6
    large_min_bytes: int = 1_000_000
    large_max_bytes: int = 5_000_000
    idle_users: int = 1_000  # two per idle session: plain and TLS sessions use different mailboxes
    large_mailbox_messages: int = 100_000
    large_mailbox_message_bytes: int = 1_000
    big_users: int = 10
    big_message_bytes: int = 25_000_000
    sink_users: int = 4
    # The fleet: many mailboxes of mixed mail, the workload compared with Dovecot in one run.
    fleet_users: int = 500
    fleet_messages: int = 40  # per mailbox; about one mailbox in FLEET_LARGE_ONE_IN adds a large one
    fleet_min_bytes: int = 2_000
    fleet_max_bytes: int = 70_000

    @classmethod
    def smoke(cls) -> "CorpusSpec":
        return cls(
            users=4,
            messages_per_user=5,
            medium_count=1,
            large_count=1,
            large_min_bytes=1_000_000,
            large_max_bytes=1_000_000,
            idle_users=20,
            large_mailbox_messages=1_000,
            big_users=3,
            big_message_bytes=2_000_000,
            fleet_users=4,
            fleet_messages=5,
        )

    def user(self, index: int) -> str:
        return f"user{index:02d}@{DOMAIN}"

    def idle_user(self, index: int) -> str:
        return f"idle{index:04d}@{DOMAIN}"

    def big_user(self, index: int) -> str:
        return f"big{index:02d}@{DOMAIN}"

    def sink_user(self, index: int) -> str:
        return f"sink{index}@{DOMAIN}"

    def fleet_user(self, index: int) -> str:
        return f"fleet{index:03d}@{DOMAIN}"

    @property
    def fleet(self) -> list[str]:
        return [self.fleet_user(i) for i in range(self.fleet_users)]

    @property
    def large_mailbox_user(self) -> str:
        return f"large@{DOMAIN}"

    @property
    def corpus_users(self) -> list[str]:
        return [self.user(i) for i in range(self.users)]


# --- Message text (pure, no Django) ----------------------------------------------------------


def _text_lines(rng: random.Random, size: int) -> list[bytes]:
    """Wrapped prose of about ``size`` bytes; one line in 40 starts with a dot (dot-stuffing)."""
    lines: list[bytes] = []
    total = 0
    while total < size:
        words: list[str] = [rng.choice(WORDS)]
        while len(" ".join(words)) < rng.randint(30, LINE_WIDTH - 8):
            words.append(rng.choice(WORDS))
        line = " ".join(words)
        if rng.randrange(40) == 0:
            line = "." + line
        lines.append(line.encode())
        total += len(line) + 2
    return lines


def _headers(rng: random.Random, recipient: str, number: int, extra: str = "") -> bytes:
    subject = " ".join(rng.choice(WORDS) for _ in range(5))
    minute = number % 60
    return (
        f"From: Load Generator <{SENDER}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: Mon, 03 Mar 2025 10:{minute:02d}:00 +0000\r\n"
        f"Message-ID: <{number}.{rng.getrandbits(48):012x}@{DOMAIN}>\r\n"
        f"MIME-Version: 1.0\r\n{extra}"
    ).encode()


def text_message(rng: random.Random, recipient: str, number: int, size: int) -> bytes:
    head = _headers(rng, recipient, number, "Content-Type: text/plain; charset=us-ascii\r\n")
    body = b"\r\n".join(_text_lines(rng, max(0, size - len(head) - 2)))
    return head + b"\r\n" + body + b"\r\n"


def attachment_message(rng: random.Random, recipient: str, number: int, size: int) -> bytes:
    """A MIME message of about ``size`` bytes, mostly one base64 attachment, as large mail is."""
    boundary = f"b{rng.getrandbits(64):016x}"
    head = _headers(rng, recipient, number, f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n')
    intro = b"\r\n".join(_text_lines(rng, 400))
    payload = base64.encodebytes(rng.randbytes(max(0, size - len(head) - 800) * 3 // 4))
    parts = [
        head,
        b"\r\n",
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\n".encode(),
        intro,
        f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        'Content-Disposition: attachment; filename="data.bin"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n".encode(),
        payload.replace(b"\n", b"\r\n"),
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)


def corpus_plan(spec: CorpusSpec) -> list[tuple[str, str, int]]:
    """(recipient, kind, size) of every ordinary message, in delivery order.

    Every user gets ``messages_per_user`` small text messages; the 50 KB messages go to the
    first users and the 1-5 MB ones to the last users, one each, interleaved with the small ones.
    """
    rng = random.Random(spec.seed)
    plan: list[tuple[str, str, int]] = []
    for index in range(spec.users):
        user = spec.user(index)
        messages = [
            (user, "text", spec.small_bytes + rng.randint(-300, 300)) for _ in range(spec.messages_per_user)
        ]
        if index < spec.medium_count:
            messages.insert(rng.randrange(len(messages) + 1), (user, "text", spec.medium_bytes))
        if index >= spec.users - spec.large_count:
            size = rng.randint(spec.large_min_bytes, spec.large_max_bytes)
            messages.insert(rng.randrange(len(messages) + 1), (user, "attachment", size))
        plan += messages
    return plan


def fleet_plan(spec: CorpusSpec) -> list[list[tuple[str, int]]]:
    """Per fleet mailbox, (kind, size) of each message in delivery order: text of
    ``fleet_min_bytes``-``fleet_max_bytes``, and in about one mailbox in FLEET_LARGE_ONE_IN
    one MIME message of ``large_min_bytes``-``large_max_bytes`` (about 70 KB a message on average)."""
    rng = random.Random(spec.seed + 4)
    plan = []
    for _ in range(spec.fleet_users):
        sizes = [
            ("text", rng.randint(spec.fleet_min_bytes, spec.fleet_max_bytes))
            for _ in range(spec.fleet_messages)
        ]
        if rng.randrange(FLEET_LARGE_ONE_IN) == 0:
            sizes.insert(
                rng.randrange(len(sizes) + 1),
                ("attachment", rng.randint(spec.large_min_bytes, spec.large_max_bytes)),
            )
        plan.append(sizes)
    return plan


# --- Building it (child process, Django set up) ----------------------------------------------


def build(spec: CorpusSpec) -> dict:
    """Create every mailbox and message of ``spec``; return a manifest of counts and timings."""
    from django.contrib.auth.hashers import make_password

    from mailadmin.hosting import store

    started = time.perf_counter()
    store.create_domain(DOMAIN)
    for user in spec.corpus_users:
        store.create_mailbox(user, password=PASSWORD)  # each with its own salt, Django's argon2
    shared_hash = make_password(PASSWORD)  # the same parameters; hashed once for the many others
    others = (
        [spec.idle_user(i) for i in range(spec.idle_users)]
        + [spec.big_user(i) for i in range(spec.big_users)]
        + [spec.sink_user(i) for i in range(spec.sink_users)]
        + spec.fleet
        + ([spec.large_mailbox_user] if spec.large_mailbox_messages else [])
    )
    for user in others:
        store.create_mailbox(user, password_hash=shared_hash)
    accounts_seconds = time.perf_counter() - started
    manifest = {
        "accounts": len(spec.corpus_users) + len(others),
        "accounts_seconds": round(accounts_seconds, 2),
    }
    manifest.update(_deliver_corpus(spec))
    manifest.update(_deliver_big(spec))
    manifest.update(_fill_fleet(spec))
    if spec.large_mailbox_messages:
        manifest.update(_fill_large_mailbox(spec))
    drifts = store.recalculate_quota()  # the counters must match the messages exactly
    if drifts:
        raise RuntimeError(f"quota counters drifted while building the corpus: {drifts}")
    manifest["seconds"] = round(time.perf_counter() - started, 2)
    return manifest


def _deliver_one(recipients: list[str], data: bytes) -> None:
    from mailadmin.mailin.delivery import deliver

    results = deliver(recipients, io.BytesIO(data), sender=SENDER)
    failed = [result for result in results if not result.delivered]
    if failed:
        raise RuntimeError(f"corpus delivery failed: {failed}")


def _deliver_corpus(spec: CorpusSpec) -> dict:
    started = time.perf_counter()
    rng = random.Random(spec.seed + 1)
    per_user: dict[str, dict[str, int]] = {}
    for number, (user, kind, size) in enumerate(corpus_plan(spec)):
        make = text_message if kind == "text" else attachment_message
        _deliver_one([user], make(rng, user, number, size))
        entry = per_user.setdefault(user, {"messages": 0, "bytes": 0})
        entry["messages"] += 1
        entry["bytes"] += size
    return {
        "corpus_messages": sum(entry["messages"] for entry in per_user.values()),
        "corpus_bytes_approx": sum(entry["bytes"] for entry in per_user.values()),
        "corpus_seconds": round(time.perf_counter() - started, 2),
    }


def _deliver_big(spec: CorpusSpec) -> dict:
    """One big message delivered to every big user at once (spooled once, stored per user)."""
    started = time.perf_counter()
    recipients = [spec.big_user(i) for i in range(spec.big_users)]
    if recipients:
        data = attachment_message(random.Random(spec.seed + 2), recipients[0], 0, spec.big_message_bytes)
        _deliver_one(recipients, data)
    return {
        "big_message_bytes": spec.big_message_bytes,
        "big_seconds": round(time.perf_counter() - started, 2),
    }


def _fill_large_mailbox(spec: CorpusSpec) -> dict:
    from django.db import transaction

    from mailadmin.hosting import store
    from mailadmin.mailin.delivery import trace_headers
    from mailadmin.mailin.messagefile import spool_message

    started = time.perf_counter()
    user = spec.large_mailbox_user
    mailbox = store.get_mailbox(user)
    rng = random.Random(spec.seed + 3)
    bodies = [
        spool_message([text_message(rng, user, n, spec.large_mailbox_message_bytes)])
        for n in range(LARGE_MAILBOX_VARIANTS)
    ]
    trace = trace_headers(SENDER, user)
    try:
        for start in range(0, spec.large_mailbox_messages, LARGE_MAILBOX_BATCH):
            with transaction.atomic():
                for number in range(start, min(start + LARGE_MAILBOX_BATCH, spec.large_mailbox_messages)):
                    prefix = trace + f"X-Bench-Sequence: {number}\r\n".encode()
                    store.append_message(mailbox, bodies[number % LARGE_MAILBOX_VARIANTS], prefix=prefix)
    finally:
        for body in bodies:
            body.close()
    return {
        "large_mailbox_messages": spec.large_mailbox_messages,
        "large_mailbox_seconds": round(time.perf_counter() - started, 2),
    }


def _fill_fleet(spec: CorpusSpec) -> dict:
    """The fleet's mail, through ``store.append_message`` in batched transactions."""
    from django.db import transaction

    from mailadmin.hosting import store
    from mailadmin.mailin.delivery import trace_headers
    from mailadmin.mailin.messagefile import spool_message

    started = time.perf_counter()
    rng = random.Random(spec.seed + 5)
    texts = [
        b"\r\n".join(_text_lines(rng, spec.fleet_max_bytes)) + b"\r\n" for _ in range(FLEET_TEXT_VARIANTS)
    ]
    attachments = [
        attachment_message(rng, "fleet", n, spec.large_max_bytes) for n in range(FLEET_ATTACHMENT_VARIANTS)
    ]
    count = octets = 0
    pending = 0
    atomic = transaction.atomic()
    atomic.__enter__()
    try:
        for index, sizes in enumerate(fleet_plan(spec)):
            user = spec.fleet_user(index)
            mailbox = store.get_mailbox(user)
            trace = trace_headers(SENDER, user)
            for number, (kind, size) in enumerate(sizes):
                data = _fleet_message(rng, user, number, kind, size, texts, attachments)
                with spool_message([data]) as body:
                    store.append_message(mailbox, body, prefix=trace)
                count, octets, pending = count + 1, octets + len(data), pending + 1
                if pending >= LARGE_MAILBOX_BATCH:
                    atomic.__exit__(None, None, None)
                    atomic = transaction.atomic()
                    atomic.__enter__()
                    pending = 0
    except BaseException as error:
        atomic.__exit__(type(error), error, error.__traceback__)
        raise
    atomic.__exit__(None, None, None)
    return {
        "fleet_messages": count,
        "fleet_bytes_approx": octets,
        "fleet_seconds": round(time.perf_counter() - started, 2),
    }


def _fleet_message(
    rng: random.Random,
    user: str,
    number: int,
    kind: str,
    size: int,
    texts: list[bytes],
    attachments: list[bytes],
) -> bytes:
    """A message of about ``size`` bytes cut from the shared texts/attachments, its headers its own."""
    if kind == "attachment":
        variant = rng.choice(attachments)
        head, _, parts = variant.partition(b"\r\n\r\n")
        content_type = head[head.index(b"Content-Type:") :].split(b"\r\n", 1)[0].decode()
        closing = variant[variant.rstrip(b"\r\n").rfind(b"\r\n") + 2 :]  # the last boundary line
        head = _headers(rng, user, number, content_type + "\r\n")
        body = parts[: max(0, size - len(head) - len(closing))]
        return head + b"\r\n" + body[: body.rfind(b"\r\n") + 2] + closing
    head = _headers(rng, user, number, "Content-Type: text/plain; charset=us-ascii\r\n")
    text = rng.choice(texts)
    start = text.find(b"\r\n", rng.randrange(max(1, len(text) - size))) + 2
    body = text[start : start + max(0, size - len(head))]
    return head + b"\r\n" + body[: body.rfind(b"\r\n") + 2]


def write_spec(spec: CorpusSpec, path: Path) -> None:
    path.write_text(json.dumps(asdict(spec)))


def main(argv: list[str]) -> None:
    import django

    django.setup()  # before any mailadmin import: the models need the app registry
    spec = CorpusSpec(**json.loads(Path(argv[0]).read_text()))
    Path(argv[1]).write_text(json.dumps(build(spec), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
