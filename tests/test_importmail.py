"""importmail / exportmail and the mail-file formats under them: mboxrd and Maildir + dovecot-uidlist."""

import base64
import io
import os
import random
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from mailadmin.hosting import store
from mailadmin.mailin import mailfiles
from mailadmin.mailin.delivery import deliver
from mailadmin.mailin.messagefile import normalise
from mailadmin.models import AuditEntry, Mailbox, Message, MessageChunk
from tests.conftest import PROJECT_DIR, run_manage

DATE = datetime(2023, 1, 2, 3, 4, 5, tzinfo=UTC)

DOTS = b"From: a@example.test\nSubject: dots\n\n.leading dot\n..two dots\n.\nafter a lone dot\n"
LONG_LINES = b"Subject: long lines\n\n" + b"x" * 998 + b"\n" + b"y" * 998 + b"\r\n"
MIXED_ENDINGS = b"Subject: mixed\r\nX-Bare: lf\n\nlf\ncrlf\r\nbare cr\rend\n"
EMPTY_BODY = b"Subject: empty body\n\n"
UTF8_HEADERS = "Subject: Grüße aus Köln ✉\nFrom: Jörg <jörg@exämple.test>\n\nBody ünïcode\n".encode()
FROM_LINES = (
    b"Subject: from lines\n\nFrom here on\n>From quoted once\n>>From quoted twice\n"
    b"From\nFromage\n >From not at a line start\n\nFrom after a blank line\n"
)
CRLF_ONLY = b"Subject: crlf\r\n\r\nbody\r\n\r\n"
NO_FINAL_NEWLINE = b"Subject: no final newline\n\nlast line without newline"
SMALL_CORPUS = [
    DOTS,
    LONG_LINES,
    MIXED_ENDINGS,
    EMPTY_BODY,
    UTF8_HEADERS,
    FROM_LINES,
    CRLF_ONLY,
    NO_FINAL_NEWLINE,
]


def big_attachment_message() -> bytes:
    """About 5 MB: a deterministic base64 attachment in 76-character lines."""
    payload = base64.encodebytes(random.Random(5).randbytes(3_750_000))
    return (
        b"Subject: big attachment\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=XX\n\n"
        b"--XX\nContent-Type: text/plain\n\nSee attached.\n"
        b"--XX\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
        + payload
        + b"--XX--\n"
    )


def asctime(when: datetime) -> bytes:
    return time.asctime(when.utctimetuple()).encode()


def quoted(content: bytes) -> bytes:
    return re.sub(rb"(?m)^(>*From )", rb">\1", content)


def mboxrd(messages: list[bytes], senders: list[bytes] | None = None) -> bytes:
    """A reference mboxrd file: every message from ``a@example.test`` (unless named), dated DATE."""
    senders = senders or [b"a@example.test"] * len(messages)
    return b"".join(
        b"From %s %s\n" % (sender, asctime(DATE)) + quoted(content) + b"\n"
        for sender, content in zip(senders, messages, strict=True)
    )


def expected_export(messages: list[bytes], senders: list[bytes]) -> bytes:
    """What exportmail must write: the stored bytes with LF line ends, quoted, and a blank line after each."""
    return b"".join(
        b"From %s %s\n" % (sender, asctime(DATE)) + quoted(normalise(content).replace(b"\r\n", b"\n")) + b"\n"
        for sender, content in zip(senders, messages, strict=True)
    )


def stored(mailbox: Mailbox) -> list[bytes]:
    return [
        b"".join(store.iter_message_bytes(pk))
        for pk in Message.objects.for_maildrop(mailbox).values_list("pk", flat=True)
    ]


def uidls(mailbox: Mailbox) -> list[str]:
    return list(Message.objects.for_maildrop(mailbox).values_list("uidl", flat=True))


