from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "mailadmin.api"
    label = "api"
    verbose_name = "Provisioning API"

    def ready(self) -> None:
        from mailadmin.api import schema  # noqa: F401  (registers the schema's token description)
