"""Django admin: a door onto the service layer, scoped to what the signed-in user may see.

Every edit of a domain or mailbox is applied by a service function with the user as its actor,
writing only the fields edited; a refusal is shown as a form error (or, for actions, a message).
Every list and page is narrowed by ``scopes.visible_to``, so a domain administrator sees and
changes only their domains. Counters are shown, never edited here.
"""

import re
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Count, Model, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import formats, timezone
from django.utils.decorators import method_decorator
from django.utils.html import format_html
from django.utils.text import capfirst, format_lazy
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _
from django.views.decorators.http import require_POST

from mailadmin.addresses import domain_of, normalise_address
from mailadmin.hosting import aliases, scopes, services, store
from mailadmin.hosting.actors import Actor
from mailadmin.models import (
    Alias,
    AliasDomain,
    AuditEntry,
    AuthFailure,
    Domain,
    DomainAdministratorLogin,
    DomainCatchAll,
    Mailbox,
    Message,
    Pop3Session,
    language_choices,
)
from mailadmin.units import compact_size, format_size, parse_size, usage_percent

SIZE_FIELDS = frozenset({"quota_bytes", "default_mailbox_quota_bytes"})
MAILBOX_QUOTAS = frozenset({"quota_bytes", "quota_messages"})
SIZE_HELP = _("Bytes, or a size such as 500M or 2G.")


def actor_of(request: HttpRequest) -> Actor:
    """The signed-in user as an actor, looked up once per request."""
    if not hasattr(request, "mailadmin_actor"):
        request.mailadmin_actor = Actor.for_user(request.user, request.META.get("REMOTE_ADDR", ""))
    return request.mailadmin_actor


def domain_or_404(request: HttpRequest, name: str) -> Domain | None:
    """The domain a filter names, if it names one, looked up through the service layer: missing or
    outside the user's scope, it is not found (404), whichever it is."""
    if not name:
        return None
    try:
        return services.get_domain(actor_of(request), name)
    except store.StoreError:
        raise Http404 from None


def _usage(used_bytes: int, quota_bytes: int) -> str:
    if not quota_bytes:
        return gettext("%(used)s (unlimited)") % {"used": format_size(used_bytes)}
    return gettext("%(used)s of %(quota)s (%(percent)s%%)") % {
        "used": format_size(used_bytes),
        "quota": format_size(quota_bytes),
        "percent": usage_percent(used_bytes, quota_bytes),
    }


class SizeField(forms.CharField):
    """A byte size typed as the commands take it (``500M``, ``2G``) and shown the same way."""

    def to_python(self, value) -> int | None:
        text = super().to_python(value)
        if text in self.empty_values:
            return None
        try:
            return parse_size(text)
        except ValueError as error:
            raise ValidationError(str(error)) from None

    def prepare_value(self, value):
        return compact_size(value) if isinstance(value, int) else value


class ServiceForm(forms.ModelForm):
    """A form that applies its change through the service layer as it is validated.

    Applying inside validation is what turns a refusal into a form error: after ``is_valid()``
    the admin has no way back to the form. The service validates and writes the row, so the
    model form's own instance validation and copying are skipped; the admin reloads the row.
    """

    actor: Actor
    applied: Model | None = None

    def clean(self) -> dict:
        cleaned = super().clean()
        if not self.errors:
            try:
                with transaction.atomic():
                    self.applied = self.apply(cleaned)
            except store.StoreError as error:
                raise ValidationError(str(error)) from None
        return cleaned

    def apply(self, cleaned: dict) -> Model:
        raise NotImplementedError

    def _post_clean(self) -> None:
        pass

    def edited(self, names: frozenset[str]) -> dict:
        return {name: self.cleaned_data[name] for name in self.changed_data if name in names}


class MissingIsNotFound:
    """An object outside the page's queryset is not found (404) on every page that takes an id.

    Django's admin answers some of those pages (change, history) with a redirect to the index
    instead; a 404 everywhere keeps the answer the same whichever page is asked.
    """

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None):
        found = super().get_object(request, object_id, from_field)
        if found is None:
            raise Http404(f"no {self.opts.model_name} with id {object_id!r} here")
        return found


class ScopedAdmin(MissingIsNotFound, admin.ModelAdmin):
    """Rows narrowed to the user's scope; another scope's object is not found (404)."""

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return scopes.visible_to(actor_of(request), super().get_queryset(request))


