from django.apps import AppConfig
from django.db.models.signals import post_migrate
from django.utils.translation import gettext_lazy as _


class MailadminConfig(AppConfig):
    name = "mailadmin"
    verbose_name = _("Mail administration")

    def ready(self) -> None:
        from mailadmin import checks  # noqa: F401  (registers the system checks)

        post_migrate.connect(_refresh_administrators_group, sender=self)


def _refresh_administrators_group(**kwargs) -> None:
    from mailadmin.hosting import services

    services.refresh_administrators_group()
