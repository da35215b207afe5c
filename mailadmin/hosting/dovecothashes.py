"""Dovecot's ``{SCHEME}`` password hashes, checked by a Django password hasher of our own.

A host moving over from Dovecot keeps its users' passwords: the hash Dovecot stored (what
``doveadm pw`` prints, or the password field of a passwd-file) is imported as it is, behind
this hasher's prefix: ``{SSHA512}...`` is stored as ``dovecot${SSHA512}...``. A crypt(3) hash
names its method itself (``$6$`` is SHA512-CRYPT), so the schemes of that family are stored
without their tag, as Dovecot's {CRYPT} reads them: ``{SHA512-CRYPT}$6$...`` becomes
``dovecot$$6$...``. That keeps a SHA512-CRYPT hash with a ``rounds=`` field within the 128
characters of ``auth.User.password``. A hash given in another encoding than its scheme's own
(``{SSHA.HEX}``, ``{SHA512-CRYPT.B64}``, as PostfixAdmin writes some) is stored re-encoded in it.

Django's ``identify_hasher`` finds this hasher by the prefix; ``check_password`` verifies with
it and, since it is never the preferred hasher, hands the password to the setter on success,
so the first successful login rehashes it with the project's argon2 (``must_update`` says so
too). No Dovecot hash is ever made here.

The verification itself is libpass's (the maintained fork of passlib), with the bcrypt module
behind BLF-CRYPT; this module only maps Dovecot's scheme names onto its handlers and reports
what a hash costs to check, in the terms ``store.check_password_hash`` bounds.
"""

import base64
import binascii
from dataclasses import dataclass

from django.contrib.auth.hashers import (
    Argon2PasswordHasher,
    BasePasswordHasher,
    BCryptSHA256PasswordHasher,
    mask_hash,
)
from django.utils.translation import gettext_noop as _
from passlib import hash as passlib_hash
from passlib.context import CryptContext

ALGORITHM = "dovecot"
PREFIX = f"{ALGORITHM}$"
CRYPT_SCHEME = "CRYPT"
# bcrypt reads at most 72 bytes of a password; Dovecot's crypt_blowfish dropped the rest, while
# the bcrypt module refuses a longer one, so the rest is dropped here as it was there.
BCRYPT_PASSWORD_BYTES = 72
# SHA-crypt rounds costing about one argon2 check at Django's defaults on a current server core
# (SHA512-CRYPT at 100,000 rounds: ~65 ms); an imported hash may cost MAX_HASH_COST_FACTOR times it.
SHA_CRYPT_REFERENCE_ROUNDS = 100_000

# crypt(3) as Dovecot's {CRYPT} calls it: the hash's own prefix names the method.
_CRYPT = CryptContext(schemes=["bcrypt", "sha512_crypt", "sha256_crypt", "md5_crypt", "des_crypt"])


class NotADovecotHash(ValueError):
    """A ``{SCHEME}`` hash that cannot be checked here; the message says why, for the operator."""


@dataclass(frozen=True)
class Scheme:
    """How to check one Dovecot scheme with a libpass handler.

    ``ldap``: the tag the handler expects in front of the hash, LDAP style (libpass's
    ``{SSHA}`` for Dovecot's SSHA, ``{MD5}`` for its LDAP-MD5); empty when it reads the bare
    hash. ``body_prefixes``: what the hash must begin with, when the handler
    accepts more than the scheme (libpass's argon2 reads argon2i and argon2id alike).
    """

    handler: object
    ldap: str = ""
    body_prefixes: tuple[str, ...] = ()
    crypt: bool = False  # a crypt(3) hash, whose $id$ names its method: stored untagged
    encoding: str = "text"  # how the scheme writes its raw bytes: "text", "base64" or "hex"

    def handler_input(self, body: str) -> str:
        return f"{self.ldap}{body}"

    def encode(self, raw: bytes) -> str:
        """The raw hash (a ``.HEX`` or ``.B64`` body decoded) in this scheme's own encoding."""
        if self.encoding == "base64":
            return base64.b64encode(raw).decode("ascii")
        if self.encoding == "hex":
            return raw.hex()
        return raw.decode("ascii")


