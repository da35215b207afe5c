"""What every console page shares: its permission check, its context, and looking up filter values
through the service layer (``mailadmin.admin.domain_or_404`` for domains), so a value outside
the user's scope is not found (404) wherever it is typed."""

from django.contrib.admin import AdminSite
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest
from django.template.response import TemplateResponse

from mailadmin.admin import actor_of
from mailadmin.hosting import services, store
from mailadmin.models import Mailbox


def require(request: HttpRequest, *permissions: str) -> None:
    """Refuse (403) a staff user lacking any of ``permissions``."""
    if not request.user.has_perms(permissions):
        raise PermissionDenied


def mailbox_in_scope(request: HttpRequest, address: str) -> Mailbox | None:
    """The mailbox at ``address`` if it exists in the user's scope; None when it does not exist.
    An address in a domain outside the user's scope is not found (404), whether or not it exists."""
    try:
        return services.get_mailbox(actor_of(request), address)
    except services.NotPermitted:
        raise Http404 from None
    except store.StoreError:
        return None


def render(request: HttpRequest, site: AdminSite, template: str, title: str, **context) -> TemplateResponse:
    return TemplateResponse(request, template, {**site.each_context(request), "title": title, **context})
