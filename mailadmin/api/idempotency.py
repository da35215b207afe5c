"""``Idempotency-Key`` on POST: the first answer to a key is kept for 24 hours and replayed.

A client that timed out can send the same request again with the same key and get the answer
the first one got, without the change being made twice. The key belongs to the token; the same
key with another method, path or body is refused (422), and a key whose first request is still
being answered gets 409. Records live in the database, so every process and host replays alike.
"""

import functools
import hashlib
import json
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from rest_framework import exceptions, status
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from mailadmin.api.errors import Conflict
from mailadmin.api.models import IdempotencyRecord

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255


class KeyReused(exceptions.APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = _("This Idempotency-Key was used for a different request.")
    default_code = "idempotency_key_reused"


def idempotent(handler):
    """Wrap a viewset's POST handler (after authentication) so a repeated key replays."""

    @functools.wraps(handler)
    def wrapper(view, request, *args, **kwargs):
        key = request.headers.get(HEADER)
        if key is None:
            return handler(view, request, *args, **kwargs)
        record = _claim(request, key)
        if record.status is not None:
            return Response(record.body, status=record.status, headers={REPLAYED_HEADER: "true"})
        try:
            try:
                response = handler(view, request, *args, **kwargs)
            except Exception as error:
                response = view.handle_exception(error)  # re-raises what is not an API error
        except BaseException:
            IdempotencyRecord.objects.filter(pk=record.pk).delete()
            raise
        _keep(record, response)
        return response

    return wrapper


def _claim(request, key: str) -> IdempotencyRecord:
    """The record of ``key``: one finished earlier (to replay) or a new one, unfinished."""
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise exceptions.ValidationError({HEADER: [_("Give 1 to 255 characters.")]})
    token = request.auth
    fingerprint = _fingerprint(request)
    cutoff = timezone.now() - timedelta(seconds=settings.API_IDEMPOTENCY_TTL)
    try:
        with transaction.atomic():
            IdempotencyRecord.objects.filter(token=token, created_at__lt=cutoff).delete()
            record = IdempotencyRecord.objects.filter(token=token, key=key).first()
            if record is None:
                return IdempotencyRecord.objects.create(token=token, key=key, fingerprint=fingerprint)
    except IntegrityError:  # a concurrent request claimed the key first
        record = IdempotencyRecord.objects.get(token=token, key=key)
    if record.fingerprint != fingerprint:
        raise KeyReused()
    if record.status is None:
        raise Conflict(_("A request with this Idempotency-Key is still being answered."), code="in_progress")
    return record


def _fingerprint(request) -> str:
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.get_full_path().encode(), request.body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _keep(record: IdempotencyRecord, response: Response) -> None:
    """Keep the answer to replay; a server error is not kept, so the key may be tried again."""
    if response.status_code >= 500:
        IdempotencyRecord.objects.filter(pk=record.pk).delete()
        return
    body = json.loads(JSONRenderer().render(response.data)) if response.data is not None else None
    IdempotencyRecord.objects.filter(pk=record.pk).update(status=response.status_code, body=body)
