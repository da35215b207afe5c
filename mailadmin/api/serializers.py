"""What the API shows of each row, and the shape of what it accepts.

Input serializers check types only and name unknown fields; every rule about values (ranges,
passwords, hashes, scopes) is the service layer's, whose refusals come back against the field
they concern. Output serializers only read.
"""

from django.utils.translation import gettext as _
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from mailadmin.hosting import aliases
from mailadmin.models import Alias, AuditEntry, Domain, Mailbox, Pop3Session


class InputSerializer(serializers.Serializer):
    """Refuses fields it does not know, so a misspelt setting is never silently ignored."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: [_("Unknown field.")] for name in unknown})
        return super().to_internal_value(data)


class RowSerializer(serializers.Serializer):
    """An output serializer that reads a row through its declared fields, prepared once per class.

    A ``Serializer`` deep-copies and binds every declared field for each instance it makes:
    most of a mailbox ``GET``'s serializer time. Here each readable field's source path and its
    ``to_representation`` are taken once from the class's declared fields (read-only fields,
    each with a plain attribute ``source`` or a ``SerializerMethodField``), and a row is read
    through them; the answer is the one ``Serializer.to_representation`` gives for the same row.
    The declared fields still describe the schema.
    """

    @classmethod
    def _readers(cls) -> list[tuple[str, tuple[str, ...] | None, object]]:
        readers = cls.__dict__.get("_prepared_readers")
        if readers is None:
            readers = []
            for name, field in cls._declared_fields.items():
                if isinstance(field, serializers.SerializerMethodField):
                    readers.append((name, None, field.method_name or f"get_{name}"))
                else:
                    readers.append((name, tuple((field.source or name).split(".")), field.to_representation))
            cls._prepared_readers = readers
        return readers

    def to_representation(self, instance) -> dict:
        row = {}
        for name, path, show in self._readers():
            if path is None:
                row[name] = getattr(self, show)(instance)
                continue
            value = instance
            for attribute in path:
                value = getattr(value, attribute)
            row[name] = None if value is None else show(value)
        return row


DATETIME = serializers.DateTimeField()


# --- Mailboxes -------------------------------------------------------------------------------


class LastLoginSerializer(serializers.Serializer):
    time = serializers.DateTimeField()
    client_address = serializers.CharField()


class MailboxSerializer(RowSerializer):
    """A row serializer (not a ModelSerializer, which builds its fields again for every
    response): a mailbox is what the busiest clients read."""

    address = serializers.CharField(source="user.username", read_only=True)
    domain = serializers.CharField(source="domain.name", read_only=True)
    quota_bytes = serializers.IntegerField(read_only=True)
    quota_messages = serializers.IntegerField(read_only=True)
    used_bytes = serializers.IntegerField(read_only=True)
    used_messages = serializers.IntegerField(read_only=True)
    active = serializers.BooleanField(read_only=True)
    last_login = serializers.SerializerMethodField()
    created = serializers.DateTimeField(source="created_at", read_only=True)

    @extend_schema_field(LastLoginSerializer(allow_null=True))
    def get_last_login(self, mailbox: Mailbox) -> dict | None:
        if mailbox.last_login_at is None:
            return None
        return {
            "time": DATETIME.to_representation(mailbox.last_login_at),
            "client_address": mailbox.last_login_from,
        }


class MailboxInputSerializer(InputSerializer):
    password = serializers.CharField(write_only=True, required=False, trim_whitespace=False)
    password_hash = serializers.CharField(write_only=True, required=False, trim_whitespace=False)
    quota_bytes = serializers.IntegerField(required=False)
    quota_messages = serializers.IntegerField(required=False)
    active = serializers.BooleanField(required=False)


class ImportRowSerializer(serializers.Serializer):
    """One element of a JSON import (the schema's description; ``mailboxcsv`` checks them)."""

    address = serializers.CharField()
    password = serializers.CharField(required=False)
    password_hash = serializers.CharField(required=False)
    quota_bytes = serializers.IntegerField(required=False, allow_null=True)


class ImportResultSerializer(serializers.Serializer):
    dry_run = serializers.BooleanField()
    count = serializers.IntegerField()
    addresses = serializers.ListField(child=serializers.CharField())


class KickResultSerializer(serializers.Serializer):
    kicked = serializers.IntegerField()


# --- Domains ---------------------------------------------------------------------------------


class PercentsField(serializers.ListField):
    """Warning percentages as a list of numbers; stored as the model's ``"80,95"`` text."""

    child = serializers.IntegerField()

    def to_representation(self, text: str) -> list[int]:
        return [int(part) for part in text.split(",") if part.strip()]

    def to_internal_value(self, data) -> str:
        return ",".join(str(percent) for percent in super().to_internal_value(data))


class DomainSerializer(serializers.ModelSerializer):
    quota_warning_percents = PercentsField()
    mailbox_count = serializers.IntegerField()
    created = serializers.DateTimeField(source="created_at")

    class Meta:
        model = Domain
        fields = [
            "name",
            "active",
            "quota_bytes",
            "max_mailboxes",
            "default_mailbox_quota_bytes",
            "quota_warning_percents",
            "used_bytes",
            "mailbox_count",
            "created",
        ]
        read_only_fields = fields


class DomainInputSerializer(InputSerializer):
    active = serializers.BooleanField(required=False)
    quota_bytes = serializers.IntegerField(required=False)
    max_mailboxes = serializers.IntegerField(required=False)
    default_mailbox_quota_bytes = serializers.IntegerField(required=False)
    quota_warning_percents = PercentsField(required=False, allow_empty=True)


# --- Aliases ---------------------------------------------------------------------------------


class AliasSerializer(RowSerializer):
    """An alias or catch-all, from a row annotated by ``aliases.with_recent_counts`` with its
    destinations prefetched."""

    source = serializers.CharField(read_only=True, help_text="local@domain, or @domain for a catch-all.")
    domain = serializers.CharField(source="domain.name", read_only=True)
    destinations = serializers.SerializerMethodField()
    active = serializers.BooleanField(read_only=True)
    catch_all = serializers.BooleanField(source="is_catch_all", read_only=True)
    received_last_30_days = serializers.IntegerField(
        source="received_recently",
        read_only=True,
        help_text=f"Messages received in the last {aliases.RECENT_DAYS} days.",
    )
    created = serializers.DateTimeField(source="created_at", read_only=True)

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_destinations(self, alias: Alias) -> list[str]:
        return aliases.destinations_of(alias)


class AliasInputSerializer(InputSerializer):
    destinations = serializers.ListField(child=serializers.CharField(), allow_empty=True)
    active = serializers.BooleanField(required=False)


# --- Sessions and audit ----------------------------------------------------------------------


class SessionSerializer(serializers.ModelSerializer):
    mailbox = serializers.CharField(source="username")
    domain = serializers.CharField(source="domain.name", allow_null=True, default=None)
    client_address = serializers.CharField(source="peer_host")
    client_port = serializers.IntegerField(source="peer_port")
    server = serializers.CharField(source="node")
    started = serializers.DateTimeField(source="started_at")
    authenticated = serializers.DateTimeField(source="authenticated_at")
    ended = serializers.DateTimeField(source="ended_at")
    kick_requested = serializers.DateTimeField(source="kick_requested_at")

    class Meta:
        model = Pop3Session
        fields = [
            "id",
            "mailbox",
            "domain",
            "client_address",
            "client_port",
            "server",
            "implicit_tls",
            "tls_version",
            "started",
            "authenticated",
            "ended",
            "end_reason",
            "kick_requested",
            "retr_count",
            "retr_bytes",
            "deleted_count",
            "deleted_bytes",
            "bytes_in",
            "bytes_out",
        ]
        read_only_fields = fields


class AuditEntrySerializer(serializers.ModelSerializer):
    time = serializers.DateTimeField(source="created_at")
    actor = serializers.CharField(source="actor_name")
    object = serializers.CharField(source="object_name")
    domain = serializers.CharField(source="domain_name")

    class Meta:
        model = AuditEntry
        fields = [
            "id",
            "time",
            "actor_kind",
            "actor",
            "client_address",
            "action",
            "object_type",
            "object",
            "domain",
            "changes",
        ]
        read_only_fields = fields