def command(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


# --- mboxrd parsing and writing, no database -----------------------------------------------


def read_all(data: bytes, fragment_bytes: int = mailfiles.LINE_FRAGMENT_BYTES) -> list[tuple]:
    return [
        (m.envelope_sender, m.received_at, m.line_number, b"".join(m.content))
        for m in mailfiles.read_mbox(io.BytesIO(data), fragment_bytes=fragment_bytes)
    ]


MBOX = (
    b"\n"
    b"From a@example.test Mon Jan  2 03:04:05 2023\nSubject: one\n\n>From quoted\n>>From twice\n>Fromage\n\n"
    b"From MAILER-DAEMON Sat Jan  3 01:05:34 1996\r\nSubject: two\r\n\r\n\r\n\n\n"
    b"From b@example.test not a date\nlast"
)
MBOX_MESSAGES = [
    ("a@example.test", DATE, 2, b"Subject: one\n\nFrom quoted\n>From twice\n>Fromage\n"),
    ("", datetime(1996, 1, 3, 1, 5, 34, tzinfo=UTC), 9, b"Subject: two\r\n\r\n\r\n\n"),
    ("b@example.test", None, 15, b"last"),
]


@pytest.mark.parametrize("fragment_bytes", [1, 2, 3, 5, 64 * 1024])
def test_mbox_reader_unquotes_and_drops_only_the_separator(fragment_bytes):
    assert read_all(MBOX, fragment_bytes) == MBOX_MESSAGES


def test_mbox_reader_skips_content_the_caller_does_not_read():
    senders = [message.envelope_sender for message in mailfiles.read_mbox(io.BytesIO(MBOX))]
    assert senders == ["a@example.test", "", "b@example.test"]


@pytest.mark.parametrize(
    ("data", "messages"),
    [
        (b"", []),
        (b"\n\r\n", []),
        (
            b"From x@y Mon Jan  2 03:04:05 2023 +0100\n\n",
            [("x@y", datetime(2023, 1, 2, 2, 4, 5, tzinfo=UTC), 1, b"")],
        ),
        (
            b"From x Mon Jan  2 03:04:05 2023\nFrom y Mon Jan  2 03:04:05 2023\nb\n",
            [
                ("x", DATE, 1, b""),
                ("y", DATE, 2, b"b\n"),
            ],
        ),
    ],
)
def test_mbox_reader_edge_cases(data, messages):
    assert read_all(data) == messages


def test_malformed_mbox_names_the_line():
    with pytest.raises(mailfiles.MailFileError, match=r"^line 3: not an mbox file"):
        read_all(b"\n\nSubject: not an mbox\n\nFrom x Mon Jan  2 03:04:05 2023\n")


def test_from_line_is_one_word_and_an_asctime_date_in_utc():
    local = datetime(2024, 3, 5, 10, 2, 3, 999, tzinfo=UTC).astimezone(tz=None)
    assert (
        mailfiles.format_from_line("odd sender\r\n@x.test", local)
        == b"From oddsender@x.test Tue Mar  5 10:02:03 2024\n"
    )
    assert mailfiles.format_from_line("", DATE) == b"From MAILER-DAEMON Mon Jan  2 03:04:05 2023\n"


ENCODER_CASES = [
    b"From x\r\n>From y\r\nabc From z\r\n\r\n>>>>From \r\nFro\r\n>Fr\r\n",
    b"a\r\nFrom",
    b"x\r\n>>Fr",
    b"\r\n\r\nFrom \r\n",
    b"From ",
    b">",
]


@pytest.mark.parametrize("content", ENCODER_CASES)
def test_mboxrd_encoder_is_line_aware_across_every_piece_boundary(content):
    expected = quoted(content.replace(b"\r\n", b"\n"))
    for size in range(1, len(content) + 1):
        encoder = mailfiles.MboxrdEncoder()
        pieces = [content[i : i + size] for i in range(0, len(content), size)]
        assert b"".join(encoder.feed(piece) for piece in pieces) + encoder.finish() == expected, size


def test_written_mbox_reads_back_to_the_same_lines():
    content = b"Subject: x\r\n\r\nFrom a\r\n>From b\r\n\r\n"
    out = io.BytesIO()
    assert (
        mailfiles.write_mbox_message(out, [content[:13], content[13:]], sender="s@x.test", received_at=DATE)
        == 33
    )
    assert out.getvalue() == b"From s@x.test Mon Jan  2 03:04:05 2023\nSubject: x\n\n>From a\n>>From b\n\n\n"
    [(sender, received_at, _, lines)] = read_all(out.getvalue())
    assert (sender, received_at, normalise(lines)) == ("s@x.test", DATE, content)


# --- Maildir and dovecot-uidlist, no database ------------------------------------------------

UID_VALIDITY = 1_600_000_000  # 0x5F5E1000
UIDLIST_V3 = (
    f"3 V{UID_VALIDITY} N10 G0123456789abcdef0123456789abcdef\n"
    "5 Plegacy-uidl-1 W130 :1700000100.M1P1.host,S=120\n"
    "6 :1690000000.M9P9.host\n"
    "7 W100 :1700000050.M2P1.host:2,S\n"
    "9 PUIDL-9 G0f0f :1700000300.M3P1.host\n"
)
MAILDIR_FILES = {
    "cur/1700000100.M1P1.host,S=120:2,S": b"Subject: uid 5\n\n",
    "cur/1700000050.M2P1.host:2,S": b"Subject: uid 7\n\n",
    "new/1700000300.M3P1.host": b"Subject: uid 9\n\n",
    "new/1700000200.M4P1.host": b"Subject: unlisted, later\n\n",
    "cur/1600000000.M5P1.host:2,": b"Subject: unlisted, earliest\n\n",
    "new/handmade": b"Subject: unlisted, mtime\n\n",
    "tmp/1700000400.M6P1.host": b"Subject: still being delivered\n\n",
    "cur/.hidden": b"Subject: dot file\n\n",
    ".Sent/cur/1700000500.M7P1.host:2,S": b"Subject: another folder\n\n",
}
HANDMADE_MTIME = 1_650_000_000
EXPECTED_SUBJECTS = ["uid 5", "uid 7", "uid 9", "unlisted, earliest", "unlisted, mtime", "unlisted, later"]


def make_maildir(directory: Path, uidlist: str | None = UIDLIST_V3) -> Path:
    for name, content in MAILDIR_FILES.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    os.utime(directory / "new/handmade", (HANDMADE_MTIME, HANDMADE_MTIME))
    if uidlist is not None:
        (directory / "dovecot-uidlist").write_text(uidlist)
    return directory


def test_maildir_order_follows_the_uidlist_then_the_file_names(tmp_path):
    messages = mailfiles.read_maildir(make_maildir(tmp_path))
    assert [(m.path.read_bytes()[9:-2].decode(), m.uid, m.uidl) for m in messages] == [
        ("uid 5", 5, "legacy-uidl-1"),
        ("uid 7", 7, "000000075F5E1000"),
        ("uid 9", 9, "UIDL-9"),
        ("unlisted, earliest", None, None),
        ("unlisted, mtime", None, None),
        ("unlisted, later", None, None),
    ]
    assert [m.base_name for m in messages[:2]] == ["1700000100.M1P1.host,S=120", "1700000050.M2P1.host"]
    assert [m.received_at.timestamp() for m in messages] == [
        1700000100,
        1700000050,
        1700000300,
        1600000000,
        HANDMADE_MTIME,
        1700000200,
    ]


def test_maildir_without_uidlist_is_in_timestamp_order_not_text_order(tmp_path):
    for name in ["cur/999999999.A.host:2,S", "cur/1000000000.B.host:2,S", "new/1000000000.A.host"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"\n")
    assert [m.path.name for m in mailfiles.read_maildir(tmp_path)] == [
        "999999999.A.host:2,S",
        "1000000000.A.host",
        "1000000000.B.host:2,S",
    ]


def test_uidlist_version_1(tmp_path):
    path = tmp_path / "dovecot-uidlist"
    path.write_text("1 1031901553 32\n30 1031901553.4396_0.host:2,S\n31 1031901600.4400_0.host\n")
    assert mailfiles.read_uidlist(path) == [
        mailfiles.UidlistEntry(30, "1031901553.4396_0.host", "0000001E3D819171"),
        mailfiles.UidlistEntry(31, "1031901600.4400_0.host", "0000001F3D819171"),
    ]


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("2 V1 N1\n", "unsupported dovecot-uidlist version 2"),
        ("3 N1\n", "line 1: malformed header"),
        ("3 V1 N2\nnot-a-uid :x\n", "line 2: malformed entry"),
        ("3 V1 N2\n1 no-colon-file-name\n", "line 2: malformed entry"),
    ],
)
def test_malformed_uidlist(tmp_path, content, error):
    path = tmp_path / "dovecot-uidlist"
    path.write_text(content)
    with pytest.raises(mailfiles.MailFileError, match=re.escape(error)):
        mailfiles.read_uidlist(path)


