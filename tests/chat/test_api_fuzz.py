"""Property-based fuzzing of the /v1 API against its own OpenAPI schema (schemathesis): no
5xx, every response matches the schema, auth is never ignored. Valid and invalid requests are
generated for every operation, bounded to a few examples each so that it runs in about a
minute."""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.chat.api_helpers import key_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("chat_model")]

# More for a longer hunt: API_FUZZ_EXAMPLES=200 make test PYTEST_ARGS=tests/chat/test_api_fuzz.py
EXAMPLES_PER_OPERATION = int(os.environ.get("API_FUZZ_EXAMPLES", "12"))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_api_answers_every_generated_request_within_its_schema(
    live_asgi_server: str, mode: GenerationMode
) -> None:
    auth = {"Authorization": f"Bearer {key_for()}"}
    schema = schemathesis.openapi.from_url(f"{live_asgi_server}/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) == 8

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=live_asgi_server, headers=auth)

        fuzz()
