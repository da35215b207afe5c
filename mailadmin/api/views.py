"""The API's resources: each a viewset that parses, calls the service layer as the token's
actor, and renders. Scopes, rules and audit are the service layer's; lists are narrowed by
``scopes.visible_to``.

Adding a resource is one ``ResourceViewSet`` subclass with its serializers and
filter set, registered in ``urls.py``; its changes go through service functions of its own.
"""

import io

from django.conf import settings
from django.db.models import Count
from django.utils.translation import gettext as _
from drf_spectacular.utils import OpenApiParameter, OpenApiTypes, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.parsers import BaseParser, JSONParser
from rest_framework.request import Request
from rest_framework.response import Response

from mailadmin.api import errors, filters, serializers
from mailadmin.api.idempotency import HEADER as IDEMPOTENCY_HEADER
from mailadmin.api.idempotency import idempotent
from mailadmin.hosting import aliases, audit, mailboxcsv, scopes, services, store
from mailadmin.hosting.actors import Actor
from mailadmin.models import Alias, AuditEntry, Domain, Mailbox, Pop3Session

IDEMPOTENCY_PARAMETER = OpenApiParameter(
    IDEMPOTENCY_HEADER,
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description="Repeating a POST with the same key and body within 24 hours replays the first answer.",
)
DRY_RUN_PARAMETER = OpenApiParameter(
    "dry_run", OpenApiTypes.BOOL, description="Check every row, write nothing."
)
FORCE_PARAMETER = OpenApiParameter(
    "force",
    OpenApiTypes.BOOL,
    description="Also delete the domain's mailboxes with their mail, its aliases and alias domains.",
)


class CsvParser(BaseParser):
    """A ``text/csv`` body as text: the ``importmailboxes`` file."""

    media_type = "text/csv"

    def parse(self, stream, media_type=None, parser_context=None) -> str:
        try:
            return stream.read().decode("utf-8-sig")
        except UnicodeDecodeError:
            raise exceptions.ParseError(_("The CSV is not UTF-8 text.")) from None


def flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").strip().lower()
    if value not in filters.FLAGS:
        raise exceptions.ValidationError({name: [filters.NOT_A_FLAG]})
    return filters.FLAGS[value]


class BodyTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = _("The request body is larger than this server accepts.")
    default_code = "body_too_large"