def test_a_folder_without_cur_or_new_is_not_a_maildir(tmp_path):
    with pytest.raises(mailfiles.MailFileError, match="is not a Maildir"):
        mailfiles.read_maildir(tmp_path)
    with pytest.raises(mailfiles.MailFileError, match="no such directory"):
        mailfiles.read_maildir(tmp_path / "missing")


# --- importmail / exportmail -----------------------------------------------------------------


@pytest.mark.django_db
def test_mbox_round_trip_is_byte_identical(make_mailbox, tmp_path):
    corpus = [*SMALL_CORPUS, big_attachment_message()]
    senders = [b"a@example.test"] * len(corpus)
    senders[1] = b"MAILER-DAEMON"
    (tmp_path / "corpus.mbox").write_bytes(mboxrd(corpus, senders))
    first, second = make_mailbox("first@example.test"), make_mailbox("second@example.test")

    assert command("importmail", first.address, "--mbox", str(tmp_path / "corpus.mbox")) == (
        "first@example.test: 9 imported, 0 already present\n"
    )
    command("exportmail", first.address, "--mbox", str(tmp_path / "first.mbox"))
    assert command("importmail", second.address, "--mbox", str(tmp_path / "first.mbox")) == (
        "second@example.test: 9 imported, 0 already present\n"
    )
    assert command("exportmail", second.address, "--mbox", str(tmp_path / "second.mbox")) == (
        f"second@example.test: 9 exported to {tmp_path / 'second.mbox'}\n"
    )

    exported = (tmp_path / "first.mbox").read_bytes()
    assert exported == (tmp_path / "second.mbox").read_bytes()
    assert exported == expected_export(corpus, senders)
    assert stored(first) == stored(second) == [normalise(content) for content in corpus]
    assert list(Message.objects.for_maildrop(second).values_list("envelope_sender", "received_at")) == [
        ("" if sender == b"MAILER-DAEMON" else sender.decode(), DATE) for sender in senders
    ]
    assert Message.objects.for_maildrop(second).last().size_bytes == len(normalise(corpus[-1])) > 5_000_000


