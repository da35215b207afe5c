"""Every API error as JSON: ``{"code": ..., "detail": ..., "fields": {name: [messages]}}``.

``code`` is machine-readable and stable; ``detail`` is for people; ``fields`` names the inputs
at fault, and an import error also carries the ``row`` (CSV line or list position) it is on.
A refusal from the service layer maps to a status by its kind: outside the token's domains or
missing 404, not permitted 403, a conflict with what exists 409, anything else 400.
"""

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from django.utils.translation import gettext as _
from rest_framework import exceptions, status
from rest_framework.views import exception_handler

from mailadmin.hosting import services, store


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class StoreRefusal(exceptions.APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid"


# Most specific first: OutOfScope is a NotPermitted, every one a StoreError.
_REFUSALS: list[tuple[type[store.StoreError], type[exceptions.APIException], str]] = [
    (services.OutOfScope, exceptions.NotFound, "not_found"),
    (store.DomainNotFound, exceptions.NotFound, "not_found"),
    (store.MailboxNotFound, exceptions.NotFound, "not_found"),
    (store.AliasNotFound, exceptions.NotFound, "not_found"),
    (services.NotPermitted, exceptions.PermissionDenied, "not_permitted"),
    (store.AlreadyExists, Conflict, "already_exists"),
    (store.LimitReached, Conflict, "limit_reached"),
    (store.StillInUse, Conflict, "still_in_use"),
    (store.StoreError, StoreRefusal, "invalid"),
]


def handle_exception(exc: Exception, context: dict):
    refusal = exc
    if isinstance(exc, store.StoreError):
        refusal = api_exception(exc)
    elif isinstance(exc, Http404):
        refusal = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        refusal = exceptions.PermissionDenied()
    response = exception_handler(refusal, context)
    if response is None:
        return None
    response.data = _body(refusal, exc, response.data)
    return response


def api_exception(error: store.StoreError) -> exceptions.APIException:
    for kind, api_kind, code in _REFUSALS:
        if isinstance(error, kind):
            return api_kind(str(error), code=code)
    raise AssertionError("StoreError is the last entry")


def _body(refusal: exceptions.APIException, original: Exception, data) -> dict:
    field = getattr(original, "field", None)
    if isinstance(refusal, exceptions.ValidationError) and isinstance(data, dict | list):
        return _validation_body(refusal)
    body = {"code": _code(refusal), "detail": str(getattr(refusal, "detail", refusal))}
    if field:
        body["fields"] = {field: [body["detail"]]}
    row = getattr(original, "row", None)
    if row is not None:
        body["row"] = row
    return body


def _validation_body(error: exceptions.ValidationError) -> dict:
    detail = error.detail if isinstance(error.detail, dict) else {"non_field_errors": error.detail}
    fields = {name: [str(message) for message in _flat(messages)] for name, messages in detail.items()}
    general = fields.pop("non_field_errors", [])
    return {
        "code": "invalid",
        "detail": " ".join(general) or _("Some fields are not valid."),
        "fields": fields,
    }


def _flat(messages) -> list:
    if isinstance(messages, dict):
        return [f"{name}: {message}" for name, inner in messages.items() for message in _flat(inner)]
    if isinstance(messages, list):
        return [message for inner in messages for message in _flat(inner)]
    return [messages]


def _code(error: exceptions.APIException) -> str:
    codes = error.get_codes()
    return codes if isinstance(codes, str) else error.default_code
