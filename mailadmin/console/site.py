"""The admin site the console's pages hang from: staff only, the admin's login, its templates."""

from django.contrib import admin
from django.utils.translation import gettext_lazy as _


class ConsoleSite(admin.AdminSite):
    site_header = _("mailadmin")
    site_title = _("mailadmin")
    index_title = _("Console")

    def index(self, request, extra_context=None):
        """The admin's index with the dashboard's figures and charts above the app list."""
        from mailadmin.console.views import dashboard_context

        return super().index(request, {**dashboard_context(request), **(extra_context or {})})

    def get_urls(self):
        from mailadmin.console.urls import console_urls

        return console_urls(self) + super().get_urls()
