"""Kept apart from `admin_site` so that settings can name it before any model is loaded."""

from django.contrib.admin.apps import AdminConfig


class AuditedAdminConfig(AdminConfig):
    default_site = "governance.admin_site.AuditedAdminSite"