@pytest.mark.django_db
@pytest.mark.parametrize("chunk_size", [3, 7])
def test_export_quotes_and_converts_line_ends_across_tiny_chunks(
    make_mailbox, tmp_path, settings, chunk_size
):
    settings.MAILADMIN_CHUNK_SIZE_BYTES = chunk_size
    mailbox = make_mailbox()
    (tmp_path / "in.mbox").write_bytes(mboxrd(SMALL_CORPUS))
    command("importmail", mailbox.address, "--mbox", str(tmp_path / "in.mbox"))
    assert MessageChunk.objects.filter(message__mailbox=mailbox, seq=1).count() == len(SMALL_CORPUS)
    command("exportmail", mailbox.address, "--mbox", str(tmp_path / "out.mbox"))
    assert (tmp_path / "out.mbox").read_bytes() == expected_export(SMALL_CORPUS, [b"a@example.test"] * 8)


@pytest.mark.django_db
def test_mbox_reimport_skips_what_is_there_and_keeps_duplicates(make_mailbox, tmp_path):
    mailbox = make_mailbox()
    path = tmp_path / "dupes.mbox"
    path.write_bytes(mboxrd([DOTS, DOTS, EMPTY_BODY]))
    assert command("importmail", mailbox.address, "--mbox", str(path)).endswith(
        ": 3 imported, 0 already present\n"
    )
    path.write_bytes(mboxrd([DOTS, DOTS, EMPTY_BODY, DOTS]))
    assert command("importmail", mailbox.address, "--mbox", str(path)).endswith(
        ": 1 imported, 3 already present\n"
    )
    assert stored(mailbox) == [normalise(DOTS)] * 2 + [normalise(EMPTY_BODY), normalise(DOTS)]


