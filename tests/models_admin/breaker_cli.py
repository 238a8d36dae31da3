"""One circuit-breaker call from a process of its own, as a second worker would make it.

python tests/models_admin/breaker_cli.py allow|fail|succeed VERSION_ID
"""

import os
import sys

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genai_site.settings")
django.setup()

from models_admin.breaker import (  # noqa: E402
    breaker_allow,
    breaker_record_failure,
    breaker_record_success,
    breaker_state,
)

THRESHOLD = 3

if __name__ == "__main__":
    verb, version_id = sys.argv[1], int(sys.argv[2])
    cooldown_s = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    if verb == "allow":
        print(
            "allowed" if breaker_allow(version_id=version_id, cooldown_s=cooldown_s) else "refused"
        )
    elif verb == "fail":
        print(breaker_record_failure(version_id=version_id, threshold=THRESHOLD))
    elif verb == "succeed":
        breaker_record_success(version_id=version_id)
        print(breaker_state(version_id=version_id).state)
    else:
        sys.exit(f"unknown verb {verb}")