class AppliedByServices:
    """A model admin whose forms are ServiceForms: saving only reloads what the service wrote,
    and deleting goes through ``delete_model`` (a service call) one object at a time."""

    def get_form(self, request: HttpRequest, obj=None, change: bool = False, **kwargs):
        form = super().get_form(request, obj, change, **kwargs)
        return type(form.__name__, (form,), {"actor": actor_of(request)})

    def save_model(self, request: HttpRequest, obj: Model, form: ServiceForm, change: bool) -> None:
        obj.pk = form.applied.pk
        obj.refresh_from_db()
        obj._state.adding = False

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        for obj in queryset:
            self.delete_model(request, obj)

    def refused(self, request: HttpRequest, error: store.StoreError) -> None:
        self.message_user(request, str(error), messages.ERROR)


class ServiceAdmin(AppliedByServices, ScopedAdmin):
    """Scoped, and edited through ServiceForms."""

    def formfield_for_dbfield(self, db_field, request: HttpRequest, **kwargs):
        if db_field.name in SIZE_FIELDS:
            label, help_text = (
                capfirst(db_field.verbose_name),
                format_lazy("{} {}", db_field.help_text, SIZE_HELP),
            )
            return SizeField(label=label, help_text=help_text)
        return super().formfield_for_dbfield(db_field, request, **kwargs)


def require_same_passwords(first: str, second: str) -> None:
    """A new password typed twice, alike."""
    if first != second:
        raise ValidationError(_("The two passwords differ."))


# --- Domains ---------------------------------------------------------------------------------


class DomainCreationForm(ServiceForm):
    class Meta:
        model = Domain
        fields = ["name", "quota_bytes", "max_mailboxes", "default_mailbox_quota_bytes"]

    def apply(self, cleaned: dict) -> Domain:
        return services.create_domain(
            self.actor,
            cleaned["name"],
            quota_bytes=cleaned["quota_bytes"],
            max_mailboxes=cleaned["max_mailboxes"],
            default_mailbox_quota_bytes=cleaned["default_mailbox_quota_bytes"],
        )


class DomainChangeForm(ServiceForm):
    language = forms.ChoiceField(
        label=_("language"),
        choices=language_choices,
        help_text=Domain._meta.get_field("language").help_text,
    )

    class Meta:
        model = Domain
        fields = sorted(store.DOMAIN_SETTINGS)

    def apply(self, cleaned: dict) -> Domain:
        return services.update_domain(self.actor, self.instance.name, **self.edited(store.DOMAIN_SETTINGS))


@admin.register(Domain)
class DomainAdmin(ServiceAdmin):
    list_display = ["name", "active", "mailbox_count", "usage", "max_mailboxes"]
    list_filter = ["active"]
    search_fields = ["name"]
    fields = [
        "name",
        "active",
        "quota_bytes",
        "max_mailboxes",
        "default_mailbox_quota_bytes",
        "quota_warning_percents",
        "language",
        "max_aliases",
        "allow_outside_destinations",
        "used_bytes",
        "created_at",
    ]
    creation_fields = ["name", "quota_bytes", "max_mailboxes", "default_mailbox_quota_bytes"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Domain]:
        # An aggregate drops Meta.ordering: named again for pages (autocomplete) that page it.
        return super().get_queryset(request).annotate(mailbox_count=Count("mailboxes")).order_by("name")

    @admin.display(description=_("mailboxes"), ordering="mailbox_count")
    def mailbox_count(self, domain: Domain) -> int:
        return domain.mailbox_count

    @admin.display(description=_("usage"), ordering="used_bytes")
    def usage(self, domain: Domain) -> str:
        return _usage(domain.used_bytes, domain.quota_bytes)

    def get_fields(self, request: HttpRequest, obj: Domain | None = None) -> list[str]:
        return self.fields if obj is not None else self.creation_fields

    def get_readonly_fields(self, request: HttpRequest, obj: Domain | None = None) -> list[str]:
        if obj is None:
            return []
        editable = services.editable_domain_settings(actor_of(request))
        return [name for name in self.fields if name not in editable]

    def get_form(self, request: HttpRequest, obj: Domain | None = None, change: bool = False, **kwargs):
        kwargs["form"] = DomainChangeForm if obj is not None else DomainCreationForm
        return super().get_form(request, obj, change, **kwargs)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return super().has_add_permission(request) and services.may_manage_domains(actor_of(request))

    def has_delete_permission(self, request: HttpRequest, obj: Domain | None = None) -> bool:
        return super().has_delete_permission(request, obj) and services.may_manage_domains(actor_of(request))

    def get_deleted_objects(self, objs, request: HttpRequest):
        """Name why a domain is kept (its mailboxes) as the confirmation page's protected objects,
        so the page says so instead of offering a deletion the service would refuse."""
        domains = list(objs)
        refusals = [services.domain_deletion_refusal(actor_of(request), domain.name) for domain in domains]
        protected = [refusal for refusal in refusals if refusal is not None]
        model_count = {Domain._meta.verbose_name_plural: len(domains)}
        return [str(domain) for domain in domains], model_count, set(), protected

    def delete_model(self, request: HttpRequest, obj: Domain) -> None:
        try:
            services.delete_domain(actor_of(request), obj.name)
        except store.StoreError as error:
            self.refused(request, error)


