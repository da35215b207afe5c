"""``/api/v1/``: the resources, the OpenAPI schema and its documentation page."""

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from mailadmin.api import views

router = DefaultRouter(trailing_slash="/?")
router.register("mailboxes", views.MailboxViewSet, basename="mailbox")
router.register("domains", views.DomainViewSet, basename="domain")
router.register("sessions", views.SessionViewSet, basename="session")
router.register("audit", views.AuditViewSet, basename="audit")

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularRedocView.as_view(url_name="api-schema"), name="api-docs"),
    path("docs/swagger/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-swagger"),
    path("", include(router.urls)),
]
