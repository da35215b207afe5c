from django.contrib.admin.apps import AdminConfig


class ConsoleAdminConfig(AdminConfig):
    """The Django admin with the console's pages registered on its site."""

    default_site = "mailadmin.console.site.ConsoleSite"
