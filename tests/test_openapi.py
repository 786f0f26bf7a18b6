"""docs/openapi.yaml against a running server: schemathesis generates requests from the
document and checks every answer (status documented, content type, body schema,
required headers, the bearer token enforced, no server error).

One real server process per database (with an API token) serves every generated case;
client 1 exists, so the document's examples reach the 201 and 200 answers too.
Hypothesis is held to a few examples per operation and no coverage phase, so
the whole module runs in a few seconds.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from messaging_server.server.http.api import ROUTES
from tests.conftest import fresh_mysql_url
from tests.helpers import ServerProcess

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
TOKEN = "openapi-test-token"
MAX_EXAMPLES = 8

# Examples and fuzzing, valid and invalid data; no coverage phase (hundreds of
# cases per operation) and no stateful phase (the API has no links to follow).
CONFIG = SchemathesisConfig.from_str("""
[generation]
mode = "all"

[phases.coverage]
enabled = false

[phases.stateful]
enabled = false

# The document states the body limit in bytes (4096 of UTF-8), which JSON Schema
# cannot: a valid-looking body may still get 413.  Invalid data may get 411/413 too.
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "413", "429"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "411", "413", "415", "422", "429"]
""")

schema = schemathesis.openapi.from_path(SCHEMA_PATH, config=CONFIG)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def api_server(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with contextlib.ExitStack() as stack:
        if request.param == "mysql":
            request.getfixturevalue("mysql_available")
            urls = fresh_mysql_url()
            url = next(urls)
            stack.callback(lambda: next(urls, None))  # drops the database
        else:
            url = f"sqlite:///{tmp_path_factory.mktemp('openapi') / 'niki.sqlite3'}"
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for name in [n for n in os.environ if n.startswith("NIKI_") and not n.startswith("NIKI_TEST_")]:
            patch.delenv(name)  # no NIKI_* setting of the caller leaks in
        server = stack.enter_context(ServerProcess(url, "--api-token", TOKEN,
                                                   "--advertise-host", "127.0.0.1"))
        with server.connect() as raw:
            assert raw.handshake().startswith("1.")  # client 1, for the examples
        yield server


# A WebSocket upgrade is not something an HTTP fuzzer can make: tests/test_websocket_e2e.py
# covers /v1/ws, with a real WebSocket client.
@schema.exclude(path="/v1/ws").parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_server_conforms_to_the_document(case: schemathesis.Case, api_server: ServerProcess) -> None:
    case.call_and_validate(base_url=f"http://127.0.0.1:{api_server.http_port}",
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)


def _as_regex(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "([^/]+)", path)


def test_every_route_is_documented_and_every_documented_path_served() -> None:
    documented = {(_as_regex(path), method.upper()) for path, item in schema.raw_schema["paths"].items()
                  for method in item}
    served = {(route.pattern.pattern, method) for route in ROUTES for method in route.methods}
    assert documented == served
