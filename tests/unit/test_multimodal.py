"""Images: the URL guard (SSRF), who sees images, provider families, who gets bytes, and the per-family sanitizer.

The sanitized shapes are checked against LiteLLM's own request adapters (Anthropic, Gemini, Ollama), offline:
every image here is a data: URL, so no adapter downloads anything.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import pytest

from mom_service.config import LLMDefinition
from mom_service.errors import InvalidRequest
from mom_service.providers import images
from mom_service.providers.images import (
    RemoteImage,
    check_data_url,
    check_image_url,
    check_images,
    image_parts,
    sees_images,
)
from mom_service.providers.litellm_api import supports_vision
from mom_service.providers.sanitize import IMAGE_PLACEHOLDER, RULES, family, needs_bytes, sanitize

# ------------------------------------------------------------------------------------------------ images


def _png_bytes() -> bytes:
    """A real 1x1 RGBA PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00\xff")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


PNG_B64 = base64.b64encode(_png_bytes()).decode()
PNG_URL = f"data:image/png;base64,{PNG_B64}"
JPEG_B64 = base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9").decode()
JPEG_URL = f"data:image/jpeg;charset=utf-8;base64,{JPEG_B64}"


def llm(model: str, *, api_base: str | None = None, multimodal: bool | None = None) -> LLMDefinition:
    return LLMDefinition(name="m", model=model, api_base=api_base, multimodal=multimodal)


def fixed(*addresses: str) -> Any:
    """A resolver answering `addresses` for every name, and recording what it was asked."""
    calls: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> Sequence[str]:
        calls.append((host, port))
        return list(addresses)

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


# --------------------------------------------------------------------------------------------- URL guard

HOSTILE_URLS = [
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
    "http://127.0.0.1/x.png",
    "http://[::1]/x.png",
    "http://[::ffff:127.0.0.1]/x.png",  # IPv4-mapped IPv6
    "http://2130706433/x.png",  # 127.0.0.1 as one decimal number
    "http://0x7f000001/x.png",  # ... in hex
    "http://0177.0.0.1/",  # ... with an octal first byte
    "http://127.1/",  # ... shortened
    "http://localhost:8080/",
    "http://LOCALHOST/",
    "http://10.0.0.5/",
    "http://192.168.1.1/",
    "http://172.16.0.1/",
    "http://100.64.0.1/",  # shared address space (carrier-grade NAT)
    "http://[fe80::1]/",  # IPv6 link-local
    "http://[fc00::1]/",  # IPv6 unique local
    "http://0.0.0.0/",
    "http://0/",
    "http://[::]/",
    "http://224.0.0.1/",  # multicast
    "http://user:pw@127.0.0.1/",  # credentials before the host
    "http://example.com:80@127.0.0.1/",  # a public-looking name as the user part
    "https://127.0.0.1:443/",
    "HTTP://127.0.0.1/x.png",  # scheme in capitals
    "http://[2002:7f00:1::]/",  # 6to4 address embedding 127.0.0.1
    "http://127.0.0.1:99999/",  # port out of range: no valid host
    "file:///etc/passwd",
    "gopher://127.0.0.1:70/_x",
    "ftp://example.com/a.png",
    "javascript:alert(1)",
    "//127.0.0.1/x.png",  # scheme-relative
    "127.0.0.1/x.png",  # no scheme at all
    "data:text/html;base64,PGgxPg==",  # not an image type
    "data:image/png;base64,!!!notbase64",
    "data:image/png;base64,AAA",  # bad padding
    "data:image/svg+xml,<svg/>",  # not base64
    "data:image/png;base64,",  # empty
    "data:,hello",
    "http:///nohost.png",
    "http://",
]


