"""The live sessions page and its kick: doors onto the service layer; rows come over the websocket."""

import uuid

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, JsonResponse
from django.template.response import TemplateResponse
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from mailadmin.admin import actor_of
from mailadmin.console.consumers import VIEW_PERMISSION
from mailadmin.console.routing import LIVE_SESSIONS_SOCKET_PATH
from mailadmin.console.sessions import PAGE_SIZE, State
from mailadmin.hosting import services


def live_sessions(request: HttpRequest, site) -> TemplateResponse:
    """The page; its rows come over the websocket (``mailadmin.console.consumers``)."""
    if not request.user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied
    strings = {
        "states": {
            State.AUTHORIZATION: _("logging in"),
            State.TRANSACTION: _("logged in"),
            State.KICKING: _("kick requested"),
        },
        "kick": _("Kick"),
        "confirm_kick": _("End the session of %(address)s from %(client)s? Its deletions are not applied."),
        "no_login": _("(no login yet)"),
        "connected": _("Live: updated as sessions change."),
        "reconnecting": _("Connection lost; reconnecting…"),
        "refused": _("You may not view live sessions."),
        "empty": _("No open sessions."),
        "summary": _("Page %(page)s of %(pages)s: %(total)s open sessions."),
        "kick_failed": _("The kick was refused: %(reason)s"),
    }
    context = {
        **site.each_context(request),
        "title": _("Live POP3 sessions"),
        "may_kick": services.may_kick(actor_of(request)),
        "page_size": PAGE_SIZE,
        "live_config": {"socket_path": LIVE_SESSIONS_SOCKET_PATH, "strings": strings},
    }
    return TemplateResponse(request, "console/live_sessions.html", context)


@require_POST
def kick_session(request: HttpRequest) -> JsonResponse:
    """Kick one session through the service layer, with the page's user as the actor."""
    try:
        session_id = uuid.UUID(request.POST.get("session", ""))
    except ValueError:
        return JsonResponse({"error": _("No such session.")}, status=400)
    try:
        kicked = services.kick_sessions(actor_of(request), session_ids=[session_id])
    except services.NotPermitted:
        return JsonResponse({"error": _("Kicking sessions needs the kick permission.")}, status=403)
    return JsonResponse({"kicked": kicked})
