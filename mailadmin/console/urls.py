"""The console's pages, each wrapped in the admin's ``admin_view`` (staff login, CSRF, no cache)."""

from django.urls import path

from mailadmin.console import views


def console_urls(site) -> list:
    return [
        path("charts/", site.admin_view(views.charts_view(site)), name="charts"),
    ]