@pytest.mark.django_db
def test_maildir_import_keeps_dovecot_uidls_in_uidlist_order(make_mailbox, tmp_path):
    mailbox = make_mailbox()
    maildir = make_maildir(tmp_path / "Maildir")
    assert command("importmail", mailbox.address, "--maildir", str(maildir)) == (
        "alice@example.test: 6 imported, 0 already present\n"
    )
    mailbox.refresh_from_db()
    expected_uidls = [
        "legacy-uidl-1",
        "000000075F5E1000",
        "UIDL-9",
        store.format_uidl(10, mailbox.uid_validity),
        store.format_uidl(11, mailbox.uid_validity),
        store.format_uidl(12, mailbox.uid_validity),
    ]
    assert uidls(mailbox) == expected_uidls
    assert list(Message.objects.for_maildrop(mailbox).values_list("subject", flat=True)) == EXPECTED_SUBJECTS
    assert Message.objects.for_maildrop(mailbox).first().received_at == datetime.fromtimestamp(
        1700000100, UTC
    )

    assert command("importmail", mailbox.address, "--maildir", str(maildir)) == (
        "alice@example.test: 0 imported, 6 already present\n"
    )
    assert Message.objects.filter(mailbox=mailbox).count() == 6
    [result] = deliver([mailbox.address], [b"Subject: after the import\n\n"])
    assert result.uidl == store.format_uidl(13, mailbox.uid_validity)


@pytest.mark.django_db
def test_a_uidlist_message_whose_uidl_exists_is_skipped(make_mailbox, tmp_path):
    mailbox = make_mailbox()
    maildir = make_maildir(tmp_path / "Maildir")
    command("importmail", mailbox.address, "--maildir", str(maildir))
    # The same messages, delivered again under new file names (a re-synced copy of the folder).
    for path in [*maildir.glob("cur/[!.]*"), *maildir.glob("new/[!.]*")]:
        path.rename(path.with_name("copy-" + path.name))
    uidlist = re.sub(r" :(\d)", r" :copy-\1", UIDLIST_V3)
    (maildir / "dovecot-uidlist").write_text(uidlist)
    assert command("importmail", mailbox.address, "--maildir", str(maildir)) == (
        "alice@example.test: 3 imported, 3 already present\n"
    )


@pytest.mark.django_db
def test_names_too_long_for_the_columns_are_shortened(make_mailbox, tmp_path):
    mailbox = make_mailbox()
    long_name = "1700000000." + "x" * 220 + ":2,S"
    (tmp_path / "Maildir/cur").mkdir(parents=True)
    (tmp_path / "Maildir/cur" / long_name).write_bytes(b"Subject: long name\n\n")
    (tmp_path / "long.mbox").write_bytes(mboxrd([DOTS], senders=[b"s" * 400 + b"@example.test"]))
    command("importmail", mailbox.address, "--maildir", str(tmp_path / "Maildir"))
    command("importmail", mailbox.address, "--mbox", str(tmp_path / "long.mbox"))
    assert command("importmail", mailbox.address, "--maildir", str(tmp_path / "Maildir")).endswith(
        ": 0 imported, 1 already present\n"
    )
    maildir_message, mbox_message = Message.objects.for_maildrop(mailbox)
    assert maildir_message.import_key.startswith("maildir-sha256:")
    assert len(maildir_message.import_key) == len("maildir-sha256:") + 64
    assert mbox_message.envelope_sender == "s" * 320


@pytest.mark.django_db
def test_maildir_root_imports_one_folder_per_address(make_mailbox, tmp_path):
    alice, bob = make_mailbox("alice@example.test"), make_mailbox("bob@example.test")
    make_maildir(tmp_path / "alice@example.test")
    make_maildir(tmp_path / "Bob@Example.test", uidlist=None)
    (tmp_path / ".hidden").mkdir()
    assert command("importmail", "--maildir-root", str(tmp_path)) == (
        "bob@example.test: 6 imported, 0 already present\nalice@example.test: 6 imported, 0 already present\n"
    )
    assert uidls(alice)[:3] == ["legacy-uidl-1", "000000075F5E1000", "UIDL-9"]
    bob.refresh_from_db()
    assert uidls(bob) == [store.format_uidl(uid, bob.uid_validity) for uid in range(1, 7)]
    assert list(Message.objects.for_maildrop(bob).values_list("subject", flat=True)) == [
        "unlisted, earliest",
        "unlisted, mtime",
        "uid 7",
        "uid 5",
        "unlisted, later",
        "uid 9",
    ]