# --- Mailboxes -------------------------------------------------------------------------------


class MailboxCreationForm(ServiceForm):
    address = forms.CharField(
        label=_("address"), help_text=_("The full address; it is also the POP3 login name.")
    )
    password = forms.CharField(label=_("password"), widget=forms.PasswordInput, strip=False)
    quota_bytes = SizeField(
        required=False,
        label=_("Quota"),
        help_text=format_lazy("{} {}", _("Blank = the domain's default quota; 0 = unlimited."), SIZE_HELP),
    )

    class Meta:
        model = Mailbox
        fields = ["quota_bytes", "quota_messages"]

    def clean_address(self) -> str:
        """The address's domain checked first, so that mistake is shown against the address."""
        try:
            address = normalise_address(self.cleaned_data["address"])
            services.get_domain(self.actor, domain_of(address))
        except (ValueError, store.StoreError) as error:
            raise ValidationError(str(error)) from None
        return address

    def apply(self, cleaned: dict) -> Mailbox:
        return services.create_mailbox(
            self.actor,
            cleaned["address"],
            password=cleaned["password"],
            quota_bytes=cleaned["quota_bytes"],
            quota_messages=cleaned["quota_messages"],
        ).mailbox


class MailboxChangeForm(ServiceForm):
    """Quotas only: the password and the active flag have pages and permissions of their own."""

    class Meta:
        model = Mailbox
        fields = sorted(MAILBOX_QUOTAS)

    def apply(self, cleaned: dict) -> Mailbox:
        return services.update_mailbox(self.actor, self.instance.address, **self.edited(MAILBOX_QUOTAS))


