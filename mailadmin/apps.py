from django.apps import AppConfig


class MailadminConfig(AppConfig):
    name = "mailadmin"
    verbose_name = "Mail administration"

    def ready(self) -> None:
        from mailadmin import checks  # noqa: F401  (registers the system checks)