class ResourceViewSet(viewsets.GenericViewSet):
    """A resource of the API: rows narrowed to the token's scope, changes as the token's actor."""

    def initial(self, request: Request, *args, **kwargs) -> None:
        """Refuse a body over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` before a parser reads it: DRF's
        parsers read the stream whole, around Django's own check of ``request.body``."""
        super().initial(request, *args, **kwargs)
        if int(request.META.get("CONTENT_LENGTH") or 0) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            raise BodyTooLarge()

    @property
    def actor(self) -> Actor:
        return self.request.user

    def get_queryset(self):
        return scopes.visible_to(self.actor, super().get_queryset())

    def input(self, serializer_class, partial: bool = False) -> dict:
        serializer = serializer_class(data=self.request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        return dict(serializer.validated_data)

    def render(self, row, status_code: int = status.HTTP_200_OK) -> Response:
        return Response(self.get_serializer(row).data, status=status_code)


ADDRESS = OpenApiParameter("address", OpenApiTypes.EMAIL, OpenApiParameter.PATH)


@extend_schema_view(
    retrieve=extend_schema(parameters=[ADDRESS]),
    update=extend_schema(
        parameters=[ADDRESS],
        request=serializers.MailboxInputSerializer,
        responses={200: serializers.MailboxSerializer, 201: serializers.MailboxSerializer},
        description="Create (201) or update (200) the mailbox; safe to repeat.",
    ),
    partial_update=extend_schema(parameters=[ADDRESS], request=serializers.MailboxInputSerializer),
    destroy=extend_schema(parameters=[ADDRESS], description="Delete the mailbox and all its mail."),
)
class MailboxViewSet(mixins.ListModelMixin, ResourceViewSet):
    queryset = Mailbox.objects.select_related("user", "domain").order_by("user__username")
    serializer_class = serializers.MailboxSerializer
    filterset_class = filters.MailboxFilter
    lookup_field = "address"
    lookup_value_regex = "[^/]+@[^/]+"

    def get_object(self) -> Mailbox:
        """The URL's mailbox in the token's scope (DRF's OPTIONS asks for it); the address is the
        login's username, not a field of the mailbox's own row."""
        try:
            return services.get_mailbox(self.actor, self.kwargs[self.lookup_field])
        except store.StoreError as error:  # as an API refusal, which OPTIONS expects
            raise errors.api_exception(error) from None

    def retrieve(self, request: Request, address: str) -> Response:
        return self.render(services.get_mailbox(self.actor, address))

    def update(self, request: Request, address: str) -> Response:
        saved = services.save_mailbox(self.actor, address, **self.input(serializers.MailboxInputSerializer))
        return self.render(saved.row, status.HTTP_201_CREATED if saved.created else status.HTTP_200_OK)

    def partial_update(self, request: Request, address: str) -> Response:
        changes = self.input(serializers.MailboxInputSerializer, partial=True)
        services.get_mailbox(self.actor, address)  # PATCH never creates
        return self.render(services.save_mailbox(self.actor, address, **changes).row)

    def destroy(self, request: Request, address: str) -> Response:
        services.delete_mailbox(self.actor, address)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        request=None,
        parameters=[ADDRESS, IDEMPOTENCY_PARAMETER],
        responses=serializers.KickResultSerializer,
        description="End the mailbox's open POP3 sessions without applying their deletions.",
    )
    @action(detail=True, methods=["post"])
    @idempotent
    def kick(self, request: Request, address: str) -> Response:
        return Response({"kicked": services.kick_sessions(self.actor, address=address)})

    @extend_schema(
        request={
            "text/csv": OpenApiTypes.STR,
            "application/json": serializers.ImportRowSerializer(many=True),
        },
        parameters=[DRY_RUN_PARAMETER, IDEMPOTENCY_PARAMETER],
        responses={200: serializers.ImportResultSerializer, 201: serializers.ImportResultSerializer},
        description=(
            "Create every mailbox of an importmailboxes CSV (text/csv) or a JSON list, or none: "
            "an error names its row (the CSV line, or the position in the list from 1)."
        ),
    )
    @action(detail=False, methods=["post"], url_path="import", parser_classes=[CsvParser, JSONParser])
    @idempotent
    def import_mailboxes(self, request: Request) -> Response:
        dry_run = flag(request, "dry_run")
        if isinstance(request.data, str):
            created = services.import_mailboxes(self.actor, io.StringIO(request.data), dry_run=dry_run)
        else:
            rows = mailboxcsv.from_records(request.data)
            created = services.import_mailbox_rows(self.actor, rows, dry_run=dry_run)
        result = {"dry_run": dry_run, "count": len(created), "addresses": [row.address for row in created]}
        return Response(result, status=status.HTTP_200_OK if dry_run else status.HTTP_201_CREATED)


NAME = OpenApiParameter("name", OpenApiTypes.STR, OpenApiParameter.PATH)