@pytest.mark.django_db
def test_maildir_root_reads_dovecot_domain_folders_and_home_maildirs(make_mailbox, tmp_path):
    """Dovecot's ``maildir:/var/vmail/%d/%n`` layout, and ``~/Maildir`` inside a home folder."""
    alice, bob = make_mailbox("alice@example.test"), make_mailbox("bob@example.test")
    make_maildir(tmp_path / "example.test" / "alice")
    make_maildir(tmp_path / "example.test" / "Bob" / "Maildir", uidlist=None)
    assert command("importmail", "--maildir-root", str(tmp_path)) == (
        "bob@example.test: 6 imported, 0 already present\nalice@example.test: 6 imported, 0 already present\n"
    )
    assert uidls(alice)[:3] == ["legacy-uidl-1", "000000075F5E1000", "UIDL-9"]
    assert Message.objects.filter(mailbox=bob).count() == 6


@pytest.mark.django_db
def test_maildir_root_with_a_folder_of_no_known_domain_imports_nothing(make_mailbox, tmp_path):
    make_mailbox("alice@example.test")
    make_maildir(tmp_path / "alice@example.test")
    make_maildir(tmp_path / "nowhere.test" / "carol")
    with pytest.raises(CommandError, match=f"^{re.escape(str(tmp_path))}/nowhere.test: no such domain"):
        command("importmail", "--maildir-root", str(tmp_path))
    assert Message.objects.count() == 0


@pytest.mark.django_db
def test_maildir_root_skips_a_symlinked_address_folder(make_mailbox, tmp_path, caplog):
    alice = make_mailbox("alice@example.test")
    outside = make_maildir(tmp_path / "outside")
    root = tmp_path / "root"
    root.mkdir()
    (root / "alice@example.test").symlink_to(outside)
    with caplog.at_level("WARNING", logger="mailadmin.management.commands.importmail"):
        assert command("importmail", "--maildir-root", str(root)) == ""
    assert not Message.objects.filter(mailbox=alice).exists()
    assert [record.getMessage() for record in caplog.records] == [
        f"skipped {root / 'alice@example.test'}: a symbolic link, not a folder of the root"
    ]


@pytest.mark.django_db
def test_maildir_root_with_an_unknown_address_imports_nothing(make_mailbox, tmp_path):
    make_mailbox("alice@example.test")
    make_maildir(tmp_path / "alice@example.test")
    make_maildir(tmp_path / "ghost@example.test")
    with pytest.raises(
        CommandError, match=f"^{re.escape(str(tmp_path))}/ghost@example.test: no such mailbox"
    ):
        command("importmail", "--maildir-root", str(tmp_path))
    assert Message.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["nobody@example.test", "--mbox", "{tmp}/x.mbox"], "no such mailbox: nobody@example.test"),
        (
            ["alice@example.test", "--mbox", "{tmp}/missing.mbox"],
            "cannot read {tmp}/missing.mbox: No such file",
        ),
        (["alice@example.test", "--mbox", "{tmp}"], "cannot read {tmp}: Is a directory"),
        (
            ["alice@example.test", "--maildir", "{tmp}/missing"],
            "cannot read {tmp}/missing: no such directory",
        ),
        (["alice@example.test", "--maildir", "{tmp}"], "{tmp} is not a Maildir (no cur/ or new/ folder)"),
        (["--mbox", "{tmp}/x.mbox"], "give the ADDRESS of the mailbox to import into"),
        (["alice@example.test", "--maildir-root", "{tmp}"], "--maildir-root takes no ADDRESS"),
        (["--maildir-root", "{tmp}/missing"], "cannot read {tmp}/missing: No such file"),
    ],
)
def test_import_errors_are_one_line(make_mailbox, tmp_path, args, error):
    make_mailbox("alice@example.test")
    with pytest.raises(CommandError, match="^" + re.escape(error.format(tmp=tmp_path))):
        command("importmail", *[arg.format(tmp=tmp_path) for arg in args])


@pytest.mark.django_db
def test_malformed_mbox_is_refused_with_its_line_number(make_mailbox, tmp_path):
    mailbox = make_mailbox()
    path = tmp_path / "bad.mbox"
    path.write_bytes(b"\n\nSubject: not an mbox\n\nbody\n")
    with pytest.raises(CommandError) as raised:
        command("importmail", mailbox.address, "--mbox", str(path))
    assert str(raised.value) == f"{path}: line 3: not an mbox file (expected a line starting 'From ')"
    assert Message.objects.count() == 0


