"""Events the registry announces to the apps above it (governance writes them to the audit log).

Sent inside the transaction of the change, so the audit event commits or rolls back with it.
"""

from django.dispatch import Signal

# kwargs: actor (User | None), action (str), target_type (str), target_id (object), details (dict)
registry_changed = Signal()
