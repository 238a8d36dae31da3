import os
import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Create an administrator if none exists. The password comes from GENAI_ADMIN_PASSWORD, "
        "or is generated and printed once."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            return
        username = os.environ.get("GENAI_ADMIN_USERNAME", "admin")
        password = os.environ.get("GENAI_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        if os.environ.get("GENAI_ADMIN_PASSWORD"):
            self.stdout.write(
                f"Created administrator '{username}' (password from the environment)."
            )
        else:
            self.stdout.write(
                f"Created administrator '{username}' with password: {password}\n"
                "Log in at /accounts/login/ (the chat) or /admin/. Shown once; keep it."
            )