@pytest.mark.parametrize("url", HOSTILE_URLS)
async def test_hostile_urls_are_refused_with_the_real_resolver(url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        await check_image_url(url, "messages[3].content[1].image_url.url", allow_private=False)
    error = info.value
    assert error.status_code == 400
    assert error.code == "invalid_image_url"
    assert error.param == "messages[3].content[1].image_url.url"
    assert error.to_dict()["error"]["type"] == "invalid_request_error"


async def test_nat64_address_embedding_the_metadata_service_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        await check_image_url("http://[64:ff9b::a9fe:a9fe]/latest/meta-data/", "p", allow_private=False)


@pytest.mark.parametrize(
    "url",
    [PNG_URL, JPEG_URL, f"DATA:IMAGE/PNG;BASE64,{PNG_B64}", f"data:image/webp;base64,{PNG_B64}\n"],
)
async def test_valid_data_urls_are_accepted_and_have_no_address(url: str) -> None:
    resolve = fixed("10.0.0.1")
    assert await check_image_url(url, "p", allow_private=False, resolve=resolve) == ()
    assert resolve.calls == []


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "http://images.example.org:8080/a.jpg"])
async def test_a_public_url_is_accepted_with_the_addresses_it_was_checked_at(url: str) -> None:
    resolve = fixed("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "93.184.216.34")
    addresses = await check_image_url(url, "p", allow_private=False, resolve=resolve)
    assert addresses == ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946")  # each once, in order


def test_check_data_url_directly() -> None:
    check_data_url(PNG_URL, "p")
    with pytest.raises(InvalidRequest) as info:
        check_data_url("data:image/png;base64,", "the.param")
    assert (info.value.code, info.value.param) == ("invalid_image_url", "the.param")


async def test_a_public_address_passes_and_the_resolver_is_asked_for_host_and_port() -> None:
    resolve = fixed("93.184.216.34")
    await check_image_url("https://cdn.example.net/a.png", "p", allow_private=False, resolve=resolve)
    await check_image_url("http://cdn.example.net/a.png", "p", allow_private=False, resolve=resolve)
    await check_image_url("http://u:p@cdn.example.net:8080/a.png", "p", allow_private=False, resolve=resolve)
    assert resolve.calls == [("cdn.example.net", 443), ("cdn.example.net", 80), ("cdn.example.net", 8080)]


@pytest.mark.parametrize(
    "addresses",
    [
        ("10.1.2.3",),  # an internal name (or DNS rebinding to one)
        ("93.184.216.34", "10.1.2.3"),  # one public and one internal address
        ("2606:2800:220:1:248:1893:25c8:1946", "fd00::5"),
        ("::ffff:169.254.169.254",),
        ("fe80::1%eth0",),  # link-local with a zone index
    ],
)
async def test_a_name_resolving_to_any_internal_address_is_refused(addresses: tuple[str, ...]) -> None:
    with pytest.raises(InvalidRequest) as info:
        await check_image_url("https://images.attacker.test/a.png", "p", allow_private=False, resolve=fixed(*addresses))
    assert (info.value.status_code, info.value.code, info.value.param) == (400, "invalid_image_url", "p")


@pytest.mark.parametrize("allow_private", [False, True])
@pytest.mark.parametrize(
    "failure", [OSError("Name or service not known"), UnicodeError("label too long"), None], ids=repr
)
async def test_a_name_that_does_not_resolve_is_refused(failure: Exception | None, allow_private: bool) -> None:
    async def no_such_name(host: str, port: int) -> Sequence[str]:
        if failure is not None:
            raise failure
        return []  # an answer without addresses

    with pytest.raises(InvalidRequest) as info:
        await check_image_url("https://nowhere.test/a.png", "p", allow_private=allow_private, resolve=no_such_name)
    assert (info.value.status_code, info.value.code, info.value.param) == (400, "invalid_image_url", "p")
    assert info.value.message == "The image URL's host name does not resolve."


async def test_the_real_resolver_refuses_a_name_that_does_not_exist() -> None:
    with pytest.raises(InvalidRequest) as info:
        await check_image_url("http://no-such-host.invalid/x.png", "p", allow_private=False)
    assert info.value.code == "invalid_image_url"


@pytest.mark.parametrize("allow_private", [False, True])
async def test_a_resolver_slower_than_the_dns_timeout_is_refused(
    monkeypatch: pytest.MonkeyPatch, allow_private: bool
) -> None:
    monkeypatch.setattr(images, "DNS_TIMEOUT_S", 0.05)
    cancelled = asyncio.Event()

    async def hangs(host: str, port: int) -> Sequence[str]:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return ["10.0.0.1"]

    started = asyncio.get_running_loop().time()
    with pytest.raises(InvalidRequest) as info:
        await check_image_url("https://slow.example.net/a.png", "p", allow_private=allow_private, resolve=hangs)
    assert asyncio.get_running_loop().time() - started < 1.0
    assert cancelled.is_set()
    assert (info.value.status_code, info.value.code, info.value.param) == (400, "invalid_image_url", "p")
    assert "did not resolve within 0.05 s" in info.value.message


async def test_allow_private_accepts_internal_addresses_and_returns_them() -> None:
    resolve = fixed("10.0.0.1")
    for url in ("http://127.0.0.1/x.png", "http://localhost:8080/", "http://[::1]/x.png", "http://10.0.0.5/"):
        # still resolved: the download may connect only to what was checked
        assert await check_image_url(url, "p", allow_private=True, resolve=resolve) == ("10.0.0.1",)
    assert resolve.calls == [("127.0.0.1", 80), ("localhost", 8080), ("::1", 80), ("10.0.0.5", 80)]


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "gopher://127.0.0.1:70/_x", "data:image/png;base64,!!!notbase64", "data:image/png;base64,"],
)
async def test_allow_private_still_refuses_other_schemes_and_broken_data_urls(url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        await check_image_url(url, "p", allow_private=True)
    assert info.value.code == "invalid_image_url"


# ------------------------------------------------------------------------------------------- check_images


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def image(url: str, detail: str | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "image_url", "image_url": {"url": url}}
    if detail is not None:
        part["image_url"]["detail"] = detail
    return part


async def test_check_images_counts_images() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        user(text("Look"), image(PNG_URL), image("https://cdn.example.net/b.png", "low")),
        {"role": "assistant", "content": "Two images."},
        user(image(JPEG_URL)),
    ]
    resolve = fixed("93.184.216.34")
    checked = await check_images(messages, max_images=3, allow_private=False, resolve=resolve)
    assert checked.count == 3
    assert checked.remote == (
        RemoteImage("https://cdn.example.net/b.png", "messages[1].content[2].image_url.url", ("93.184.216.34",)),
    )
    assert resolve.calls == [("cdn.example.net", 443)]


