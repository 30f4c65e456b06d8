"""Fail closed (issue 17, items 1 and 2): one route table that routing and the guard both read. The real CLI
gateway with auth on; requests are written on raw sockets, so that `//x`, `/./`, `;x` and absolute-form
targets reach the server exactly as a hostile caller sends them (HTTP clients would tidy them up)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from backends.managed.process import LlamaCppProcess
from gateway.api.routes import TABLE, Entry, Route, RouteTable
from gateway.auth.guard import Access
from gateway.auth.keys import digest, new_key
from tests.helpers import CliGateway, cli_gateway, llamacpp_backend, settings_for

USER, ADMIN = new_key(), new_key()


@pytest.fixture(scope="module")
def gw(primary: LlamaCppProcess) -> Iterator[CliGateway]:
    settings = settings_for([llamacpp_backend("a", primary.url)])
    settings["auth"] = {
        "enabled": True,
        "protect_views": True,  # views need a key; /metrics stays open (protect_metrics off)
        "keys": [{"name": "user", "hash": digest(USER)}, {"name": "ops", "hash": digest(ADMIN), "admin": True}],
    }
    with cli_gateway(settings) as gateway:
        yield gateway


def raw(url: str, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"") -> int:
    """Send one request with the target exactly as given; the status code of the answer."""
    host, port = url.removeprefix("http://").split(":")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def concrete(route: Route) -> str:
    return route.path.replace("{model_id:str}", "minilm")


def variants(path: str, url: str) -> list[str]:
    """Spellings of one route that a normalising router treats as the route itself."""
    inner = path.replace("/", "//", 2) if path.count("/") > 1 else path + "/"
    letter = next((i for i, c in enumerate(path) if c.isalpha()), None)
    encoded = path if letter is None else f"{path[:letter]}%{ord(path[letter]):02x}{path[letter + 1 :]}"
    return [
        path,
        path.rstrip("/") + "/",
        "/" + path,
        inner,
        path.replace("/", "/./", 1),
        encoded,
        path + ";x",
        path + "?x=1",
        url + path,  # absolute-form target
    ]


_OPENAI_BODY = json.dumps({"model": "minilm", "input": "x"}).encode()
_COHERE_BODY = json.dumps({"model": "minilm", "texts": ["x"]}).encode()
BODY = {
    "/v1/embeddings": _OPENAI_BODY,
    "/embeddings": _OPENAI_BODY,
    "/v2/embed": _COHERE_BODY,
    "/v1/embed": _COHERE_BODY,
}
TEI_BODY = json.dumps({"inputs": "x"}).encode()


def body_for(route: Route, method: str) -> bytes:
    if method != "POST":
        return b""
    if route.direct is not None:
        return BODY.get(route.path, TEI_BODY)
    return b""


def methods_of(route: Route) -> list[str]:
    return [*route.methods, *(["HEAD"] if "GET" in route.methods else []), "OPTIONS", "DELETE"]


def test_every_route_and_variant_without_a_key_is_refused_or_open_as_the_table_says(gw: CliGateway) -> None:
    answers: dict[tuple[str, str], int] = {}
    for route in TABLE.routes:
        for method in methods_of(route):
            access = route.access("GET" if method == "HEAD" else method)
            for target in variants(concrete(route), gw.url):
                status = raw(gw.url, method, target, body=body_for(route, method))
                answers[(method, target)] = status
                assert status < 500, (method, target, status)
                if access in (Access.KEY, Access.ADMIN, Access.VIEW):  # VIEW: protect_views is on
                    assert status == 401, (method, target, status, access)
                else:
                    assert status not in (401, 403), (method, target, status)
                    if method not in route.methods and method != "HEAD":
                        assert status == 405, (method, target, status)
    # The open routes answer as documented under every spelling.
    assert answers[("GET", "//health")] == answers[("GET", "/health/")] == 200
    assert answers[("HEAD", f"{gw.url}/ready")] == 200


def test_a_key_that_is_not_an_admin_key_gets_403_on_admin_routes_under_every_variant(gw: CliGateway) -> None:
    auth = {"Authorization": f"Bearer {USER}"}
    admin_routes = [r for r in TABLE.routes if Access.ADMIN in r.methods.values()]
    assert {r.path for r in admin_routes} == {"/v1/consistency", "/v1/usage", "/v1/reload"}
    for route in admin_routes:
        for method in methods_of(route):
            admin = route.access("GET" if method == "HEAD" else method) is Access.ADMIN
            for target in variants(concrete(route), gw.url):
                status = raw(gw.url, method, target, auth)
                if admin:
                    assert status == 403, (method, target, status)
                else:  # GET /v1/consistency is a view: a key suffices
                    assert status in (200, 405), (method, target, status)


def test_embedding_route_variants_serve_with_a_key_and_never_500(gw: CliGateway) -> None:
    auth = {"Authorization": f"Bearer {USER}"}
    for route in (r for r in TABLE.routes if r.direct is not None):
        for target in variants(concrete(route), gw.url):
            assert raw(gw.url, "POST", target, auth, body_for(route, "POST")) == 200, target


def test_unknown_paths_are_404_in_the_dialect_of_their_prefix(gw: CliGateway) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    for path in ("/v1/nothing", "/V1/RELOAD", "/v1/reload/x", "/schema/swagger", "/v1/embeddings/../../admin"):
        r = httpx.post(gw.url + path, headers=auth)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found" and "POST /v1/embeddings" in r.json()["error"]["message"]
    tei = httpx.post(gw.url + "/embedx", headers=auth)
    assert tei.status_code == 404 and set(tei.json()) == {"error", "error_type"}
    # Without a key an unknown path is the same 404: nothing is served there either way.
    assert raw(gw.url, "POST", "/v1/reloadx") == 404


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", f"Bearer {USER}"), ("Authorization", f"Bearer {ADMIN}")],
        [("Authorization", f"Bearer {USER}"), ("Authorization", f"Bearer {USER}")],
        [("Authorization", f"Bearer {USER}"), ("api-key", ADMIN)],
        [("api-key", USER), ("api-key", USER)],
    ],
)
def test_ambiguous_credentials_are_a_400_naming_the_problem(gw: CliGateway, headers: list[tuple[str, str]]) -> None:
    r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "minilm", "input": "x"}, headers=httpx.Headers(headers))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "ambiguous_credentials"
    same = httpx.post(
        f"{gw.url}/v1/embeddings",
        json={"model": "minilm", "input": "x"},
        headers={"Authorization": f"Bearer {USER}", "api-key": USER},
    )
    assert same.status_code == 200


def test_the_table_covers_every_route_litestar_serves() -> None:
    class Fake:
        def __init__(self, path: str, methods: set[str]) -> None:
            self.path, self.methods = path, methods

    TABLE.check_served([Fake("/v1/models", {"GET", "OPTIONS", "HEAD"}), Fake("/schema/{path:str}", {"GET"})])
    with pytest.raises(RuntimeError, match="no entry"):
        TABLE.check_served([Fake("/v1/secret", {"GET"})])
    with pytest.raises(RuntimeError, match="no entry"):
        TABLE.check_served([Fake("/v1/backends", {"DELETE"})])


@pytest.mark.parametrize(
    ("raw_path", "canonical"),
    [
        ("/v1/reload", "/v1/reload"),
        ("/v1/reload/", "/v1/reload"),
        ("//v1//reload", "/v1/reload"),
        ("/v1/./reload", "/v1/reload"),
        ("/v1/x/../reload", "/v1/reload"),
        ("/../../v1/reload", "/v1/reload"),
        ("/v1/reload;jsessionid=1", "/v1/reload"),
        ("/v1;x/reload", "/v1/reload"),
        ("http://evil:1/v1/reload", "/v1/reload"),
        ("", "/"),
        ("//", "/"),
    ],
)
def test_normalisation(raw_path: str, canonical: str) -> None:
    assert TABLE.normalize(raw_path) == canonical


def test_a_route_takes_its_strictest_class_for_methods_it_lacks() -> None:
    table = RouteTable([Entry("/x", frozenset({"GET"}), Access.VIEW), Entry("/x", frozenset({"POST"}), Access.ADMIN)])
    route: Any = table.match("/x")
    assert route.access("GET") is Access.VIEW and route.access("POST") is Access.ADMIN
    assert route.access("DELETE") is Access.ADMIN and table.match("/y") is None
