"""Who is on the other end of an API request: the client's address, and its source for limits."""

import ipaddress

from django.conf import settings
from django.http import HttpRequest

from mailadmin.pop3d.authenticator import penalty_source


def client_address(request: HttpRequest) -> str:
    """The peer's address; behind a proxy listed in ``API_TRUSTED_PROXIES``, the address that
    proxy reports in ``X-Forwarded-For`` (the rightmost hop that is not itself a trusted proxy).

    From anyone else the header is ignored: a client could write anything there.
    """
    peer = request.META.get("REMOTE_ADDR", "")
    if not settings.API_TRUSTED_PROXIES or not _is_trusted_proxy(peer):
        return peer
    hops = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted_proxy(hop):
            return hop if _is_address(hop) else peer
    return peer


def source_of(address: str) -> str:
    """Failed authentications count per source: an IPv4 address or an IPv6 /48, as for POP3."""
    return penalty_source(address)


def in_networks(address: str, networks: list[str]) -> bool:
    try:
        client = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
        client = client.ipv4_mapped
    return any(client in ipaddress.ip_network(network) for network in networks)


def _is_trusted_proxy(address: str) -> bool:
    return in_networks(address, settings.API_TRUSTED_PROXIES)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