async def test_check_images_is_zero_for_text_only_messages() -> None:
    messages = [{"role": "system", "content": "S"}, user(text("a"), text("b")), {"role": "user", "content": "c"}]
    checked = await check_images(messages, max_images=0, allow_private=False, resolve=fixed("10.0.0.1"))
    assert (checked.count, checked.remote) == (0, ())


async def test_check_images_checks_each_distinct_url_once_and_keeps_its_first_part() -> None:
    """A name asked twice could answer twice differently (rebinding): each URL is looked up once, and that answer
    is the one its download uses."""
    answers = iter([["93.184.216.34"], ["8.8.4.4"], ["127.0.0.1"]])

    async def rebinding(host: str, port: int) -> Sequence[str]:
        return next(answers)

    a, b = "https://a.example.net/1.png", "https://b.example.net/2.png"
    messages = [user(image(a)), user(text("and"), image(b), image(a), image(PNG_URL), image(b))]
    checked = await check_images(messages, max_images=5, allow_private=False, resolve=rebinding)
    assert checked.count == 5
    assert checked.remote == (
        RemoteImage(a, "messages[0].content[0].image_url.url", ("93.184.216.34",)),
        RemoteImage(b, "messages[1].content[1].image_url.url", ("8.8.4.4",)),
    )


def test_image_parts_names_every_image_by_its_path() -> None:
    messages = [{"role": "user", "content": "x"}, user(text("a"), image(PNG_URL)), user(image("https://e.test/1"))]
    assert image_parts(messages) == [
        ("messages[1].content[1].image_url.url", PNG_URL),
        ("messages[2].content[0].image_url.url", "https://e.test/1"),
    ]


async def test_too_many_images() -> None:
    messages = [user(image(PNG_URL), image(PNG_URL)), user(image(JPEG_URL))]
    with pytest.raises(InvalidRequest) as info:
        await check_images(messages, max_images=2, allow_private=False)
    error = info.value
    assert (error.status_code, error.code, error.param) == (400, "too_many_images", "messages")
    assert "3" in error.message and "2" in error.message
    assert (await check_images(messages, max_images=3, allow_private=False)).count == 3


