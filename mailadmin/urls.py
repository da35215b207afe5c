from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from mailadmin.console.health import healthz
from mailadmin.console.metrics import metrics

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:index", permanent=False)),
    path("admin/", admin.site.urls),
    path("api/v1/", include("mailadmin.api.urls")),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics, name="metrics"),
]