SCHEMES: dict[str, Scheme] = {
    "ARGON2ID": Scheme(passlib_hash.argon2, body_prefixes=("$argon2id$",)),
    "ARGON2I": Scheme(passlib_hash.argon2, body_prefixes=("$argon2i$",)),
    "BLF-CRYPT": Scheme(passlib_hash.bcrypt, crypt=True),
    "SHA512-CRYPT": Scheme(passlib_hash.sha512_crypt, crypt=True),
    "SHA256-CRYPT": Scheme(passlib_hash.sha256_crypt, crypt=True),
    "MD5-CRYPT": Scheme(passlib_hash.md5_crypt, crypt=True),
    "MD5": Scheme(passlib_hash.md5_crypt, crypt=True),  # Dovecot's alias of MD5-CRYPT
    "DES-CRYPT": Scheme(passlib_hash.des_crypt, crypt=True),
    "CRYPT": Scheme(_CRYPT, crypt=True),
    "SSHA512": Scheme(passlib_hash.ldap_salted_sha512, ldap="{SSHA512}", encoding="base64"),
    "SSHA256": Scheme(passlib_hash.ldap_salted_sha256, ldap="{SSHA256}", encoding="base64"),
    "SSHA": Scheme(passlib_hash.ldap_salted_sha1, ldap="{SSHA}", encoding="base64"),
    "SMD5": Scheme(passlib_hash.ldap_salted_md5, ldap="{SMD5}", encoding="base64"),
    "SHA": Scheme(passlib_hash.ldap_sha1, ldap="{SHA}", encoding="base64"),
    "SHA1": Scheme(passlib_hash.ldap_sha1, ldap="{SHA}", encoding="base64"),
    "LDAP-MD5": Scheme(passlib_hash.ldap_md5, ldap="{MD5}", encoding="base64"),
    "PLAIN-MD5": Scheme(passlib_hash.hex_md5, encoding="hex"),
}


# Dovecot's suffixes naming the encoding of a hash, and how to read each.
_DECODERS = {
    "B64": lambda body: base64.b64decode(body, validate=True),
    "BASE64": lambda body: base64.b64decode(body, validate=True),
    "HEX": bytes.fromhex,
}


def is_dovecot_hash(text: str) -> bool:
    """Whether ``text`` is in Dovecot's own form, ``{SCHEME}hash``."""
    return text.startswith("{") and "}" in text


def to_django(text: str) -> str:
    """A Dovecot ``{SCHEME}hash`` in the form Django stores (this hasher's prefix added, the tag
    of a crypt(3) scheme dropped once the hash is found to be of that scheme); anything else
    as it was."""
    if not is_dovecot_hash(text):
        return text
    name, _, body = text[1:].partition("}")
    name, body = _own_encoding(name, body)
    scheme = SCHEMES.get(name.upper())
    if scheme is None or not scheme.crypt:
        return f"{PREFIX}{{{name}}}{body}"
    costs(f"{PREFIX}{{{name}}}{body}")  # NotADovecotHash, naming the scheme given, unless it is one
    return PREFIX + body


def _own_encoding(name: str, body: str) -> tuple[str, str]:
    """``SCHEME.HEX`` / ``SCHEME.B64`` and their body -> ``SCHEME`` and the body in its encoding."""
    scheme_name, dot, encoding = name.rpartition(".")
    decode = _DECODERS.get(encoding.upper())
    scheme = SCHEMES.get(scheme_name.upper())
    if not dot or decode is None or scheme is None:
        return name, body
    try:
        return scheme_name, scheme.encode(decode(body))
    except (ValueError, binascii.Error):
        raise NotADovecotHash(f"not a valid {{{name.upper()}}} hash (not {encoding.lower()})") from None


def split(encoded: str) -> tuple[str, Scheme, str]:
    """``dovecot${SCHEME}body`` (or ``dovecot$body`` for crypt(3)) -> (scheme name, its Scheme,
    body); NotADovecotHash if it cannot be checked."""
    text = encoded.removeprefix(PREFIX)
    if is_dovecot_hash(text):
        name, _, body = text[1:].partition("}")
    else:
        name, body = CRYPT_SCHEME, text
    scheme = SCHEMES.get(name.upper())
    if scheme is None:
        known = ", ".join(f"{{{known}}}" for known in SCHEMES)
        raise NotADovecotHash(f"{{{name}}} is not a Dovecot scheme this server can check (it checks {known})")
    handler_input = scheme.handler_input(body)
    wrong_prefix = scheme.body_prefixes and not body.startswith(scheme.body_prefixes)
    if not body or wrong_prefix or not scheme.handler.identify(handler_input):
        raise NotADovecotHash(f"not a valid {{{name.upper()}}} hash")
    return name.upper(), scheme, body