@pytest.mark.parametrize(
    ("bad_url", "param"),
    [
        ("http://127.0.0.1/x.png", "messages[2].content[2].image_url.url"),
        ("data:image/png;base64,!!!", "messages[2].content[2].image_url.url"),
        ("file:///etc/passwd", "messages[2].content[2].image_url.url"),
    ],
)
async def test_check_images_names_the_offending_part(bad_url: str, param: str) -> None:
    messages = [
        {"role": "system", "content": "S"},
        user(image(PNG_URL)),
        user(text("and"), image("https://cdn.example.net/ok.png"), image(bad_url)),
    ]

    async def resolve(host: str, port: int) -> Sequence[str]:
        return ["93.184.216.34"] if host == "cdn.example.net" else ["127.0.0.1"]

    with pytest.raises(InvalidRequest) as info:
        await check_images(messages, max_images=10, allow_private=False, resolve=resolve)
    assert (info.value.status_code, info.value.code, info.value.param) == (400, "invalid_image_url", param)


async def test_check_images_respects_allow_private() -> None:
    messages = [user(image("http://10.0.0.5/a.png"), image("http://localhost/b.png"))]
    assert (await check_images(messages, max_images=5, allow_private=True)).count == 2
    with pytest.raises(InvalidRequest):
        await check_images(messages, max_images=5, allow_private=False)


# ------------------------------------------------------------------------------------------- sees_images


@pytest.mark.parametrize("answer", [True, False, None])
def test_multimodal_set_in_the_config_wins(answer: bool | None) -> None:
    asked: list[str] = []

    def info(model: str) -> bool | None:
        asked.append(model)
        return answer

    assert sees_images(llm("openai/gpt-4o-mini", multimodal=True), info) is True
    assert sees_images(llm("openai/gpt-4o-mini", multimodal=False), info) is False
    assert sees_images(llm("ollama_chat/llama3.1", multimodal=True), info) is True
    assert asked == []


@pytest.mark.parametrize(("answer", "expected"), [(True, True), (False, False), (None, False)])
def test_multimodal_null_asks_litellms_info(answer: bool | None, expected: bool) -> None:
    asked: list[str] = []

    def info(model: str) -> bool | None:
        asked.append(model)
        return answer

    assert sees_images(llm("some/model"), info) is expected
    assert asked == ["some/model"]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("openai/gpt-4o-mini", True), ("openai/unknown-xyz", False), ("ollama_chat/llama3.1", False)],
)
def test_sees_images_with_litellms_real_model_info(model: str, expected: bool) -> None:
    assert sees_images(llm(model), supports_vision) is expected
    assert sees_images(llm(model, multimodal=not expected), supports_vision) is (not expected)


# ----------------------------------------------------------------------------------------------- family


@pytest.mark.parametrize(
    ("model", "api_base", "expected"),
    [
        ("openai/gpt-4o", None, "openai"),
        ("azure/my-deployment", None, "openai"),
        ("openai/qwen2.5", "http://vllm.internal:8000/v1", "compatible"),
        ("anthropic/claude-sonnet-4-5", None, "anthropic"),
        ("anthropic/claude-sonnet-4-5", "https://proxy.example.com", "anthropic"),
        ("gemini/gemini-2.5-flash", None, "gemini"),
        ("vertex_ai/gemini-2.5-pro", None, "gemini"),
        ("ollama/llava", None, "ollama"),
        ("ollama_chat/llama3.2-vision", "http://localhost:11434", "ollama"),
        ("hosted_vllm/meta-llama/Llama-3.1-8B", "http://vllm:8000/v1", "compatible"),
        ("mistral/mistral-large", None, "compatible"),
        ("some-new-provider/model", None, "compatible"),
        ("gpt-4o", None, "openai"),
        ("gpt-4o", "https://api.example.com/v1", "compatible"),
    ],
)
def test_family(model: str, api_base: str | None, expected: str) -> None:
    assert family(llm(model, api_base=api_base)) == expected


def test_azure_with_its_endpoint_is_still_openai() -> None:
    assert family(llm("azure/gpt-4o", api_base="https://my-resource.openai.azure.com")) == "openai"


# -------------------------------------------------------------------------------------- who gets the bytes