@pytest.mark.django_db
def test_over_quota_stops_the_import_and_a_rerun_resumes(make_mailbox, tmp_path):
    messages = [b"Subject: %d\n\n%s\n" % (n, b"x" * 100) for n in range(3)]
    mailbox = make_mailbox(quota_bytes=2 * len(normalise(messages[0])))
    path = tmp_path / "three.mbox"
    path.write_bytes(mboxrd(messages))
    with pytest.raises(CommandError) as raised:
        command("importmail", mailbox.address, "--mbox", str(path))
    assert str(raised.value) == (
        f"alice@example.test: message 3 (line 11) of {path}: mailbox alice@example.test is over quota"
        " (2 imported before it; run again to resume)"
    )
    assert stored(mailbox) == [normalise(m) for m in messages[:2]]
    store.update_mailbox_settings(mailbox.pk, {"quota_bytes": 0})
    assert command("importmail", mailbox.address, "--mbox", str(path)) == (
        "alice@example.test: 1 imported, 2 already present\n"
    )
    assert stored(mailbox) == [normalise(m) for m in messages]
    # Each run is audited with what it stored, the one that stopped half way too.
    entries = AuditEntry.objects.filter(action="import mail").order_by("pk")
    assert list(entries.values_list("actor_kind", "object_name", "changes")) == [
        ("cli", "alice@example.test", {"messages imported": [0, 2], "from": ["", str(path)]}),
        ("cli", "alice@example.test", {"messages imported": [0, 1], "from": ["", str(path)]}),
    ]


@pytest.mark.django_db
def test_a_maildir_message_over_the_size_limit_stops_the_import(make_mailbox, tmp_path, settings):
    settings.MAILADMIN_MAX_MESSAGE_SIZE_BYTES = 20
    mailbox = make_mailbox()
    maildir = make_maildir(tmp_path / "Maildir")
    with pytest.raises(
        CommandError, match=r"cur/1600000000\.M5P1\.host:2,: message exceeds the maximum size of 20 bytes"
    ):
        command("importmail", mailbox.address, "--maildir", str(maildir))
    assert uidls(mailbox) == ["legacy-uidl-1", "000000075F5E1000", "UIDL-9"]


@pytest.mark.django_db(transaction=True)
def test_over_quota_exits_non_zero_with_one_line(make_mailbox, tmp_path):
    mailbox = make_mailbox(quota_bytes=10)
    path = tmp_path / "one.mbox"
    path.write_bytes(mboxrd([DOTS]))
    result = run_manage("importmail", mailbox.address, "--mbox", str(path))
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        (
            f"CommandError: alice@example.test: message 1 (line 1) of {path}:"
            " mailbox alice@example.test is over quota (0 imported before it; run again to resume)"
        )
    ]
    assert result.stdout == b""


@pytest.mark.django_db
def test_export_replaces_the_file_only_when_complete(make_mailbox, tmp_path):
    mailbox = make_mailbox()
    deliver([mailbox.address], [b"Subject: one\n\nFrom me\n"], sender="s@example.test")
    target = tmp_path / "out.mbox"
    target.write_bytes(b"old")
    command("exportmail", mailbox.address, "--mbox", str(target))
    assert sorted(os.listdir(tmp_path)) == ["out.mbox"]
    received_at = Message.objects.get().received_at
    assert target.read_bytes() == (
        b"From s@example.test %s\nReturn-Path: <s@example.test>\nDelivered-To: alice@example.test\n"
        b"Subject: one\n\n>From me\n\n" % asctime(received_at)
    )