def costs(encoded: str) -> dict[str, int]:
    """What checking the hash costs, under the names ``store.check_password_hash`` bounds:
    argon2's time_cost, memory_cost and parallelism; bcrypt's work_factor (log2 rounds);
    SHA-crypt's rounds. The other schemes cost a digest or two: nothing to bound."""
    name, scheme, body = split(encoded)
    handler_input = scheme.handler_input(body)
    handler = _handler(scheme, handler_input)
    if hasattr(handler, "has_backend") and not handler.has_backend():
        raise NotADovecotHash(
            f"{{{name}}} hashes cannot be checked here: libpass finds no module for {handler.name} installed"
        )
    try:
        parsed = handler.from_string(handler_input)
    except (ValueError, TypeError) as error:
        raise NotADovecotHash(f"not a valid {{{name}}} hash ({error})") from None
    if not parsed.checksum:  # libpass takes a bare salt and cost (a configuration) for a hash
        raise NotADovecotHash(f"not a valid {{{name}}} hash (it holds no checksum)")
    kind = parsed.name
    if kind == "argon2":
        return {
            "time_cost": parsed.rounds,
            "memory_cost": parsed.memory_cost,
            "parallelism": parsed.parallelism,
        }
    if kind == "bcrypt":
        return {"work_factor": parsed.rounds}
    if kind in ("sha256_crypt", "sha512_crypt"):
        return {"rounds": parsed.rounds}
    return {}


def _handler(scheme: Scheme, handler_input: str):
    """The libpass handler for this hash: the scheme's, or for {CRYPT} the one its prefix names."""
    if isinstance(scheme.handler, CryptContext):
        return scheme.handler.handler(scheme.handler.identify(handler_input, required=True))
    return scheme.handler


def verify(password: str, encoded: str) -> bool:
    _name, scheme, body = split(encoded)
    handler_input = scheme.handler_input(body)
    if _handler(scheme, handler_input).name == "bcrypt":
        password = password.encode()[:BCRYPT_PASSWORD_BYTES]
    return scheme.handler.verify(password, handler_input)


class DovecotPasswordHasher(BasePasswordHasher):
    """Checks imported Dovecot hashes; every one is replaced by argon2 at its first good login.

    The cost attributes are the references the import's cost bounds are measured against
    (``store.check_password_hash``): today's argon2 and bcrypt defaults, and for SHA-crypt
    ``SHA_CRYPT_REFERENCE_ROUNDS``.
    """

    algorithm = ALGORITHM
    time_cost = Argon2PasswordHasher.time_cost
    memory_cost = Argon2PasswordHasher.memory_cost
    parallelism = Argon2PasswordHasher.parallelism
    bcrypt_rounds = BCryptSHA256PasswordHasher.rounds
    sha_crypt_rounds = SHA_CRYPT_REFERENCE_ROUNDS

    def encode(self, password: str, salt: str) -> str:
        raise NotImplementedError("Dovecot hashes are imported, never made here")

    def verify(self, password: str, encoded: str) -> bool:
        # Unlike Django's hashers this one is never the preferred hasher, so a wrong password
        # is slowed by the authenticator's fixed failure time, not by harden_runtime.
        try:
            return verify(password, encoded)
        except NotADovecotHash:
            return False

    def decode(self, encoded: str) -> dict:
        name, _scheme, body = split(encoded)
        return {"algorithm": self.algorithm, "scheme": name, "hash": body, **costs(encoded)}

    def safe_summary(self, encoded: str) -> dict:
        name, _scheme, body = split(encoded)
        return {_("algorithm"): self.algorithm, _("scheme"): name, _("hash"): mask_hash(body)}

    def must_update(self, encoded: str) -> bool:
        return True

    def harden_runtime(self, password: str, encoded: str) -> None:
        pass
