"""`/ui` over HTTP (the browser tests are tests/integration/test_ui.py): the pages and their files served without
a token, with a strict Content-Security-Policy, holding no secret; 404 when MOM_UI_ENABLED=false."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import TOKEN, Service, StartService

PAGES = ("/ui", "/ui/playground", "/ui/dashboard")


@pytest.fixture(scope="module")
def demo(start_service: StartService) -> Service:
    return start_service(None)


def suffix(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def csp(response: httpx.Response) -> dict[str, list[str]]:
    """The Content-Security-Policy's directives and their sources."""
    policy = response.headers["content-security-policy"]
    return {name: sources for name, *sources in (d.split() for d in policy.split(";") if d.strip())}


@pytest.mark.parametrize("path", PAGES)
def test_a_page_loads_without_a_token_with_a_strict_policy_and_no_secret(demo: Service, path: str) -> None:
    response = httpx.get(demo.url + path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = csp(response)
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'"] and policy["frame-ancestors"] == ["'none'"]
    assert policy["img-src"] == ["'self'", "data:"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert TOKEN not in response.text
    # every script and stylesheet the page names is served, from this origin, with its type and the same policy
    for asset in re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', response.text):
        served = httpx.get(demo.url + asset)
        assert served.status_code == 200, asset
        kind = served.headers["content-type"]
        assert kind.startswith({"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}[suffix(asset)])
        assert csp(served) == policy


def test_a_file_is_revalidated_by_its_etag(demo: Service) -> None:
    first = httpx.get(f"{demo.url}/ui/static/playground.js")
    assert first.headers["cache-control"] == "no-cache"
    again = httpx.get(f"{demo.url}/ui/static/playground.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    other = httpx.get(f"{demo.url}/ui/static/playground.js", headers={"If-None-Match": '"something-else"'})
    assert other.status_code == 200 and other.content == first.content


@pytest.mark.parametrize(
    "path",
    [
        "/ui/settings",
        "/ui/static/nope.js",
        "/ui/static/../../settings.py",
        "/ui/static/%2e%2e/__init__.py",
        "/ui/static/vendor/README.md",  # in the package for its readers, not served
        "/ui/__init__.py",
    ],
)
def test_anything_else_under_ui_is_a_404(demo: Service, path: str) -> None:
    response = httpx.get(demo.url + path)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_the_pages_are_off_with_mom_ui_enabled_false(start_service: StartService) -> None:
    service = start_service(None, {"MOM_UI_ENABLED": "false"})
    for path in (*PAGES, "/ui/static/ui.css", "/ui/static/vendor/chart.umd.min.js"):
        assert httpx.get(service.url + path).status_code == 404, path
    assert httpx.get(f"{service.base_url}/models", headers=service.headers()).status_code == 200