def named(name: str, model: str, api_base: str | None = None) -> LLMDefinition:
    return LLMDefinition(name=name, model=model, api_base=api_base)


@pytest.mark.parametrize(
    ("model", "api_base", "expected"),
    [
        ("openai/gpt-4o", None, False),  # OpenAI fetches URLs from its own cloud
        ("azure/gpt-4o", "https://my-resource.openai.azure.com", False),
        ("anthropic/claude-sonnet-4-5", None, True),  # LiteLLM would download them: from inside our network
        ("gemini/gemini-2.5-flash", None, True),
        ("ollama_chat/llama3.2-vision", "http://localhost:11434", True),
        ("openai/qwen2.5-vl", "http://vllm.internal:8000/v1", True),  # vLLM fetches from inside the network
    ],
)
def test_an_llm_that_sees_images_needs_bytes_unless_its_provider_fetches_urls(
    model: str, api_base: str | None, expected: bool
) -> None:
    assert needs_bytes([named("x", model, api_base)], {"x": True}) is expected
    assert needs_bytes([named("x", model, api_base)], {"x": False}) is False  # it gets placeholders, or is skipped


def test_needs_bytes_when_any_llm_does() -> None:
    llms = [named("gpt", "openai/gpt-4o"), named("local", "openai/qwen", "http://vllm:8000/v1")]
    assert needs_bytes(llms, {"gpt": True, "local": True}) is True
    assert needs_bytes(llms, {"gpt": True, "local": False}) is False
    assert needs_bytes([], {}) is False


# ------------------------------------------------------------------------------------------------ sanitize

PLACEHOLDER_1 = IMAGE_PLACEHOLDER.format(n=1)
PLACEHOLDER_2 = IMAGE_PLACEHOLDER.format(n=2)


def conversation() -> list[dict[str, Any]]:
    """A developer message, a two-text-part user message with a name, an empty assistant message, an image with
    `detail`, two consecutive user messages, and a second image later on."""
    return [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [text("Hello"), text("there")], "name": "alice"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [text("What is this?"), image(PNG_URL, "high")]},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [image(PNG_URL), text("And this?")]},
    ]


IMG_DETAIL = {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "high"}}
IMG_PLAIN = {"type": "image_url", "image_url": {"url": PNG_URL}}

# The table of rules itself, so a silent change to a row is seen here.
EXPECTED_RULES = {
    # join_text_parts, keep_name, developer_role, drop_empty, merge_same_role, image_detail, image_urls
    "openai": (False, True, True, False, False, True, True),
    "anthropic": (True, False, False, True, True, False, False),
    "gemini": (True, False, False, True, True, False, False),
    "ollama": (True, False, False, True, False, False, False),
    "compatible": (True, False, False, True, False, True, False),
}


def test_rules_table() -> None:
    assert set(RULES) == set(EXPECTED_RULES)
    for name, row in RULES.items():
        assert (
            row.join_text_parts,
            row.keep_name,
            row.developer_role,
            row.drop_empty,
            row.merge_same_role,
            row.image_detail,
            row.image_urls,
        ) == EXPECTED_RULES[name]


REMOTE = "https://cdn.example.net/cat.png"


@pytest.mark.parametrize("name", sorted(RULES))
def test_families_that_take_no_urls_get_the_downloaded_data_url(name: str) -> None:
    messages = [user(image(REMOTE), image(JPEG_URL), image(REMOTE))]
    out = sanitize(messages, RULES[name], vision=True, downloaded={REMOTE: PNG_URL})
    sent = [part["image_url"]["url"] for part in out[0]["content"]]
    # the client's own data: URL goes as it is; the http(s) one as a URL only to OpenAI (and Azure)
    assert sent == ([REMOTE, JPEG_URL, REMOTE] if name == "openai" else [PNG_URL, JPEG_URL, PNG_URL])
    assert messages == [user(image(REMOTE), image(JPEG_URL), image(REMOTE))]  # the request's messages untouched


def test_an_image_url_that_was_not_downloaded_is_never_handed_on() -> None:
    with pytest.raises(KeyError):
        sanitize([user(image(REMOTE))], RULES["compatible"], vision=True)
    # without vision the image is a placeholder: nothing to download
    assert sanitize([user(image(REMOTE))], RULES["compatible"], vision=False) == [
        {"role": "user", "content": IMAGE_PLACEHOLDER.format(n=1)}
    ]


