"""``/api/v1/``: the resources, the OpenAPI schema and its documentation page."""

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from mailadmin.api import views


class Router(DefaultRouter):
    """Paths with or without a final slash (``mailboxes/<address>`` as documented, and
    ``mailboxes/``), and no ``.json`` format suffixes: addresses and domain names have dots."""

    include_format_suffixes = False

    def __init__(self) -> None:
        super().__init__()
        self.trailing_slash = "/?"


router = Router()
router.register("mailboxes", views.MailboxViewSet, basename="mailbox")
router.register("domains", views.DomainViewSet, basename="domain")
router.register("aliases", views.AliasViewSet, basename="alias")
router.register("sessions", views.SessionViewSet, basename="session")
router.register("audit", views.AuditViewSet, basename="audit")

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularRedocView.as_view(url_name="api-schema"), name="api-docs"),
    path("docs/swagger/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-swagger"),
    path("", include(router.urls)),
]