@extend_schema_view(
    retrieve=extend_schema(parameters=[NAME]),
    update=extend_schema(
        parameters=[NAME],
        request=serializers.DomainInputSerializer,
        responses={200: serializers.DomainSerializer, 201: serializers.DomainSerializer},
        description="Create (201) or update (200) the domain; safe to repeat.",
    ),
    partial_update=extend_schema(parameters=[NAME], request=serializers.DomainInputSerializer),
    destroy=extend_schema(parameters=[NAME, FORCE_PARAMETER]),
)
class DomainViewSet(mixins.ListModelMixin, ResourceViewSet):
    queryset = Domain.objects.annotate(mailbox_count=Count("mailboxes")).order_by("name")
    serializer_class = serializers.DomainSerializer
    filterset_class = filters.DomainFilter
    lookup_field = "name"
    lookup_value_regex = "[^/]+"

    def retrieve(self, request: Request, name: str) -> Response:
        return self.render(self._counted(services.get_domain(self.actor, name)))

    def update(self, request: Request, name: str) -> Response:
        saved = services.save_domain(self.actor, name, **self.input(serializers.DomainInputSerializer))
        code = status.HTTP_201_CREATED if saved.created else status.HTTP_200_OK
        return self.render(self._counted(saved.row), code)

    def partial_update(self, request: Request, name: str) -> Response:
        changes = self.input(serializers.DomainInputSerializer, partial=True)
        return self.render(self._counted(services.update_domain(self.actor, name, **changes)))

    def destroy(self, request: Request, name: str) -> Response:
        services.delete_domain(self.actor, name, force=flag(request, "force"))
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _counted(self, domain: Domain) -> Domain:
        return self.get_queryset().get(pk=domain.pk)


SOURCE = OpenApiParameter(
    "source", OpenApiTypes.STR, OpenApiParameter.PATH, description="local@domain, or @domain for a catch-all."
)


@extend_schema_view(
    retrieve=extend_schema(parameters=[SOURCE]),
    update=extend_schema(
        parameters=[SOURCE],
        request=serializers.AliasInputSerializer,
        responses={200: serializers.AliasSerializer, 201: serializers.AliasSerializer},
        description="Create (201) or update (200) the alias or catch-all; safe to repeat.",
    ),
    partial_update=extend_schema(parameters=[SOURCE], request=serializers.AliasInputSerializer),
    destroy=extend_schema(parameters=[SOURCE]),
)
class AliasViewSet(mixins.ListModelMixin, ResourceViewSet):
    queryset = Alias.objects.select_related("domain").order_by("domain__name", "source")
    serializer_class = serializers.AliasSerializer
    filterset_class = filters.AliasFilter
    lookup_field = "source"
    lookup_value_regex = "[^/]*@[^/]+"

    def get_queryset(self):
        # Counted per request: the 30 days end today.
        return aliases.with_recent_counts(super().get_queryset()).prefetch_related("destinations")

    def retrieve(self, request: Request, source: str) -> Response:
        return self.render(self._counted(aliases.get_alias(self.actor, source)))

    def update(self, request: Request, source: str) -> Response:
        saved = aliases.save_alias(self.actor, source, **self.input(serializers.AliasInputSerializer))
        code = status.HTTP_201_CREATED if saved.created else status.HTTP_200_OK
        return self.render(self._counted(saved.row), code)

    def partial_update(self, request: Request, source: str) -> Response:
        changes = self.input(serializers.AliasInputSerializer, partial=True)
        return self.render(self._counted(aliases.update_alias(self.actor, source, **changes)))

    def destroy(self, request: Request, source: str) -> Response:
        aliases.delete_alias(self.actor, source)
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _counted(self, alias: Alias) -> Alias:
        return self.get_queryset().get(pk=alias.pk)


@extend_schema_view(list=extend_schema(description="Open and recent POP3 sessions, newest first."))
class SessionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ResourceViewSet):
    queryset = Pop3Session.objects.select_related("domain").order_by("-started_at", "id")
    serializer_class = serializers.SessionSerializer
    filterset_class = filters.SessionFilter

    @extend_schema(
        request=None,
        parameters=[IDEMPOTENCY_PARAMETER],
        responses=serializers.KickResultSerializer,
        description="End the session, if open, without applying its deletions.",
    )
    @action(detail=True, methods=["post"])
    @idempotent
    def kick(self, request: Request, pk: str) -> Response:
        session = self.get_object()
        return Response({"kicked": services.kick_sessions(self.actor, session_ids=[session.pk])})


@extend_schema_view(list=extend_schema(description="The audit log, oldest first."))
class AuditViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ResourceViewSet):
    queryset = AuditEntry.objects.all()
    serializer_class = serializers.AuditEntrySerializer
    filterset_class = filters.AuditFilter

    def get_queryset(self):
        return audit.entries(self.actor)