MERGED_FIRST_USER_TURN = [text("Hello\nthere"), text("What is this?"), IMG_PLAIN, text("Second question")]

SANITIZED_VISION: dict[str, list[dict[str, Any]]] = {
    "openai": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [text("Hello"), text("there")], "name": "alice"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [text("What is this?"), IMG_DETAIL]},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [IMG_PLAIN, text("And this?")]},
    ],
    "anthropic": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": MERGED_FIRST_USER_TURN},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [IMG_PLAIN, text("And this?")]},
    ],
    "ollama": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello\nthere"},
        {"role": "user", "content": [text("What is this?"), IMG_PLAIN]},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [IMG_PLAIN, text("And this?")]},
    ],
    "compatible": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello\nthere"},
        {"role": "user", "content": [text("What is this?"), IMG_DETAIL]},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [IMG_PLAIN, text("And this?")]},
    ],
}
SANITIZED_VISION["gemini"] = copy.deepcopy(SANITIZED_VISION["anthropic"])

SANITIZED_PLACEHOLDERS: dict[str, list[dict[str, Any]]] = {
    "openai": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [text("Hello"), text("there")], "name": "alice"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [text("What is this?"), text(PLACEHOLDER_1)]},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [text(PLACEHOLDER_2), text("And this?")]},
    ],
    "anthropic": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"Hello\nthere\n\nWhat is this?\n{PLACEHOLDER_1}\n\nSecond question"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": f"{PLACEHOLDER_2}\nAnd this?"},
    ],
    "ollama": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello\nthere"},
        {"role": "user", "content": f"What is this?\n{PLACEHOLDER_1}"},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": f"{PLACEHOLDER_2}\nAnd this?"},
    ],
}
SANITIZED_PLACEHOLDERS["gemini"] = copy.deepcopy(SANITIZED_PLACEHOLDERS["anthropic"])
SANITIZED_PLACEHOLDERS["compatible"] = copy.deepcopy(SANITIZED_PLACEHOLDERS["ollama"])


@pytest.mark.parametrize("name", sorted(RULES))
def test_sanitize_with_vision(name: str) -> None:
    messages = conversation()
    before = copy.deepcopy(messages)
    assert sanitize(messages, RULES[name], vision=True) == SANITIZED_VISION[name]
    assert messages == before  # the request's messages are not touched


@pytest.mark.parametrize("name", sorted(RULES))
def test_sanitize_without_vision_numbers_images_across_the_conversation(name: str) -> None:
    messages = conversation()
    before = copy.deepcopy(messages)
    out = sanitize(messages, RULES[name], vision=False)
    assert out == SANITIZED_PLACEHOLDERS[name]
    assert messages == before
    assert "image_url" not in repr(out)


def test_placeholder_text() -> None:
    assert PLACEHOLDER_1 == "[image 1: not shown to you; the panel's answers describe it]"


def test_sanitize_drops_empty_text_parts_and_messages_left_empty() -> None:
    messages = [
        {"role": "system", "content": [text("")]},
        {"role": "user", "content": [text(""), text("x"), text("")]},
        {"role": "assistant", "content": []},
    ]
    assert sanitize(messages, RULES["compatible"], vision=True) == [{"role": "user", "content": "x"}]
    assert sanitize(messages, RULES["openai"], vision=True) == [
        {"role": "system", "content": []},
        {"role": "user", "content": [text("x")]},
        {"role": "assistant", "content": []},
    ]


def test_merge_keeps_image_order_when_a_string_follows_a_list() -> None:
    messages = [user(image(PNG_URL, "low")), {"role": "user", "content": "then"}, user(text("a"), text("b"))]
    assert sanitize(messages, RULES["anthropic"], vision=True) == [
        {"role": "user", "content": [IMG_PLAIN, text("then"), text("a\nb")]}
    ]


