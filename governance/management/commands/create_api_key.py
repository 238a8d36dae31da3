import datetime as dt

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from governance.api_keys import api_key_create
from governance.models import ApiKey


class Command(BaseCommand):
    help = "Create an API key for a user and print it (it is shown only this once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", required=True, help="username of the key's owner")
        parser.add_argument("--name", required=True)
        parser.add_argument(
            "--scopes",
            default=",".join(ApiKey.Scope.values),
            help="comma-separated; default: all of " + ", ".join(ApiKey.Scope.values),
        )
        parser.add_argument("--expires-in-days", type=int, default=None)

    def handle(self, *args: object, **options: object) -> None:
        try:
            user = User.objects.get(username=options["user"])
        except User.DoesNotExist as exc:
            raise CommandError(f"No user named {options['user']!r}.") from exc
        days = options["expires_in_days"]
        expires_at = timezone.now() + dt.timedelta(days=days) if isinstance(days, int) else None
        try:
            _, raw = api_key_create(
                user=user,
                name=str(options["name"]),
                scopes=[s.strip() for s in str(options["scopes"]).split(",") if s.strip()],
                expires_at=expires_at,
                actor=None,
            )
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from exc
        self.stdout.write(raw)
