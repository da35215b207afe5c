"""Django admin for domains, mailboxes and (read-only) messages.

Counters are shown, never edited here: only ``mailadmin.hosting.store`` moves them. Deleting a
mailbox goes through the store so the domain's usage drops with it.
"""

from django import forms
from django.contrib import admin
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils import timezone

from mailadmin.addresses import domain_of, normalise_address
from mailadmin.hosting import store
from mailadmin.models import AuthFailure, Domain, Mailbox, Message, Pop3Session
from mailadmin.units import format_size


def _usage(used_bytes: int, quota_bytes: int) -> str:
    if not quota_bytes:
        return f"{format_size(used_bytes)} (unlimited)"
    return f"{format_size(used_bytes)} of {format_size(quota_bytes)} ({100 * used_bytes / quota_bytes:.0f}%)"


@admin.register(Domain)
class DomainAdmin(admin.ModelAdmin):
    list_display = ["name", "active", "mailbox_count", "usage", "max_mailboxes"]
    list_filter = ["active"]
    search_fields = ["name"]
    readonly_fields = ["used_bytes", "created_at"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Domain]:
        return super().get_queryset(request).annotate(mailbox_count=Count("mailboxes"))

    @admin.display(description="mailboxes", ordering="mailbox_count")
    def mailbox_count(self, domain: Domain) -> int:
        return domain.mailbox_count

    @admin.display(description="usage", ordering="used_bytes")
    def usage(self, domain: Domain) -> str:
        return _usage(domain.used_bytes, domain.quota_bytes)

    def has_delete_permission(self, request: HttpRequest, obj: Domain | None = None) -> bool:
        # Mailboxes protect their domain; delete them first, through the mailbox admin.
        return super().has_delete_permission(request, obj) and (obj is None or not obj.mailboxes.exists())


class MailboxCreationForm(forms.ModelForm):
    address = forms.CharField(help_text="The full address; it is also the POP3 login name.")
    password = forms.CharField(widget=forms.PasswordInput, strip=False)

    class Meta:
        model = Mailbox
        fields = ["quota_bytes", "quota_messages"]

    def clean_address(self) -> str:
        try:
            address = normalise_address(self.cleaned_data["address"])
            store.get_domain(domain_of(address))
        except (ValueError, store.StoreError) as error:
            raise forms.ValidationError(str(error)) from None
        return address


@admin.register(Mailbox)
class MailboxAdmin(admin.ModelAdmin):
    list_display = ["address", "domain", "active", "usage", "used_messages"]
    list_filter = ["active", "domain"]
    search_fields = ["user__username"]
    list_select_related = ["user", "domain"]
    readonly_fields = ["address", "domain", "used_bytes", "used_messages", "uid_validity", "created_at"]
    fields = ["address", "domain", "active", "quota_bytes", "quota_messages", *readonly_fields[2:]]
    creation_fields = ["address", "password", "quota_bytes", "quota_messages"]

    @admin.display(description="address", ordering="user__username")
    def address(self, mailbox: Mailbox) -> str:
        return mailbox.address

    @admin.display(description="usage", ordering="used_bytes")
    def usage(self, mailbox: Mailbox) -> str:
        return _usage(mailbox.used_bytes, mailbox.quota_bytes)

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = MailboxCreationForm
            kwargs["fields"] = self.creation_fields
        return super().get_form(request, obj, change, **kwargs)

    def get_fields(self, request, obj=None):
        return self.fields if obj is not None else self.creation_fields

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj is not None else []

    def save_model(self, request, obj: Mailbox, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        try:
            created = store.create_mailbox(
                form.cleaned_data["address"],
                password=form.cleaned_data["password"],
                quota_bytes=form.cleaned_data["quota_bytes"],
                quota_messages=form.cleaned_data["quota_messages"],
            )
        except store.StoreError as error:
            # The form checked the domain; what is left is a race (the limit, a duplicate).
            raise forms.ValidationError(str(error)) from None
        obj.pk, obj.user, obj.domain = created.mailbox.pk, created.mailbox.user, created.mailbox.domain
        obj._state.adding = False

    def get_deleted_objects(self, objs, request: HttpRequest):
        """Summarise each mailbox's mail instead of listing (and permission-checking) every message."""
        mailboxes = list(objs)
        summary = [
            f"{mailbox}: {mailbox.used_messages} messages, {format_size(mailbox.used_bytes)}"
            for mailbox in mailboxes
        ]
        model_count = {"mailboxes": len(mailboxes), "messages": sum(m.used_messages for m in mailboxes)}
        return summary, model_count, set(), []

    def delete_model(self, request: HttpRequest, obj: Mailbox) -> None:
        store.delete_mailbox(obj.address)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Mailbox]) -> None:
        for mailbox in queryset.select_related("user"):
            store.delete_mailbox(mailbox.address)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    """Metadata only: an operator never needs, and should not casually see, message bodies."""

    list_display = ["mailbox", "uidl", "size_bytes", "from_header", "subject", "received_at"]
    list_select_related = ["mailbox__user"]
    search_fields = ["mailbox__user__username", "uidl", "subject", "from_header"]
    fields = ["mailbox", "uidl", "size_bytes", "received_at", "envelope_sender", "from_header", "subject"]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        return False


class OpenSessionFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("open", "open"), ("ended", "ended")]

    def queryset(self, request, queryset):
        if self.value() == "open":
            return queryset.open()
        if self.value() == "ended":
            return queryset.filter(ended_at__isnull=False)
        return queryset


@admin.register(Pop3Session)
class Pop3SessionAdmin(admin.ModelAdmin):
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

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Pop3Session | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Pop3Session | None = None) -> bool:
        return False

    @admin.action(description="Kick the selected open sessions (no deletions applied)")
    def kick(self, request: HttpRequest, queryset: QuerySet[Pop3Session]) -> None:
        count = (
            queryset.open().filter(kick_requested_at__isnull=True).update(kick_requested_at=timezone.now())
        )
        self.message_user(request, f"Kick requested for {count} session{'s' if count != 1 else ''}.")

    def get_actions(self, request: HttpRequest):
        # Kicking is an operation on sessions, allowed to whoever may view them.
        actions = super().get_actions(request)
        if not self.has_view_permission(request):
            actions.pop("kick", None)
        return actions


@admin.register(AuthFailure)
class AuthFailureAdmin(admin.ModelAdmin):
    list_display = ["created_at", "username", "peer_host", "mechanism", "reason"]
    list_filter = ["reason", "mechanism"]
    search_fields = ["username", "peer_host", "source"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuthFailure | None = None) -> bool:
        return False
