"""API tokens in the admin: made through the service layer and shown once, revoked by an action.

A domain administrator sees and makes tokens for their own domains only (``create_token``
refuses the rest, and a token for every domain); a token is never edited, only revoked.
"""

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from mailadmin.admin import ServiceAdmin, ServiceForm, actor_of
from mailadmin.api.models import ApiToken
from mailadmin.hosting import scopes, services, store
from mailadmin.models import Domain


class TokenCreationForm(ServiceForm):
    domains = forms.ModelMultipleChoiceField(
        queryset=Domain.objects.none(),
        required=False,
        help_text=_("None: every domain (operators of every domain only)."),
    )
    expires_days = forms.IntegerField(
        required=False, min_value=1, label=_("Expires after (days)"), help_text=_("Blank: never.")
    )
    networks = forms.CharField(
        required=False,
        label=_("Allowed networks"),
        help_text=_("CIDRs, separated by commas or spaces. Blank: anywhere."),
    )

    class Meta:
        model = ApiToken
        fields = ["name", "scope"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["domains"].queryset = scopes.visible_to(self.actor, Domain).order_by("name")

    def apply(self, cleaned: dict) -> ApiToken:
        new = services.create_token(
            self.actor,
            name=cleaned["name"],
            domain_names=[domain.name for domain in cleaned["domains"]],
            scope=cleaned["scope"],
            expires_days=cleaned["expires_days"],
            allowed_networks=cleaned["networks"].replace(",", " ").split(),
        )
        self.secret = new.secret
        return new.token


@admin.register(ApiToken)
class ApiTokenAdmin(ServiceAdmin):
    list_display = [
        "prefix",
        "name",
        "scope",
        "reach",
        "expires_at",
        "revoked_at",
        "last_used_at",
        "last_used_from",
    ]
    list_filter = ["scope"]
    search_fields = ["prefix", "name"]
    fields = [
        "prefix",
        "name",
        "scope",
        "reach",
        "allowed_networks",
        "expires_at",
        "revoked_at",
        "created_at",
        "created_by",
        "last_used_at",
        "last_used_from",
    ]
    readonly_fields = fields
    creation_fields = ["name", "scope", "domains", "expires_days", "networks"]
    actions = ["revoke"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiToken]:
        return services.tokens_visible_to(actor_of(request)).prefetch_related("domains")

    @admin.display(description=_("domains"))
    def reach(self, token: ApiToken) -> str:
        return ", ".join(domain.name for domain in token.domains.all()) if not token.all_domains else _("all")

    def get_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> list[str]:
        return self.fields if obj is not None else self.creation_fields

    def get_readonly_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> list[str]:
        return self.readonly_fields if obj is not None else []

    def get_form(self, request: HttpRequest, obj: ApiToken | None = None, change: bool = False, **kwargs):
        if obj is None:
            kwargs["form"] = TokenCreationForm
        return super().get_form(request, obj, change, **kwargs)

    def save_model(self, request: HttpRequest, obj: ApiToken, form: TokenCreationForm, change: bool) -> None:
        super().save_model(request, obj, form, change)
        request.api_token_secret = form.secret

    def response_add(self, request: HttpRequest, obj: ApiToken, post_url_continue=None):
        """The one page that shows the token: it is not kept, so it cannot be shown again."""
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "token": obj,
            "secret": request.api_token_secret,
            "title": _("API token created"),
        }
        return TemplateResponse(request, "admin/api/apitoken/created.html", context)

    def _may_manage(self, request: HttpRequest) -> bool:
        actor = actor_of(request)
        return request.user.is_staff and (actor.all_domains or bool(actor.domain_ids))

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self._may_manage(request)

    def has_view_permission(self, request: HttpRequest, obj: ApiToken | None = None) -> bool:
        return self._may_manage(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return self._may_manage(request)

    def has_change_permission(self, request: HttpRequest, obj: ApiToken | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: ApiToken | None = None) -> bool:
        return False

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return self._may_manage(request)

    @admin.action(description=_("Revoke the selected tokens"), permissions=["revoke"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        revoked = 0
        for token in queryset:
            try:
                services.revoke_token(actor_of(request), token.prefix)
            except store.StoreError as error:
                self.refused(request, error)
                return
            revoked += 1
        self.message_user(request, ngettext("Revoked %d token.", "Revoked %d tokens.", revoked) % revoked)
