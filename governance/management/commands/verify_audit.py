from typing import Any

from django.core.management.base import BaseCommand, CommandError

from governance.audit import audit_verify


class Command(BaseCommand):
    help = (
        "Recompute the audit log's hash chain. Exits 1 and names the first event that was "
        "altered, or that follows a removed or reordered one; or if a committed event is not "
        "linked into the chain."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        result = audit_verify()
        if not result.intact:
            raise CommandError(
                f"audit chain broken at event {result.broken_event_id}: {result.problem} "
                f"({result.events} events before it are intact)"
            )
        if result.unlinked:
            # Run outside any transaction, every event seen here has been committed, and a
            # committed event is linked unless its trigger was bypassed.
            raise CommandError(
                f"{result.unlinked} committed audit event(s) are not linked into the chain "
                f"(its {result.events} linked events are intact)"
            )
        self.stdout.write(
            f"audit chain intact: {result.events} events; last hash {result.last_hash}"
        )
