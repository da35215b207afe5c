"""Validation and normalisation of domain names and mailbox addresses."""

import re
import unicodedata

from django.utils.translation import gettext

MAX_DOMAIN_LENGTH = 253  # RFC 1035 section 2.3.4, without the trailing dot
MAX_LOCAL_PART_LENGTH = 64  # RFC 5321 section 4.5.3.1.1
ACE_PREFIX = "xn--"  # RFC 5890 section 2.3.1
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# RFC 5322 dot-atom text: atext characters separated by single dots.
_LOCAL_PART = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


def normalise_domain(name: str) -> str:
    """Return the lower-case A-label form of ``name`` or raise ValueError saying what is wrong."""
    candidate = name.strip().rstrip(".").lower()
    if not candidate:
        raise ValueError(gettext("domain name is empty"))
    try:
        ascii_name = candidate.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(
            gettext("%(name)r is not a valid internationalised domain name") % {"name": name}
        ) from None
    if len(ascii_name) > MAX_DOMAIN_LENGTH:
        raise ValueError(
            gettext("domain name longer than %(length)d characters") % {"length": MAX_DOMAIN_LENGTH}
        )
    labels = ascii_name.split(".")
    if len(labels) < 2:
        raise ValueError(gettext("%(name)r is not a fully qualified domain name") % {"name": name})
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(
                gettext("%(name)r has an invalid label %(label)r") % {"name": name, "label": label}
            )
        if label.startswith(ACE_PREFIX) and not _decodes(label):
            raise ValueError(
                gettext("%(name)r has a label %(label)r that is not a valid A-label")
                % {"name": name, "label": label}
            )
    if labels[-1].isdigit():
        # RFC 3696 section 2: a top-level domain is never all-numeric; this is an IP address.
        raise ValueError(gettext("%(name)r is an address, not a domain name") % {"name": name})
    return ascii_name


def _decodes(a_label: str) -> bool:
    """RFC 5890 section 2.3.2.1: an A-label must decode to a U-label; ``xn--zz`` does not."""
    try:
        a_label.encode("ascii").decode("idna")
    except UnicodeError:
        return False
    return True


def normalise_address(address: str) -> str:
    """Return ``local@domain`` lower-cased with an A-label domain, or raise ValueError."""
    candidate = address.strip()
    local, at, domain = candidate.rpartition("@")
    if not at or not local:
        raise ValueError(
            gettext("%(address)r is not an address of the form local@domain") % {"address": address}
        )
    local = local.lower()
    if len(local) > MAX_LOCAL_PART_LENGTH or not _LOCAL_PART.match(local):
        raise ValueError(gettext("%(address)r has an invalid local part") % {"address": address})
    return f"{local}@{normalise_domain(domain)}"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def domain_of_login(login: str) -> str | None:
    """The A-label domain of a login name as a client typed it, or None when it names none.

    NFKC and lower-cased as login names are; for recording which domain a failed login tried.
    """
    local, at, domain = unicodedata.normalize("NFKC", login).strip().rpartition("@")
    if not at or not local:
        return None
    try:
        return normalise_domain(domain)
    except ValueError:
        return None
