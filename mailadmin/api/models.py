"""The provisioning API's tables: its tokens and the answers kept for ``Idempotency-Key``.

Failed API authentications are ``mailadmin.AuthFailure`` rows (mechanism ``bearer``, never
penalised for POP3), so ``prunehistory`` and the admin's failed-login list cover them too.
"""

from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from mailadmin.models import Domain


class ApiTokenQuerySet(models.QuerySet):
    def usable(self) -> "ApiTokenQuerySet":
        """Neither revoked nor expired."""
        now = timezone.now()
        return self.filter(revoked_at__isnull=True).filter(
            models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=now)
        )


class ApiToken(models.Model):
    """A Bearer token: its visible prefix, the SHA-256 of the whole token, and what it may do.

    The token itself is shown once, when it is made; only its digest is kept. No domain means
    every domain, which only an operator of every domain may grant.
    """

    class Scope(models.TextChoices):
        READ = "read", _("read")
        WRITE = "write", _("write")

    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, unique=True, help_text=_("Tells tokens apart; not secret."))
    digest = models.CharField(max_length=64, editable=False)
    scope = models.CharField(max_length=8, choices=Scope.choices, default=Scope.READ)
    domains = models.ManyToManyField(Domain, blank=True, related_name="+")
    all_domains = models.BooleanField(default=False)
    # Comma-separated CIDRs the token may be used from; blank: anywhere.
    allowed_networks = models.TextField(blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.CharField(max_length=200, blank=True)
    # Written at most once a minute per token, so a busy client costs no write per request.
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_from = models.CharField(max_length=64, blank=True, editable=False)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        verbose_name = _("API token")
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix} {self.name}".strip()

    def network_list(self) -> list[str]:
        return [network for network in self.allowed_networks.split(",") if network]


class IdempotencyRecord(models.Model):
    """The first answer to a POST carrying an ``Idempotency-Key``, replayed for 24 hours.

    ``status`` stays null while the first request is still being answered.
    """

    token = models.ForeignKey(ApiToken, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64, help_text=_("SHA-256 of method, path and body."))
    status = models.PositiveSmallIntegerField(null=True)
    body = models.JSONField(null=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["token", "key"], name="idempotency_key_unique")]
        indexes = [models.Index(fields=["created_at"], name="idempotency_created")]

    def __str__(self) -> str:
        return f"{self.key} ({self.status})"