class PasswordResetForm(forms.Form):
    """A new password typed twice, set through ``services.set_password``."""

    password1 = forms.CharField(label=_("New password"), widget=forms.PasswordInput, strip=False)
    password2 = forms.CharField(
        label=_("New password (again)"),
        widget=forms.PasswordInput,
        strip=False,
        help_text=_("The mailbox's open POP3 sessions end when the password changes."),
    )

    def __init__(self, actor: Actor, mailbox: Mailbox, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.actor, self.mailbox = actor, mailbox

    def clean(self) -> dict:
        cleaned = super().clean()
        if self.errors:
            return cleaned
        require_same_passwords(cleaned["password1"], cleaned["password2"])
        try:
            services.set_password(self.actor, self.mailbox.address, cleaned["password1"])
        except store.StoreError as error:
            raise ValidationError(str(error)) from None
        return cleaned


class PasswordHashFilter(admin.SimpleListFilter):
    """Legacy (imported, e.g. from Dovecot) or current password hashes, counted by the facets:
    how far a migration has come, since each login replaces a legacy hash."""

    title = _("password hash")
    parameter_name = "password_hash"

    def lookups(self, request, model_admin):
        return [("legacy", _("legacy (replaced at the next login)")), ("current", _("argon2"))]

    def queryset(self, request, queryset):
        if self.value() == "legacy":
            return queryset.legacy_hash()
        if self.value() == "current":
            return queryset.current_hash()
        return queryset


class DomainNameFilter(admin.ListFilter):
    """Mailboxes of a domain typed by name. A list of every domain, as a related-field filter
    gives, took half the page's time to render at 1,000 domains (~55 of 120 ms)."""

    title = _("domain")
    parameter_name = "domain"
    template = "admin/mailadmin/domain_name_filter.html"

    def __init__(self, request: HttpRequest, params: dict, model, model_admin) -> None:
        super().__init__(request, params, model, model_admin)
        self.name = params.pop(self.parameter_name, [""])[-1].strip()
        self.domain = domain_or_404(request, self.name)
        if self.domain is not None:
            self.used_parameters[self.parameter_name] = self.name

    def has_output(self) -> bool:
        return True

    def expected_parameters(self) -> list[str]:
        return [self.parameter_name]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset if self.domain is None else queryset.filter(domain=self.domain)

    def choices(self, changelist):
        """One "choice": the form, with the list's other parameters kept as hidden fields."""
        kept = [(name, value) for name, value in changelist.params.items() if name != self.parameter_name]
        yield {"name": self.parameter_name, "value": self.name, "kept": kept}


@admin.register(Mailbox)
class MailboxAdmin(ServiceAdmin):
    list_display = ["address", "domain", "active", "usage", "used_messages", "last_login"]
    list_filter = ["active", DomainNameFilter, PasswordHashFilter]
    # Counts beside each filter choice: how many mailboxes still carry a legacy hash, among others.
    show_facets = admin.ShowFacets.ALWAYS
    search_fields = ["user__username"]
    list_select_related = ["user", "domain"]
    readonly_fields = [
        "address",
        "domain",
        "active",
        "used_bytes",
        "messages_link",
        "uid_validity",
        "last_login",
        "pop3_history",
        "created_at",
    ]
    fields = ["address", "domain", "active", "quota_bytes", "quota_messages", *readonly_fields[3:]]
    creation_fields = ["address", "password", "quota_bytes", "quota_messages"]
    actions = ["suspend", "resume"]
    change_form_template = "admin/mailadmin/mailbox/change_form.html"

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        """A whole address that is a mailbox finds just that mailbox, through the username index;
        anything else is the admin's substring search, a scan of every row (about 180 ms at
        100,000 mailboxes on PostgreSQL, bench ``console_pages``)."""
        try:
            address = normalise_address(search_term)
        except ValueError:
            address = None
        if address is not None:
            exact = queryset.filter(user__username=address)
            if exact.exists():
                return exact, False
        return super().get_search_results(request, queryset, search_term)

    @admin.display(description=_("address"), ordering="user__username")
    def address(self, mailbox: Mailbox) -> str:
        return mailbox.address

    @admin.display(description=_("usage"), ordering="used_bytes")
    def usage(self, mailbox: Mailbox) -> str:
        return _usage(mailbox.used_bytes, mailbox.quota_bytes)

    @admin.display(description=_("messages"))
    def messages_link(self, mailbox: Mailbox) -> str:
        url = reverse("admin:mailadmin_message_changelist") + f"?mailbox__id__exact={mailbox.pk}"
        count = mailbox.used_messages
        label = ngettext("%(count)d message", "%(count)d messages", count) % {"count": count}
        return format_html('<a href="{}">{}</a>', url, label)

    @admin.display(description=_("last POP3 login"), ordering="last_login_at")
    def last_login(self, mailbox: Mailbox) -> str:
        if mailbox.last_login_at is None:
            return _("never")
        when = formats.localize(timezone.localtime(mailbox.last_login_at))
        return _("%(when)s from %(client)s") % {"when": when, "client": mailbox.last_login_from}

    @admin.display(description=_("POP3 history"))
    def pop3_history(self, mailbox: Mailbox) -> str:
        link = f"{reverse('admin:history')}?{urlencode({'address': mailbox.address})}"
        return format_html('<a href="{}">{}</a>', link, _("sessions and failed logins"))

    def get_form(self, request: HttpRequest, obj: Mailbox | None = None, change: bool = False, **kwargs):
        kwargs["form"] = MailboxChangeForm if obj is not None else MailboxCreationForm
        return super().get_form(request, obj, change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: Mailbox | None = None) -> list[str]:
        return self.fields if obj is not None else self.creation_fields

    def get_readonly_fields(self, request: HttpRequest, obj: Mailbox | None = None) -> list[str]:
        return self.readonly_fields if obj is not None else []

    def get_deleted_objects(self, objs, request: HttpRequest):
        """Summarise each mailbox's mail instead of listing (and permission-checking) every message."""
        mailboxes = list(objs)
        summary = [
            gettext("%(mailbox)s: %(count)s messages, %(size)s")
            % {"mailbox": mailbox, "count": mailbox.used_messages, "size": format_size(mailbox.used_bytes)}
            for mailbox in mailboxes
        ]
        model_count = {
            Mailbox._meta.verbose_name_plural: len(mailboxes),
            Message._meta.verbose_name_plural: sum(m.used_messages for m in mailboxes),
        }
        return summary, model_count, set(), []

    def delete_model(self, request: HttpRequest, obj: Mailbox) -> None:
        try:
            services.delete_mailbox(actor_of(request), obj.address)
        except store.StoreError as error:
            self.refused(request, error)

    # Suspend and resume: changelist actions and buttons on the mailbox's page.

    def has_suspend_permission(self, request: HttpRequest, obj: Mailbox | None = None) -> bool:
        return services.may_suspend_mailboxes(actor_of(request))

    def has_password_permission(self, request: HttpRequest, obj: Mailbox | None = None) -> bool:
        return services.may_set_password(actor_of(request))

    @admin.action(
        description=_("Suspend the selected mailboxes (their sessions end)"), permissions=["suspend"]
    )
    def suspend(self, request: HttpRequest, queryset: QuerySet[Mailbox]) -> None:
        self._set_active(request, queryset, active=False)

    @admin.action(description=_("Resume the selected mailboxes"), permissions=["suspend"])
    def resume(self, request: HttpRequest, queryset: QuerySet[Mailbox]) -> None:
        self._set_active(request, queryset, active=True)

    def _set_active(self, request: HttpRequest, mailboxes, *, active: bool) -> None:
        changed = 0
        for mailbox in mailboxes:
            try:
                services.set_mailbox_active(actor_of(request), mailbox.address, active)
            except store.StoreError as error:
                self.refused(request, error)
                continue
            changed += 1
        if active:
            text = ngettext("%(count)d mailbox resumed.", "%(count)d mailboxes resumed.", changed)
        else:
            text = ngettext("%(count)d mailbox suspended.", "%(count)d mailboxes suspended.", changed)
        self.message_user(request, text % {"count": changed})

    def get_urls(self) -> list:
        wrap = self.admin_site.admin_view
        return [
            path("<path:object_id>/password/", wrap(self.password_view), name="mailadmin_mailbox_password"),
            path("<path:object_id>/suspend/", wrap(self.suspend_view), name="mailadmin_mailbox_suspend"),
            path("<path:object_id>/resume/", wrap(self.resume_view), name="mailadmin_mailbox_resume"),
            *super().get_urls(),
        ]

    def _permitted_mailbox(self, request: HttpRequest, object_id: str, allowed) -> Mailbox:
        """The mailbox (404 outside the user's scope), if ``allowed(request)``; else 403."""
        mailbox = self.get_object(request, unquote(object_id))
        if not allowed(request, mailbox):
            raise PermissionDenied
        return mailbox

    def password_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        mailbox = self._permitted_mailbox(request, object_id, self.has_password_permission)
        form = PasswordResetForm(actor_of(request), mailbox, request.POST or None)
        if request.method == "POST" and form.is_valid():
            self.message_user(
                request, gettext("Password of %(address)s reset.") % {"address": mailbox.address}
            )
            return HttpResponseRedirect(reverse("admin:mailadmin_mailbox_change", args=[mailbox.pk]))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": mailbox,
            "form": form,
            "title": gettext("Reset the password of %(address)s") % {"address": mailbox.address},
        }
        return TemplateResponse(request, "admin/mailadmin/mailbox/password.html", context)

    @method_decorator(require_POST)
    def suspend_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._active_view(request, object_id, active=False)

    @method_decorator(require_POST)
    def resume_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._active_view(request, object_id, active=True)

    def _active_view(self, request: HttpRequest, object_id: str, *, active: bool) -> HttpResponse:
        mailbox = self._permitted_mailbox(request, object_id, self.has_suspend_permission)
        self._set_active(request, [mailbox], active=active)
        return HttpResponseRedirect(reverse("admin:mailadmin_mailbox_change", args=[mailbox.pk]))

    def render_change_form(self, request: HttpRequest, context: dict, *args, obj=None, **kwargs):
        context.update(
            may_suspend=obj is not None and self.has_suspend_permission(request, obj),
            may_reset_password=obj is not None and self.has_password_permission(request, obj),
        )
        return super().render_change_form(request, context, *args, obj=obj, **kwargs)


