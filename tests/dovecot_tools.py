"""Dovecot password hashes made by independent tools: ``doveadm pw`` (Debian's dovecot-core) and
``mkpasswd`` (Debian's whois), both installed by ``make system-deps``; tests skip without them."""

import functools
import shutil
import subprocess

import pytest

PASSWORD = "correct horse"
WRONG_PASSWORD = "wrong horse"
DOVEADM = shutil.which("doveadm")
MKPASSWD = shutil.which("mkpasswd")

needs_doveadm = pytest.mark.skipif(
    DOVEADM is None, reason="doveadm (Debian's dovecot-core) is not installed; make system-deps installs it"
)
needs_mkpasswd = pytest.mark.skipif(
    MKPASSWD is None, reason="mkpasswd (Debian's whois) is not installed; make system-deps installs it"
)

# The schemes the migration must read, as doveadm pw -s names them.
REQUIRED_SCHEMES = [
    "ARGON2ID",
    "ARGON2I",
    "BLF-CRYPT",
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "SSHA512",
    "SSHA256",
    "SSHA",
    "PLAIN-MD5",
    "MD5-CRYPT",
    "CRYPT",
]
# Further schemes Dovecot offers and this server reads too.
MORE_SCHEMES = ["SMD5", "SHA", "SHA1", "LDAP-MD5", "DES-CRYPT", "MD5"]
# mkpasswd method -> the Dovecot scheme its hashes are stored under.
MKPASSWD_METHODS = {
    "sha512crypt": "SHA512-CRYPT",
    "sha256crypt": "SHA256-CRYPT",
    "md5crypt": "MD5-CRYPT",
    "bcrypt": "BLF-CRYPT",
    "descrypt": "CRYPT",
}


@functools.cache
def doveadm_hash(scheme: str, password: str = PASSWORD) -> str:
    """``{SCHEME}hash`` as ``doveadm pw -s SCHEME`` prints it (made once per test run)."""
    done = subprocess.run(
        [DOVEADM, "pw", "-s", scheme, "-p", password], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


def mkpasswd_hash(method: str, password: str = PASSWORD) -> str:
    """``{SCHEME}hash`` for a crypt(3) hash that ``mkpasswd -m METHOD`` made."""
    done = subprocess.run(
        [MKPASSWD, "-m", method, "--stdin"],
        input=password,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return f"{{{MKPASSWD_METHODS[method]}}}{done.stdout.strip()}"
