"""Image URLs for providers that need the bytes: the service downloads each once, from the address it checked, and
hands the providers a `data:` URL; every failed download is a 400 before any upstream call.

The images come from a real HTTP server of the test's own on 127.0.0.1 (tests/image_server.py), so the services
here allow private image URLs (`MOM_ALLOW_PRIVATE_IMAGE_URLS=true`), except the DNS rebinding one, which shows the
download connecting to the address the guard checked and to nothing else.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import CALL_PATHS, CallPath, Service, StartService, free_port, llm
from tests.fake_upstream import FakeUpstream
from tests.image_server import ImageServer, Reply, png_bytes

MAX_IMAGE_BYTES = 1000
PNG = png_bytes()
EXACT = PNG + b"\x00" * (MAX_IMAGE_BYTES - len(PNG))  # a body of exactly MOM_MAX_IMAGE_BYTES
CLIENT_DATA_URL = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x01" * 16).decode()
PARAM = "messages[0].content[1].image_url.url"

ROUTES = {
    "/cat.png": Reply(PNG),
    "/exact.png": Reply(EXACT),
    "/redirect.png": Reply(status=302, content_type=None, location="/cat.png"),
    "/page.html": Reply(b"<h1>not an image</h1>", content_type="text/html"),
    "/untyped.png": Reply(PNG, content_type=None),
    "/empty.png": Reply(b""),
    "/big.png": Reply(EXACT + b"\x00"),  # one byte over, announced by Content-Length
    "/big-unsized.png": Reply(EXACT + b"\x00", sized=False),  # one byte over, found out by reading
    "/slow.png": Reply(PNG, stall_after=8),  # headers and 8 bytes, then nothing
    "/gone.png": Reply(b"gone", status=404, content_type="image/png"),
}

FETCH_ENV = {
    "MOM_ALLOW_PRIVATE_IMAGE_URLS": "true",
    "MOM_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
    "MOM_IMAGE_FETCH_TIMEOUT_SECONDS": "1",
}


def seeing_config(fake: FakeUpstream) -> dict[str, Any]:
    """Three members and a concluding LLM, all OpenAI-compatible servers that see images (so all need bytes)."""
    names = ["alpha", "beta", "gamma", "judge"]
    return {
        "llm_definitions": [llm(name, fake, multimodal=True) for name in names],
        "models": [{"name": "mom-seeing", "llms_to_query": names[:3], "concluding_llm": "judge"}],
    }


def question(*urls: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "What is in this picture?"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": parts}]


def images_sent_to(fake: FakeUpstream, model: str) -> list[str]:
    (entry,) = [e for e in fake.log() if e["model"] == model]
    return [
        part["image_url"]["url"]
        for message in entry["body"]["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part.get("type") == "image_url"
    ]


def data_url(body: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(body).decode()


@pytest.fixture(scope="module")
def image_server() -> Iterator[ImageServer]:
    with ImageServer(ROUTES) as server:
        yield server


@pytest.fixture
def images(image_server: ImageServer) -> ImageServer:
    """The image server, its request log emptied for this test."""
    image_server.reset()
    return image_server


@pytest.fixture(scope="module")
def fetching(fake_server: FakeUpstream, start_service: StartService) -> Callable[[CallPath], Service]:
    """A service over `seeing_config` with a small MOM_MAX_IMAGE_BYTES and a 1 s download limit, per call path."""
    started: dict[str, Service] = {}

    def get(path: CallPath) -> Service:
        if path.name not in started:
            started[path.name] = start_service(seeing_config(fake_server), FETCH_ENV | path.env)
        return started[path.name]

    return get


def assert_refused(response: httpx.Response, says: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_image_url", PARAM)
    assert says in error["message"]
    message: str = error["message"]
    return message


def test_an_image_url_is_downloaded_once_and_every_llm_gets_its_bytes_as_a_data_url(
    fetching: Callable[[CallPath], Service], call_path: CallPath, images: ImageServer, fake: FakeUpstream
) -> None:
    url = images.url("/cat.png")
    response = fetching(call_path).chat("mom-seeing", messages=question(url, CLIENT_DATA_URL, url))
    assert response.status_code == 200, response.text
    assert images.paths() == ["/cat.png"]  # one download, shared by three members, the judge and both parts
    for model in ("alpha", "beta", "gamma", "judge"):
        # exactly the served bytes; the client's own data: URL as it was sent
        assert images_sent_to(fake, model) == [data_url(PNG), CLIENT_DATA_URL, data_url(PNG)]
    mom = response.json()["mom"]
    assert [m["images"] for m in mom["members"]] == ["sent"] * 3 and mom["concluding"]["images"] == "sent"


def test_an_image_of_exactly_the_size_limit_is_accepted(
    fetching: Callable[[CallPath], Service], images: ImageServer, fake: FakeUpstream
) -> None:
    response = fetching(CALL_PATHS[0]).chat("mom-seeing", messages=question(images.url("/exact.png")))
    assert response.status_code == 200, response.text
    assert images_sent_to(fake, "alpha") == [data_url(EXACT)]


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/redirect.png", "redirect"),
        ("/page.html", "not an image"),
        ("/untyped.png", "not an image"),
        ("/empty.png", "empty"),
        ("/big.png", f"larger than {MAX_IMAGE_BYTES} bytes"),
        ("/big-unsized.png", f"larger than {MAX_IMAGE_BYTES} bytes"),
        ("/slow.png", "took longer than 1 s"),
        ("/gone.png", "HTTP 404"),
    ],
)
def test_a_failed_download_is_a_400_before_any_upstream_call(
    fetching: Callable[[CallPath], Service], images: ImageServer, fake: FakeUpstream, path: str, says: str
) -> None:
    response = fetching(CALL_PATHS[0]).chat("mom-seeing", messages=question(images.url(path)))
    message = assert_refused(response, says)
    assert "127.0.0.1" not in message and str(images.port) not in message  # no internal address named
    assert images.paths() == [path]  # asked once; a redirect is not followed
    assert fake.log() == []


def test_a_refused_connection_is_a_400_before_any_upstream_call(
    fetching: Callable[[CallPath], Service], fake: FakeUpstream
) -> None:
    port = free_port()  # nothing listens there
    response = fetching(CALL_PATHS[0]).chat("mom-seeing", messages=question(f"http://127.0.0.1:{port}/cat.png"))
    message = assert_refused(response, "could not be downloaded")
    assert "127.0.0.1" not in message and str(port) not in message
    assert fake.log() == []


def test_a_name_rebinding_to_loopback_after_the_check_reaches_nothing(
    fake_server: FakeUpstream, start_service: StartService, images: ImageServer, fake: FakeUpstream
) -> None:
    # `rebinding_dns`: rebind.test is 93.184.216.34 (global) the first time it is looked up, 127.0.0.1 after that;
    # private image URLs are refused as shipped. The download may only connect to the address the guard checked.
    service = start_service(seeing_config(fake_server), {"MOM_IMAGE_FETCH_TIMEOUT_SECONDS": "2"}, patch="rebinding_dns")
    response = service.chat("mom-seeing", messages=question(images.url("/cat.png", host="rebind.test")))
    # refused whatever answers at the checked address: nothing (offline), a filtering proxy's 404, or a time-out
    message = assert_refused(response, "")
    assert "127.0.0.1" not in message and "93.184.216.34" not in message
    assert images.requests() == []  # nothing reached the image server on 127.0.0.1
    assert fake.log() == []  # and no provider was handed the URL