# --- Aliases, catch-alls, alias domains ------------------------------------------------------


class DestinationsField(forms.CharField):
    """Destination addresses typed one per line (or separated by commas), shown one per line."""

    widget = forms.Textarea(attrs={"rows": 4})

    def to_python(self, value) -> list[str]:
        text = super().to_python(value) or ""
        return [part for part in re.split(r"[,\s]+", text) if part]

    def prepare_value(self, value):
        return "\n".join(value) if isinstance(value, list) else value


DESTINATIONS_HELP = _(
    "One address per line: mailboxes or aliases of this server, or outside addresses where the domain "
    "allows them."
)


def _destinations_field() -> DestinationsField:
    return DestinationsField(label=_("Destinations"), help_text=DESTINATIONS_HELP)


ALIAS_SETTINGS = frozenset({"destinations", "active"})


class AliasCreationForm(ServiceForm):
    source = forms.CharField(label=_("Address"), help_text=_("The alias's address, local@domain."))
    destinations = _destinations_field()

    class Meta:
        model = Alias
        fields = ["active"]

    def apply(self, cleaned: dict) -> Alias:
        return aliases.create_alias(
            self.actor, cleaned["source"], cleaned["destinations"], active=cleaned["active"]
        )


class AliasChangeForm(ServiceForm):
    destinations = _destinations_field()

    class Meta:
        model = Alias
        fields = ["active"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.initial["destinations"] = aliases.destinations_of(self.instance)

    def apply(self, cleaned: dict) -> Alias:
        return aliases.update_alias(self.actor, self.instance.source, **self.edited(ALIAS_SETTINGS))


class CatchAllCreationForm(ServiceForm):
    domain_name = forms.CharField(
        label=_("Domain"), help_text=_("The domain whose other addresses it receives.")
    )
    destinations = _destinations_field()

    class Meta:
        model = DomainCatchAll
        fields: list[str] = []

    def apply(self, cleaned: dict) -> Alias:
        return aliases.set_catch_all(self.actor, cleaned["domain_name"], cleaned["destinations"])


class AliasPagesAdmin(ServiceAdmin):
    """Aliases and catch-alls alike: edited through ``hosting.aliases``; counts from daily rows."""

    list_display = ["source", "domain", "active", "destination_list", "received_recently"]
    list_filter = ["active", ("domain", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["source", "destinations__address"]
    list_select_related = ["domain"]
    readonly_fields = ["source", "domain", "received_recently", "created_at"]
    fields = ["source", "domain", "active", "destinations", "received_recently", "created_at"]
    creation_form: type[ServiceForm]
    creation_fields: list[str]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Alias]:
        return aliases.with_recent_counts(super().get_queryset(request)).prefetch_related("destinations")

    @admin.display(description=_("destinations"))
    def destination_list(self, alias: Alias) -> str:
        return ", ".join(aliases.destinations_of(alias))

    @admin.display(description=_("received, last %(days)d days") % {"days": aliases.RECENT_DAYS})
    def received_recently(self, alias: Alias) -> int:
        return alias.received_recently

    def get_form(self, request: HttpRequest, obj: Alias | None = None, change: bool = False, **kwargs):
        kwargs["form"] = AliasChangeForm if obj is not None else self.creation_form
        return super().get_form(request, obj, change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: Alias | None = None) -> list[str]:
        return self.fields if obj is not None else self.creation_fields

    def get_readonly_fields(self, request: HttpRequest, obj: Alias | None = None) -> list[str]:
        return self.readonly_fields if obj is not None else []

    def delete_model(self, request: HttpRequest, obj: Alias) -> None:
        try:
            aliases.delete_alias(actor_of(request), obj.source)
        except store.StoreError as error:
            self.refused(request, error)

    def get_deleted_objects(self, objs, request: HttpRequest):
        """Only the aliases are named: their destinations and counters go with them."""
        rows = list(objs)
        return [str(alias) for alias in rows], {self.opts.verbose_name_plural: len(rows)}, set(), []


@admin.register(Alias)
class AliasAdmin(AliasPagesAdmin):
    creation_form = AliasCreationForm
    creation_fields = ["source", "destinations", "active"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Alias]:
        return super().get_queryset(request).addresses()


@admin.register(DomainCatchAll)
class DomainCatchAllAdmin(AliasPagesAdmin):
    creation_form = CatchAllCreationForm
    creation_fields = ["domain_name", "destinations"]


class AliasDomainForm(ServiceForm):
    class Meta:
        model = AliasDomain
        fields = ["name", "target"]

    def apply(self, cleaned: dict) -> AliasDomain:
        return aliases.create_alias_domain(self.actor, cleaned["name"], cleaned["target"].name)


@admin.register(AliasDomain)
class AliasDomainAdmin(ServiceAdmin):
    """Alias domains claim a domain name: operators of every domain add and delete them."""

    list_display = ["name", "target", "created_at"]
    search_fields = ["name", "target__name"]
    list_select_related = ["target"]
    form = AliasDomainForm

    def has_add_permission(self, request: HttpRequest) -> bool:
        return super().has_add_permission(request) and services.may_manage_domains(actor_of(request))

    def has_change_permission(self, request: HttpRequest, obj: AliasDomain | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AliasDomain | None = None) -> bool:
        return super().has_delete_permission(request, obj) and services.may_manage_domains(actor_of(request))

    def delete_model(self, request: HttpRequest, obj: AliasDomain) -> None:
        try:
            aliases.delete_alias_domain(actor_of(request), obj.name)
        except store.StoreError as error:
            self.refused(request, error)


# --- Read-only records -----------------------------------------------------------------------


class ReadOnlyAdmin(ScopedAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    """Metadata from the message rows; a body only for holders of ``view_message_body``, each
    reading audited (``services.read_message_body``) and capped, shown as escaped plain text.

    The list reads no chunk and, for a mailbox of 100,000 messages, one page of rows and one
    count: the total over every mailbox in scope is not counted again (``show_full_result_count``).
    """

    list_display = ["received_at", "size", "uidl", "from_header", "subject", "mailbox"]
    list_select_related = ["mailbox__user"]
    search_fields = ["mailbox__user__username", "uidl", "subject", "from_header"]
    show_full_result_count = False
    fields = [
        "mailbox",
        "uidl",
        "size_bytes",
        "received_at",
        "envelope_sender",
        "from_header",
        "subject",
    ]
    readonly_fields = fields

    @admin.display(description=_("size"), ordering="size_bytes")
    def size(self, message: Message) -> str:
        return format_size(message.size_bytes)

    change_form_template = "admin/mailadmin/message/change_form.html"

    def render_change_form(self, request: HttpRequest, context: dict, *args, obj=None, **kwargs):
        context["may_read_body"] = services.may_read_bodies(actor_of(request))
        return super().render_change_form(request, context, *args, obj=obj, **kwargs)

    def get_urls(self) -> list:
        body = self.admin_site.admin_view(self.body_view)
        return [path("<path:object_id>/body/", body, name="mailadmin_message_body"), *super().get_urls()]

    @method_decorator(require_POST)
    def body_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST only, with the CSRF token: another site must not make a reader's browser read
        (and so record a reading of) a message they never opened."""
        actor = actor_of(request)
        if not services.may_read_bodies(actor):
            raise PermissionDenied
        try:
            shown = services.read_message_body(actor, unquote(object_id), settings.MAILADMIN_ADMIN_BODY_BYTES)
        except services.MessageNotFound:
            raise Http404(f"no message with id {object_id!r} here") from None
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": shown.message,
            "shown": shown,
            "title": gettext("Message %(uidl)s") % {"uidl": shown.message.uidl},
        }
        return TemplateResponse(request, "admin/mailadmin/message/body.html", context)


class OpenSessionFilter(admin.SimpleListFilter):
    title = _("state")
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("open", _("open")), ("ended", _("ended"))]

    def queryset(self, request, queryset):
        if self.value() == "open":
            return queryset.open()
        if self.value() == "ended":
            return queryset.filter(ended_at__isnull=False)
        return queryset


@admin.register(Pop3Session)
class Pop3SessionAdmin(ReadOnlyAdmin):
    """Sessions are written by runpop3 only; an operator reads them and may kick open ones."""

    list_display = [
        "username",
        "peer_host",
        "node",
        "tls_version",
        "started_at",
        "authenticated_at",
        "ended_at",
        "end_reason",
        "retr_count",
        "deleted_count",
    ]
    list_filter = [OpenSessionFilter, "end_reason", "implicit_tls"]
    search_fields = ["username", "peer_host", "node"]
    actions = ["kick"]

    @admin.action(
        description=_("Kick the selected open sessions (no deletions applied)"), permissions=["kick"]
    )
    def kick(self, request: HttpRequest, queryset: QuerySet[Pop3Session]) -> None:
        session_ids = queryset.values_list("pk", flat=True)
        try:
            count = services.kick_sessions(actor_of(request), session_ids=session_ids)
        except store.StoreError as error:
            self.refused(request, error)
            return
        text = ngettext(
            "Kick requested for %(count)d session.", "Kick requested for %(count)d sessions.", count
        )
        self.message_user(request, text % {"count": count})

    def has_kick_permission(self, request: HttpRequest) -> bool:
        return services.may_kick(actor_of(request))


@admin.register(AuthFailure)
class AuthFailureAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "username", "peer_host", "mechanism", "reason"]
    list_filter = ["reason", "mechanism"]
    search_fields = ["username", "peer_host", "source"]


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = [
        "created_at",
        "actor_name",
        "client_address",
        "action",
        "object_type",
        "object_name",
        "domain_name",
        "changes",
    ]
    list_filter = ["action", "object_type", "actor_kind"]
    search_fields = ["object_name", "actor_name", "domain_name"]
    exclude = ["domain"]


# --- Domain administrators -------------------------------------------------------------------


class AdministratorForm(ServiceForm):
    """Username, domains and password of a domain administrator, saved by
    ``services.save_domain_administrator`` (which audits it)."""

    username = forms.CharField(label=_("username"), max_length=150)
    domains = forms.ModelMultipleChoiceField(
        label=_("domains"),
        queryset=Domain.objects.all(),
        widget=admin.widgets.FilteredSelectMultiple(_("domains"), False),
    )
    password1 = forms.CharField(label=_("password"), widget=forms.PasswordInput, strip=False, required=False)
    password2 = forms.CharField(
        label=_("password (again)"), widget=forms.PasswordInput, strip=False, required=False
    )

    class Meta:
        model = DomainAdministratorLogin
        fields: list[str] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            self.fields["username"].disabled = True
            self.fields["username"].initial = self.instance.username
            self.fields["domains"].initial = Domain.objects.filter(administrators__user=self.instance)
            self.fields["password1"].help_text = _("Blank = unchanged.")
        else:
            self.fields["password1"].required = self.fields["password2"].required = True

    def apply(self, cleaned: dict) -> DomainAdministratorLogin:
        require_same_passwords(cleaned["password1"], cleaned["password2"])
        saved = services.save_domain_administrator(
            self.actor,
            cleaned["username"],
            [domain.name for domain in cleaned["domains"]],
            cleaned["password1"] or None,
        )
        return DomainAdministratorLogin.objects.get(username=saved.username)


@admin.register(DomainAdministratorLogin)
class DomainAdministratorAdmin(AppliedByServices, MissingIsNotFound, admin.ModelAdmin):
    """Superusers make, change and delete domain administrators here, through the service layer."""

    form = AdministratorForm
    list_display = ["username", "administered", "is_active", "last_login"]
    search_fields = ["username"]
    fields = ["username", "domains", "password1", "password2"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return DomainAdministratorLogin.objects.administrators().prefetch_related(
            "administered_domains__domain"
        )

    @admin.display(description=_("domains"))
    def administered(self, user: DomainAdministratorLogin) -> str:
        return ", ".join(sorted(tie.domain.name for tie in user.administered_domains.all()))

    def _superuser(self, request: HttpRequest) -> bool:
        """Making administrators is for operators of every domain: superusers."""
        return services.may_manage_domains(actor_of(request))

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self._superuser(request)

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        return self._superuser(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return self._superuser(request)

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return self._superuser(request)

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return self._superuser(request)

    def get_deleted_objects(self, objs, request: HttpRequest):
        names = [str(user) for user in objs]
        return names, {DomainAdministratorLogin._meta.verbose_name_plural: len(names)}, set(), []

    def delete_model(self, request: HttpRequest, obj) -> None:
        try:
            services.delete_domain_administrator(actor_of(request), obj.username)
        except store.StoreError as error:
            self.refused(request, error)


# --- Logins ----------------------------------------------------------------------------------


class LoginUserAdmin(MissingIsNotFound, UserAdmin):
    """Operator logins only: neither mailbox logins nor domain administrators.

    A mailbox's login is its address, which never changes; its password and active flag are set on
    the mailbox's own pages, through the service layer. A domain administrator's domains and
    password are set on the domain administrators' pages or by ``createadmin`` (the service
    layer, audited). Leaving both out of this queryset keeps every user page (change, password,
    delete) from reaching them around it.
    """

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).filter(mailbox__isnull=True, administered_domains__isnull=True)


admin.site.unregister(get_user_model())
admin.site.register(get_user_model(), LoginUserAdmin)
