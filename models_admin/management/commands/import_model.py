import json
from pathlib import Path
from typing import Any

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError, CommandParser

from models_admin.importing import ImportRefused, Lineage, model_import
from models_admin.models import ModelVersion


class Command(BaseCommand):
    help = (
        "Import a model from a GGUF file or a safetensors directory into the model store and "
        "register it as a version (its weights' sha256 recorded)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("source", help="a .gguf file or a directory of .safetensors weights")
        parser.add_argument("--name", required=True, help="model name, e.g. SmolLM2-135M")
        parser.add_argument("--model-version", dest="model_version", required=True)
        parser.add_argument("--alias", default=None, help="create this deployment if it is new")
        parser.add_argument("--stage", default=ModelVersion.Stage.DRAFT)
        parser.add_argument("--base-model", default="")
        parser.add_argument("--parent", default=None, help="parent version as NAME@VERSION")
        parser.add_argument("--training-data", default="")
        parser.add_argument("--training-params", default="{}", help="a JSON object")
        parser.add_argument("--registered-by", default=None, help="a username")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            params = json.loads(options["training_params"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--training-params is not JSON: {exc}") from exc
        if not isinstance(params, dict):
            raise CommandError("--training-params must be a JSON object.")
        parent = None
        if options["parent"]:
            name, _, version = options["parent"].rpartition("@")
            parent = ModelVersion.objects.filter(model__name=name, version=version).first()
            if parent is None:
                raise CommandError(f"No version {options['parent']} is registered.")
        user = None
        if options["registered_by"]:
            user = User.objects.filter(username=options["registered_by"]).first()
            if user is None:
                raise CommandError(f"No user {options['registered_by']}.")
        try:
            version = model_import(
                source=Path(options["source"]),
                model_name=options["name"],
                version=options["model_version"],
                alias=options["alias"],
                stage=options["stage"],
                lineage=Lineage(
                    base_model=options["base_model"],
                    parent=parent,
                    training_data=options["training_data"],
                    training_params=params,
                    registered_by=user,
                ),
            )
        except (ImportRefused, FileNotFoundError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"{version} registered ({version.stage}, sha256 {version.sha256[:12]}...)"
            + (f", alias {options['alias']}" if options["alias"] else "")
        )