@pytest.mark.django_db
def test_export_leaves_out_a_message_deleted_while_it_is_read(make_mailbox, tmp_path):
    mailbox = make_mailbox()
    for subject in (b"kept", b"vanishing", b"also kept"):
        deliver([mailbox.address], [b"Subject: %s\n\n" % subject])
    MessageChunk.objects.filter(message__subject="vanishing").delete()
    assert command("exportmail", mailbox.address, "--mbox", str(tmp_path / "out.mbox")) == (
        f"alice@example.test: 2 exported to {tmp_path / 'out.mbox'}; 1 deleted during the export left out\n"
    )
    assert [m[3].count(b"Subject") for m in read_all((tmp_path / "out.mbox").read_bytes())] == [1, 1]
    assert b"vanishing" not in (tmp_path / "out.mbox").read_bytes()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("address", "target", "error"),
    [
        ("nobody@example.test", "{tmp}/out.mbox", "no such mailbox: nobody@example.test"),
        ("alice@example.test", "{tmp}/missing/out.mbox", "cannot write {tmp}/missing/out.mbox: No such file"),
        ("alice@example.test", "{tmp}", "refusing to replace {tmp}: not a regular file"),
        ("alice@example.test", "{tmp}/fifo", "refusing to replace {tmp}/fifo: not a regular file"),
        ("alice@example.test", "{tmp}/link", "refusing to replace {tmp}/link: not a regular file"),
    ],
)
def test_export_errors_leave_nothing_behind(make_mailbox, tmp_path, address, target, error):
    make_mailbox("alice@example.test")
    (tmp_path / "elsewhere").write_bytes(b"kept")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    os.mkfifo(tmp_path / "fifo")  # stands in for a device such as /dev/full
    deliver(["alice@example.test"], [b"Subject: x\n\n"])
    with pytest.raises(CommandError, match="^" + re.escape(error.format(tmp=tmp_path))):
        command("exportmail", address, "--mbox", target.format(tmp=tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "fifo", "link"]
    assert (tmp_path / "elsewhere").read_bytes() == b"kept"


def test_maildir_reader_skips_symlinks_special_and_empty_files_with_a_warning(tmp_path, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"Subject: not yours\n\nsecret\n")
    (outside / "1700000009.other.host").write_bytes(b"Subject: also not yours\n\n")
    maildir = tmp_path / "Maildir"
    (maildir / "cur").mkdir(parents=True)
    (maildir / "cur" / "1700000001.real.host:2,S").write_bytes(b"Subject: real\n\n")
    (maildir / "cur" / "1700000002.link.host:2,S").symlink_to(outside / "secret")
    (maildir / "cur" / "1700000003.empty.host:2,S").write_bytes(b"")
    os.mkfifo(maildir / "cur" / "1700000004.fifo.host")
    (maildir / "new").symlink_to(outside)
    with caplog.at_level("WARNING", logger="mailadmin.mailin.mailfiles"):
        messages = mailfiles.read_maildir(maildir)
    assert [message.base_name for message in messages] == ["1700000001.real.host"]
    assert sorted(record.getMessage() for record in caplog.records) == [
        f"skipped {maildir}/cur/1700000002.link.host:2,S: not a regular file",
        f"skipped {maildir}/cur/1700000003.empty.host:2,S: an empty file is not a message",
        f"skipped {maildir}/cur/1700000004.fifo.host: not a regular file",
        f"skipped {maildir}/new: a symbolic link, not a folder of the Maildir",
    ]


def test_a_maildir_file_swapped_for_a_symlink_after_listing_is_not_followed(tmp_path):
    target = tmp_path / "secret"
    target.write_bytes(b"secret")
    path = tmp_path / "1700000001.swapped.host"
    path.symlink_to(target)
    with pytest.raises(OSError):
        mailfiles.open_message_file(path)


@pytest.mark.django_db
def test_importmail_imports_only_the_regular_files_of_a_maildir(make_mailbox, tmp_path):
    mailbox = make_mailbox()
    (tmp_path / "secret").write_bytes(b"Subject: outside\n\n")
    maildir = tmp_path / "Maildir"
    (maildir / "cur").mkdir(parents=True)
    (maildir / "cur" / "1700000001.real.host:2,S").write_bytes(b"Subject: inside\n\n")
    (maildir / "cur" / "1700000002.link.host:2,S").symlink_to(tmp_path / "secret")
    command("importmail", mailbox.address, "--maildir", str(maildir))
    assert list(Message.objects.values_list("subject", flat=True)) == ["inside"]


@pytest.mark.django_db(transaction=True)
def test_export_to_dash_writes_the_mbox_to_standard_output(make_mailbox, tmp_path):
    mailbox = make_mailbox()
    deliver([mailbox.address], [b"Subject: piped\n\nFrom me\n"], sender="s@example.test")
    result = run_manage("exportmail", mailbox.address, "--mbox", "-")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"From s@example.test ")
    assert b"\n\n>From me\n" in result.stdout  # mboxrd-quoted on the way out
    assert [m[3] for m in read_all(result.stdout)] == [
        b"Return-Path: <s@example.test>\nDelivered-To: alice@example.test\nSubject: piped\n\nFrom me\n"
    ]
    assert result.stderr.decode().splitlines()[-1] == "alice@example.test: 1 exported to standard output"
    assert not (PROJECT_DIR / "-").exists()
