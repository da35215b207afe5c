"""``Authorization: Bearer mat_...``: the token's row, its limits, and the record of failures.

A request is the token's actor (``services.token_actor``) from its client address. A wrong,
expired or revoked token is answered 401, a token used from outside its networks 403; each is
recorded as a failed login (mechanism ``bearer``), and a source with
``API_AUTH_FAILURE_LIMIT`` failures within the window gets 429 instead, without another row,
until its oldest failure leaves the window. The count lives in the database, so every daphne
process on every host applies the same limit.
"""

from datetime import timedelta

from django.conf import settings
from django.db.models import Min, Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header

from mailadmin.api.clients import client_address, in_networks, source_of
from mailadmin.api.lookups import find_token, token_domain_ids
from mailadmin.api.models import ApiToken
from mailadmin.hosting import services, tokens
from mailadmin.models import AuthFailure

MECHANISM = "bearer"


REFUSALS = {
    "revoked token": _("This token has been revoked."),
    "expired token": _("This token has expired."),
}


class OutsideNetworks(exceptions.PermissionDenied):
    default_detail = _("This token may not be used from your address.")
    default_code = "outside_networks"


class BearerTokenAuthentication(BaseAuthentication):
    keyword = b"bearer"

    def authenticate(self, request):
        words = get_authorization_header(request).split()
        if not words or words[0].lower() != self.keyword:
            return None
        client = client_address(request)
        text = words[1].decode("latin-1") if len(words) == 2 else ""
        tried = tokens.prefix_of(text)
        token, reason = _find_token(text)
        if token is None:
            _record_failure(client, reason, tried)
            raise exceptions.AuthenticationFailed(
                REFUSALS.get(reason, _("Invalid token.")), code=reason.replace(" ", "_")
            )
        networks = token.network_list()
        if networks and not in_networks(client, networks):
            _record_failure(client, "outside networks", tried)  # a token used elsewhere may have leaked
            raise OutsideNetworks()
        _note_use(token, client)
        return services.token_actor(token, client, token_domain_ids(token)), token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'


def _find_token(text: str) -> tuple[ApiToken | None, str]:
    """The usable token ``text`` is, or None and why not (wrong, expired, revoked)."""
    prefix = tokens.prefix_of(text)
    token = find_token(prefix) if prefix else None
    if token is None or not tokens.matches(text, token.digest):
        return None, "wrong token"
    if token.revoked_at is not None:
        return None, "revoked token"
    if token.expires_at is not None and token.expires_at <= timezone.now():
        return None, "expired token"
    return token, ""


def _record_failure(client: str, reason: str, tried: str | None) -> None:
    """Record a failed authentication from ``client``, or raise Throttled (429) without a row
    once its source has ``API_AUTH_FAILURE_LIMIT`` failures within the window."""
    source = source_of(client)
    window = timedelta(seconds=settings.API_AUTH_FAILURE_WINDOW)
    now = timezone.now()
    recent = AuthFailure.objects.filter(mechanism=MECHANISM, source=source, created_at__gt=now - window)
    if recent.count() >= settings.API_AUTH_FAILURE_LIMIT:
        oldest = recent.aggregate(oldest=Min("created_at"))["oldest"]
        raise exceptions.Throttled(wait=max(1, (oldest + window - now).total_seconds()))
    AuthFailure.objects.create(
        created_at=now,
        username=tried or "",
        peer_host=client[:64],
        source=source,
        mechanism=MECHANISM,
        reason=reason,
        penalised=False,
    )


def _note_use(token: ApiToken, client: str) -> None:
    """Record the token's last use, at most once per ``API_LAST_USED_INTERVAL`` across processes."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.API_LAST_USED_INTERVAL)
    if token.last_used_at is not None and token.last_used_at > stale:
        return
    ApiToken.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lte=stale), pk=token.pk).update(
        last_used_at=now, last_used_from=client[:64]
    )
