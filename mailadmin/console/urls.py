"""The console's pages, each wrapped in the admin's ``admin_view`` (staff login, CSRF, no cache)."""

from django.urls import path


def console_urls(site) -> list:
    from mailadmin.console import views

    return [
        path(
            "sessions/live/",
            site.admin_view(lambda request: views.live_sessions(request, site)),
            name="live_sessions",
        ),
        path("sessions/live/kick/", site.admin_view(views.kick_session), name="live_sessions_kick"),
    ]
