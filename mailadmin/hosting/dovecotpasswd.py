"""Dovecot's passwd-file, read as mailboxes to import: one ``user:{SCHEME}hash[:...]`` per line.

The fields are Dovecot's: ``user:password:uid:gid:gecos:home:shell:extra_fields``, all but the
first two optional, so a line made of an address, a colon and what ``doveadm pw`` printed is
enough. The user must be a full address. A password without a ``{SCHEME}`` is in Dovecot's
default scheme for passwd-files, CRYPT. uid, gid, gecos, home and shell mean nothing here and are
ignored. Of the extra fields (space-separated ``name=value``; the userdb ones may carry a
``userdb_`` prefix) only the quota rule for every folder (``quota_rule=*:storage=1G``, also
``bytes=`` and ``messages=``) is read; a mailbox without one takes its domain's default quota.

Each refusal names the line, as the CSV import's do; blank lines and ``#`` comments are skipped.
"""

from typing import TextIO

from mailadmin.addresses import normalise_address
from mailadmin.hosting import dovecothashes, mailboxcsv, store
from mailadmin.units import parse_size

DEFAULT_SCHEME = dovecothashes.CRYPT_SCHEME
FIELD_COUNT = 8
QUOTA_RULE_FIELDS = ("userdb_quota_rule", "quota_rule")
KIB = 1024


def parse(handle: TextIO) -> list[mailboxcsv.Row]:
    """Every mailbox of the file, or ``store.InvalidInput`` naming the first wrong line."""
    rows: list[mailboxcsv.Row] = []
    first_line_of: dict[str, int] = {}
    for line, text in enumerate(handle, start=1):
        text = text.rstrip("\r\n")
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            row = _row(line, text)
        except (ValueError, store.StoreError) as error:
            raise store.InvalidInput(f"line {line}: {error}") from None
        mailboxcsv.require_first_mention(row, first_line_of)
        rows.append(row)
    return rows


def _row(line: int, text: str) -> mailboxcsv.Row:
    # Dovecot joins everything after the seventh colon back into the extra fields, whose quota
    # rules hold colons of their own.
    fields = text.split(":", FIELD_COUNT - 1)
    if len(fields) < 2 or not fields[1]:
        raise ValueError("expected user:password, with Dovecot's optional fields after them")
    user, password = fields[0], fields[1]
    address = normalise_address(user)
    if not dovecothashes.is_dovecot_hash(password):
        password = f"{{{DEFAULT_SCHEME}}}{password}"
    quota_bytes, quota_messages = _quota(fields[FIELD_COUNT - 1] if len(fields) == FIELD_COUNT else "")
    return mailboxcsv.Row(
        line,
        address,
        password=None,
        password_hash=store.storable_password_hash(password),
        quota_bytes=quota_bytes,
        quota_messages=quota_messages,
    )


def _quota(extra_fields: str) -> tuple[int | None, int]:
    """(quota in bytes or None for the domain's default, message limit) from the extra fields."""
    for field in extra_fields.split():
        name, _, value = field.partition("=")
        if name in QUOTA_RULE_FIELDS:
            return _quota_rule(value)
    return None, 0


def _quota_rule(rule: str) -> tuple[int | None, int]:
    """``*:storage=1G`` -> (1 GiB, 0). Dovecot's storage is in KiB unless a unit is given, bytes
    in bytes; a rule for another folder than ``*`` means nothing to a POP3 inbox."""
    folder, _, limits = rule.partition(":")
    if folder != "*":
        return None, 0
    quota_bytes, quota_messages = None, 0
    for limit in limits.split(":"):
        name, _, value = limit.partition("=")
        if value.startswith(("+", "-")) or value.endswith("%"):
            raise ValueError(f"quota rule {rule!r}: a relative limit cannot be imported; give a size")
        if name == "storage":
            quota_bytes = int(value) * KIB if value.isdigit() else parse_size(value)
        elif name == "bytes":
            quota_bytes = parse_size(value)
        elif name == "messages" and value.isdigit():
            quota_messages = int(value)
        else:
            wanted = "storage, bytes or a number of messages"
            raise ValueError(f"quota rule {rule!r}: {limit or 'its limit'} is not {wanted}")
    return quota_bytes, quota_messages