def test_developer_and_system_messages_merge_where_roles_merge() -> None:
    messages = [
        {"role": "system", "content": "One."},
        {"role": "developer", "content": "Two."},
        {"role": "user", "content": "Hi"},
    ]
    assert sanitize(messages, RULES["gemini"], vision=True) == [
        {"role": "system", "content": "One.\n\nTwo."},
        {"role": "user", "content": "Hi"},
    ]
    assert sanitize(messages, RULES["openai"], vision=True) == messages


# ------------------------------------------------------------------------------ LiteLLM's own adapters, offline


def _alternates(roles: list[str], first: str, second: str) -> bool:
    return all(role == (first if i % 2 == 0 else second) for i, role in enumerate(roles))


@pytest.mark.parametrize("vision", [True, False])
def test_anthropic_adapter_accepts_the_sanitized_conversation(vision: bool) -> None:
    from litellm.llms.anthropic.chat.transformation import AnthropicConfig

    messages = sanitize(conversation(), RULES["anthropic"], vision=vision)
    request = AnthropicConfig().transform_request(
        model="claude-sonnet-4-5",
        messages=copy.deepcopy(messages),
        optional_params={"max_tokens": 10},
        litellm_params={},
        headers={},
    )
    assert request["system"] == [{"type": "text", "text": "Be brief."}]
    roles = [m["role"] for m in request["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert _alternates(roles, "user", "assistant")
    blocks = [block for m in request["messages"] for block in m["content"]]
    images = [block for block in blocks if block["type"] == "image"]
    if vision:
        assert len(images) == 2
        assert all(b["source"] == {"type": "base64", "media_type": "image/png", "data": PNG_B64} for b in images)
    else:
        assert images == []
        texts = [block["text"] for block in blocks if block["type"] == "text"]
        assert any(PLACEHOLDER_1 in t for t in texts) and any(PLACEHOLDER_2 in t for t in texts)


@pytest.mark.parametrize("vision", [True, False])
def test_gemini_adapter_accepts_the_sanitized_conversation(vision: bool) -> None:
    from litellm.llms.vertex_ai.gemini.transformation import (
        _gemini_convert_messages_with_history,
        transform_request_body,
    )

    messages = sanitize(conversation(), RULES["gemini"], vision=vision)
    body = transform_request_body(
        messages=copy.deepcopy(messages),
        model="gemini-2.5-flash",
        optional_params={},
        custom_llm_provider="gemini",
        litellm_params={},
        cached_content=None,
    )
    assert body["system_instruction"] == {"parts": [{"text": "Be brief."}]}
    roles = [c["role"] for c in body["contents"]]
    assert roles == ["user", "model", "user"]
    inline = [p["inline_data"] for c in body["contents"] for p in c["parts"] if "inline_data" in p]
    if vision:
        assert inline == [{"mime_type": "image/png", "data": PNG_B64}] * 2
    else:
        assert inline == []

    # The message converter alone, on the conversation without its system message.
    contents = _gemini_convert_messages_with_history(messages=copy.deepcopy(messages[1:]))
    assert [c["role"] for c in contents] == ["user", "model", "user"]


@pytest.mark.parametrize("vision", [True, False])
def test_ollama_chat_adapter_accepts_the_sanitized_conversation(vision: bool) -> None:
    from litellm.llms.ollama.chat.transformation import OllamaChatConfig

    messages = sanitize(conversation(), RULES["ollama"], vision=vision)
    data = OllamaChatConfig().transform_request(
        model="llama3.2-vision",
        messages=copy.deepcopy(messages),
        optional_params={},
        litellm_params={},
        headers={},
    )
    assert data["model"] == "llama3.2-vision"
    sent = [(m["role"], m.get("content"), m.get("images")) for m in data["messages"]]
    if vision:
        assert sent == [
            ("system", "Be brief.", []),
            ("user", "Hello\nthere", []),
            ("user", "What is this?", [PNG_B64]),  # Ollama wants bare base64, not a data: URL
            ("user", "Second question", []),
            ("assistant", "A cat.", []),
            ("user", "And this?", [PNG_B64]),
        ]
    else:
        assert sent == [
            ("system", "Be brief.", []),
            ("user", "Hello\nthere", []),
            ("user", f"What is this?\n{PLACEHOLDER_1}", []),
            ("user", "Second question", []),
            ("assistant", "A cat.", []),
            ("user", f"{PLACEHOLDER_2}\nAnd this?", []),
        ]
