from django.apps import AppConfig


class MailadminConfig(AppConfig):
    name = "mailadmin"
    verbose_name = "Mail administration"
