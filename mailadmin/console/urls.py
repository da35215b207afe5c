"""The console's pages, each wrapped in the admin's ``admin_view`` (staff login, CSRF, no cache)."""

from functools import partial

from django.urls import path

from mailadmin.console import history, quota, views


def console_urls(site) -> list:
    def page(view):
        return site.admin_view(partial(view, site=site))

    return [
        path("charts/", site.admin_view(views.charts_view(site)), name="charts"),
        path("history/", page(history.history_view), name="history"),
        path("quota/", page(quota.quota_view), name="quota"),
        path("quota/csv/", page(quota.quota_csv_view), name="quota_csv"),
        path("quota/recalculate/", page(quota.recalculate_view), name="quota_recalculate"),
    ]
