"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis): generated requests,
valid and invalid, against the app in-process over the tiny model. No response may be
a 5xx or break the schema the app publishes (status codes, content types, bodies,
headers), and invalid requests must be refused. Not checked: that every schema-valid
request is accepted, since some fields constrain each other as OpenAI's do
(`top_logprobs` needs `logprobs`), which the schema cannot say."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
import zse
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from zse.server import ServerConfig, create_app


@pytest.fixture(scope="module")
def short_engine(qwen_tiny: Path) -> Iterator[zse.Engine]:
    # A short context bounds every generated request's work.
    e = zse.Engine(qwen_tiny, context_length=64, kv_cache_dtype="f32")
    yield e
    e.close()


@pytest.fixture(scope="module")
def api(short_engine: zse.Engine) -> schemathesis.BaseSchema:
    app = create_app(short_engine, ServerConfig(model_name="tiny"))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


#: Generated requests per operation (valid and invalid ones).
EXAMPLES = 300


def test_generated_requests_get_no_5xx_and_match_the_schema(api: schemathesis.BaseSchema) -> None:
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 6
    sent: dict[str, int] = {}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            sent[case.operation.label] = sent.get(case.operation.label, 0) + 1
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        run()
    print("generated requests per operation:", sent)
    # The request-taking routes get hundreds (simple ones run out of distinct cases).
    assert sent["POST /v1/chat/completions"] >= 200 and sent["POST /v1/completions"] >= 200
