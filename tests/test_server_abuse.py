"""The real server under abuse (issue 23, docs/reliability.md): Schemathesis drives every route
of the OpenAPI document the server serves (valid and invalid bodies, with and without the API
key), and a storm of streams half of whose clients hang up mid-stream.

Every response must be documented and match its schema, never a 5xx, never a traceback; after
the storm every slot is free, the server answers, and its memory is near where it started.
"""

from __future__ import annotations

import sys
import time

import httpx
import pytest
import schemathesis
from conftest import ROOT
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from servers import http_client, serving

sys.path.insert(0, str(ROOT))
from benchmarks.disconnect_storm import rss_mb, storm  # noqa: E402

KEY = "abuse-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPEN = {"/health"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--api-key", KEY, "--max-tokens-limit", "8", "--max-prompt-tokens", "256"]
    args += ["--max-concurrent", "8"]
    with serving(args, tmp_path_factory.mktemp("srv") / "log", model="demo", clean=False) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    doc = httpx.get(server.url + "/openapi.json", headers=AUTH, timeout=30).json()
    return schemathesis.openapi.from_dict(doc)


schema = schemathesis.pytest.from_fixture("api_schema")


def test_openapi_document_lists_every_route(server):
    doc = httpx.get(server.url + "/openapi.json", headers=AUTH, timeout=30).json()
    for path in (
        "/health",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/states",
        "/v1/states/{state_id}",
    ):
        assert path in doc["paths"], sorted(doc["paths"])
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["properties"]["max_tokens"]["maximum"] == 8
    assert httpx.get(server.url + "/openapi.json", timeout=30).status_code == 401


@schema.parametrize()
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_route_conforms(case, server):
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    r = case.call(base_url=server.url, headers=AUTH, timeout=60)
    case.validate_response(r, checks=checks)
    assert "Traceback" not in r.text and 'File "' not in r.text
    bare = case.call(base_url=server.url, headers={"Authorization": "Bearer wrong"}, timeout=60)
    if case.path in OPEN:
        assert bare.status_code < 500
    else:
        assert bare.status_code == 401, bare.text
        assert bare.json()["error"]["code"] == "invalid_api_key"


# -- a storm of streams, half the clients hanging up -----------------------------------------------


def test_disconnect_storm_frees_every_slot(tmp_path):
    args = ["--max-tokens-limit", "100000", "--max-concurrent", "32"]
    with serving(args, tmp_path / "log", model="demo", clean=False) as s:
        with http_client(s) as http:
            for _ in range(3):  # warm: the kernels, the prefix cache's first states
                assert (
                    http.post(
                        "/v1/completions", json={"prompt": "Warm up", "max_tokens": 16}
                    ).status_code
                    == 200
                )
            base = rss_mb(s.proc.pid)
            out = storm(s.url, 16)
            assert not out["errors"], out["errors"]
            assert len(out["done"]) == 8 and all(
                last == "data: [DONE]" for _, _, last in out["done"]
            ), out["done"]
            deadline = time.monotonic() + 10
            while http.get("/v1/stats").json()["slots_used"]:
                assert time.monotonic() < deadline, http.get("/v1/stats").json()
                time.sleep(0.05)
            r = http.post("/v1/completions", json={"prompt": "Still there?", "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            grown = rss_mb(s.proc.pid) - base
            assert grown < 150, f"RSS grew {grown:.0f} MB over the storm (from {base:.0f} MB)"
