"""The circuit breaker's state lives in Redis: what one process records, another obeys."""

import random
import subprocess
import sys
import time
from pathlib import Path

from models_admin.breaker import (
    Pass,
    breaker_allow,
    breaker_record_failure,
    breaker_record_success,
    breaker_reset,
    breaker_state,
)

BASE_DIR = Path(__file__).resolve().parents[2]
# A process takes seconds to start on a loaded machine: the checks that it is still open pass a
# long cool-down (LONG), those that it has cooled down a short one (SHORT), after waiting SHORT.
SHORT, LONG = 2.0, 60.0


class Worker:
    """A separate Python process making breaker calls, as a worker process does."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def __call__(self, verb: str, version_id: int, cooldown_s: float = LONG) -> str:
        # Run as a module from the repository root, so that this checkout's code is imported.
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.models_admin.breaker_cli",
                verb,
                str(version_id),
                str(cooldown_s),
            ],
            env=self.env,
            cwd=BASE_DIR,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]


def test_the_breaker_opens_half_opens_and_closes_across_two_processes(
    subprocess_env: dict[str, str],
) -> None:
    version_id = random.randint(10**6, 10**7)  # a key of this test's own in the shared Redis
    breaker_reset(version_id=version_id)
    a, b = Worker(subprocess_env), Worker(subprocess_env)

    assert a("fail", version_id) == "closed"
    assert b("fail", version_id) == "closed"
    assert b("allow", version_id) == "allowed", "two failures of three keep it closed"
    assert a("fail", version_id) == "open", "the third failure, from either process, opens it"
    assert b("allow", version_id) == "refused", "the other process sees it open"
    assert breaker_state(version_id=version_id).state == "open"

    time.sleep(SHORT + 0.2)
    assert b("allow", version_id, SHORT) == "allowed", "after the cool-down one probe goes through"
    assert breaker_state(version_id=version_id).state == "half-open"
    assert a("allow", version_id) == "refused", "only one probe at a time"
    assert b("fail", version_id) == "open", "a failed probe opens it again"
    assert a("allow", version_id) == "refused"

    time.sleep(SHORT + 0.2)
    assert a("allow", version_id, SHORT) == "allowed"
    assert a("succeed", version_id) == "closed", "a successful probe closes it"
    assert b("allow", version_id) == "allowed"
    assert breaker_state(version_id=version_id).failures == 0
    breaker_reset(version_id=version_id)


def test_a_call_through_a_clean_breaker_has_no_success_to_record() -> None:
    version_id = random.randint(10**6, 10**7)
    breaker_reset(version_id=version_id)

    assert breaker_allow(version_id=version_id, cooldown_s=LONG) is Pass.CLEAN
    breaker_record_failure(version_id=version_id, threshold=3)
    allowed = breaker_allow(version_id=version_id, cooldown_s=LONG)
    assert allowed is Pass.ALLOWED, "a failure is counted: the next success must reset it"
    breaker_record_success(version_id=version_id)
    assert breaker_allow(version_id=version_id, cooldown_s=LONG) is Pass.CLEAN
    assert breaker_state(version_id=version_id).failures == 0
    breaker_reset(version_id=version_id)
