import datetime as dt
from typing import Any

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.datasets import DatasetFilters, dataset_export


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise CommandError(f"Not a date (YYYY-MM-DD): {value!r}") from None


class Command(BaseCommand):
    help = (
        "Write approved and edited answers, and answers with feedback, as JSON lines in chat "
        "format with lineage. The export is recorded in the audit log."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--output", "-o", help="File to write (default: standard output)")
        parser.add_argument("--since", type=_date, help="Answers from this date (YYYY-MM-DD)")
        parser.add_argument("--until", type=_date, help="Answers up to this date, inclusive")
        parser.add_argument("--model", help="Only answers of this model (registry name)")
        parser.add_argument("--knowledge-base", type=int, help="Only answers citing this KB id")
        parser.add_argument("--actor", help="Username recorded as the exporter in the audit log")

    def handle(self, *args: Any, **options: Any) -> None:
        actor = None
        if options["actor"]:
            actor = User.objects.filter(username=options["actor"]).first()
            if actor is None:
                raise CommandError(f"No user named {options['actor']!r}")
        filters = DatasetFilters(
            since=options["since"],
            until=options["until"],
            model_name=options["model"],
            knowledge_base_id=options["knowledge_base"],
        )
        if options["output"]:
            with open(options["output"], "w", encoding="utf-8") as out:
                count = dataset_export(out=out, filters=filters, actor=actor)
        else:
            count = dataset_export(out=self.stdout, filters=filters, actor=actor)
        self.stderr.write(f"{count} exchange(s) exported.")
