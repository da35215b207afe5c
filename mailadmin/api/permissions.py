"""What a token may do with a request: read tokens read, write tokens also change."""

from django.utils.translation import gettext_lazy as _
from rest_framework.permissions import SAFE_METHODS, BasePermission

from mailadmin.api.models import ApiToken


class TokenScope(BasePermission):
    message = _("This token may only read.")
    code = "read_only_token"

    def has_permission(self, request, view) -> bool:
        token = request.auth
        if not isinstance(token, ApiToken):
            return False  # DRF answers 401: no credentials were given
        return request.method in SAFE_METHODS or token.scope == ApiToken.Scope.WRITE
