"""``python -m bench.maildirs SPEC.json DIR [fleet|corpus] [--expected-only]``: mailboxes as
Dovecot reads them.

Run in a child with Django set up, after the corpus is built, it reads the bench database and
writes, under DIR, for one set of users: ``fleet`` (the default: the fleet and the LMTP sinks)
or ``corpus`` (``user00``-``09``, which the login and pipelining scenarios use):

- ``passwd``: the users with their stored argon2 hashes as Dovecot's ``{ARGON2ID}`` (the same
  hashes runpop3 checks), and ``passwd-plain`` with ``{PLAIN}`` passwords, what Dovecot's side
  of the warm scenarios logs in with (see bench.dovecot);
- ``mail/<address>/Maildir``: every message's stored bytes (CRLF, trace headers included: what
  runpop3 sends), one file each, with a ``dovecot-uidlist`` giving Dovecot the same UIDs and
  UID validity, so message numbers and UIDLs agree;
- ``expected.json``: per fleet user, the (size, CRC-32) of each message in order, which the
  clients check on both servers.
"""

import json
import sys
import zlib
from pathlib import Path

from bench import corpus

DOVECOT_ARGON2_PREFIX = "{ARGON2ID}"
EXPECTED_ONLY = "--expected-only"  # only expected.json: Dovecot's side does not run
FLEET, CORPUS = "fleet", "corpus"


def users_of(spec: corpus.CorpusSpec, which: str) -> list[str]:
    if which == CORPUS:
        return spec.corpus_users
    return spec.fleet + [spec.sink_user(i) for i in range(spec.sink_users)]


def dovecot_hash(django_hash: str) -> str:
    """Django's ``argon2$argon2id$v=19$...`` as Dovecot's ``{ARGON2ID}$argon2id$v=19$...``."""
    algorithm, _, encoded = django_hash.partition("$")
    if algorithm != "argon2" or not encoded.startswith("argon2id$"):
        raise ValueError(f"not a Django argon2id hash: {django_hash[:20]}...")
    return f"{DOVECOT_ARGON2_PREFIX}${encoded}"


def write_maildir(directory: Path, mailbox, messages: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
    """One Maildir of ``(uid, bytes)``; the (size, CRC-32) of each message in order."""
    for sub in ("cur", "new", "tmp"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    lines = [f"3 V{mailbox.uid_validity} N{mailbox.next_uid}"]
    expected = []
    for uid, data in messages:
        base = f"{uid}.M{uid}P1.bench,S={len(data)},W={len(data)}"
        (directory / "cur" / f"{base}:2,S").write_bytes(data)
        lines.append(f"{uid} :{base}")
        expected.append((len(data), zlib.crc32(data)))
    (directory / "dovecot-uidlist").write_text("\n".join(lines) + "\n")
    return expected


def export(spec: corpus.CorpusSpec, root: Path, which: str = FLEET, maildirs: bool = True) -> dict:
    from mailadmin.hosting import store
    from mailadmin.models import Message

    passwd, plain, expected = [], [], {}
    for user in users_of(spec, which):
        mailbox = store.get_mailbox(user)
        passwd.append(f"{user}:{dovecot_hash(mailbox.user.password)}::::::")
        plain.append(f"{user}:{{PLAIN}}{corpus.PASSWORD}::::::")
        rows = Message.objects.filter(mailbox=mailbox).order_by("pk").values_list("pk", "uidl")
        messages = [(int(uidl[:8], 16), b"".join(store.iter_message_bytes(pk))) for pk, uidl in rows]
        if maildirs:
            found = write_maildir(root / "mail" / user / "Maildir", mailbox, messages)
        else:
            found = [(len(data), zlib.crc32(data)) for _, data in messages]
        if user in spec.fleet:
            expected[user] = found
    (root / "passwd").write_text("\n".join(passwd) + "\n")
    (root / "passwd-plain").write_text("\n".join(plain) + "\n")
    (root / "expected.json").write_text(json.dumps(expected))
    return {"users": len(passwd), "messages": sum(len(found) for found in expected.values())}


def main(argv: list[str]) -> None:
    import django

    django.setup()
    spec = corpus.CorpusSpec(**json.loads(Path(argv[0]).read_text()))
    which = CORPUS if CORPUS in argv[2:] else FLEET
    print(json.dumps(export(spec, Path(argv[1]), which, maildirs=EXPECTED_ONLY not in argv[2:])))


if __name__ == "__main__":
    main(sys.argv[1:])
