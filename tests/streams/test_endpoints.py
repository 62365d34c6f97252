from __future__ import annotations

import pytest
from kubesight.streams.endpoints import MAX_LENGTH, MAX_SEGMENTS, normalise


@pytest.mark.parametrize(
    "path, endpoint",
    [
        ("/", "/"),
        ("", "/"),
        ("/healthz", "/healthz"),
        ("/api/v1/users", "/api/v1/users"),
        ("/api/v1/users/", "/api/v1/users/"),
        ("/users/42", "/users/{id}"),
        ("/users/42/orders/7?expand=items#top", "/users/{id}/orders/{id}"),
        ("/users?id=42", "/users"),
        ("//double//slash", "/double/slash"),
        ("/orders/3fa85f64-5717-4562-b3fc-2c963f66afa6", "/orders/{uuid}"),
        ("/orders/3FA85F6457174562B3FC2C963F66AFA6/items", "/orders/{uuid}/items"),
        ("/commits/9fceb02d0ae598e95dc970b74767f19372d61af8", "/commits/{id}"),
        ("/objects/deadbeef", "/objects/{id}"),
        ("/objects/0x1f2e3d4c5b", "/objects/{id}"),
        ("/images/12345.jpg", "/images/{id}.jpg"),
        ("/reports/2024-03-17", "/reports/{date}"),
        ("/events/2024-03-17T10:04:05Z", "/events/{date}"),
        ("/users/jane.doe@example.com/profile", "/users/{email}/profile"),
        ("/users/jane%40example.com", "/users/{email}"),
        ("/s/eyJhbGciOiJIUzI1NiJ9", "/s/{token}"),
        ("/share/aB3dE5gH7jK9", "/share/{token}"),
        ("/download/" + "z" * 60, "/download/{token}"),
        ("/blog/how-to-run-nginx", "/blog/how-to-run-nginx"),  # words stay
        ("/static/app.css", "/static/app.css"),
        ("/v2/catalog", "/v2/catalog"),
        ("/a/b/c/d/e/f", "/a/b/c/d/e/f"),
        ("/a/b/c/d/e/f/g/h", "/a/b/c/d/e/f/…"),
        ("/a/1/b/2/c/3/d/4", "/a/{id}/b/{id}/c/{id}/…"),
        ("*", "*"),  # OPTIONS *
        ("example.com:443", "example.com:443"),  # CONNECT
    ],
)
def test_normalise(path: str, endpoint: str):
    assert normalise(path) == endpoint
    assert normalise(endpoint) == endpoint  # idempotent: callers may normalise twice


def test_long_paths_are_bounded():
    endpoint = normalise("/" + "/".join(["segment-" + "w" * 30] * MAX_SEGMENTS))
    assert len(endpoint) == MAX_LENGTH and endpoint.endswith("…")
    assert normalise(endpoint) == endpoint


def test_ids_collapse_to_one_endpoint():
    paths = [f"/users/{i}/orders/{i * 7919:x}{'a' * 8}" for i in range(1000)]
    assert {normalise(p) for p in paths} == {"/users/{id}/orders/{id}"}
