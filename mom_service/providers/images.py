"""Images in requests: the URL guard (each host resolved once, the addresses it checked kept: a provider that needs
the bytes gets a `data:` URL the service downloaded from exactly those addresses, image_fetch.py, never the URL),
and which LLMs can see images."""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mom_service.config import LLMDefinition
from mom_service.errors import InvalidRequest

# ------------------------------------------------------------------------------------------------ URL guard

_DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]+)((?:;[a-z0-9.+=-]+)*);base64,(.*)$", re.IGNORECASE | re.DOTALL)
DNS_TIMEOUT_S = 2.0

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses a host name or literal resolves to (legacy forms such as 2130706433 included)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _internal(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        # an IPv4 address carried inside IPv6 (mapped, 6to4, NAT64) is judged as the IPv4 address it reaches
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    return not ip.is_global or ip.is_multicast


def _refused(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_image_url")


def check_data_url(url: str, param: str) -> None:
    match = _DATA_URL.match(url)
    if match is None:
        raise _refused("An image data URL must be 'data:image/<type>;base64,<data>'.", param)
    try:
        decoded = base64.b64decode(match.group(3).strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _refused("The image data URL is not valid base64.", param) from None
    if not decoded:
        raise _refused("The image data URL is empty.", param)


async def _lookup(host: str, port: int, param: str, resolve: Resolver) -> tuple[str, ...]:
    """The host's addresses; a name that does not resolve, or not in time, is a 400 (fail closed)."""
    try:
        async with asyncio.timeout(DNS_TIMEOUT_S):
            addresses = tuple(dict.fromkeys(await resolve(host, port)))
    except TimeoutError:
        raise _refused(f"The image URL's host name did not resolve within {DNS_TIMEOUT_S:g} s.", param) from None
    except (OSError, UnicodeError):
        addresses = ()
    if not addresses:
        raise _refused("The image URL's host name does not resolve.", param)
    return addresses


async def check_image_url(
    url: str, param: str, *, allow_private: bool, resolve: Resolver = resolve_host
) -> tuple[str, ...]:
    """Raise a 400 for anything but http(s) to a public address or a valid base64 `data:image/...` URL.

    Returns the addresses the host resolved to (none for a `data:` URL): the only ones a download of the URL may
    connect to, so that a name answering differently the next time (DNS rebinding) reaches nothing else. A URL
    pointing inside our network would be a server-side request forgery; `allow_private` lifts only that check.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        check_data_url(url, param)
        return ()
    if scheme not in ("http", "https"):
        raise _refused("An image URL must be http, https or data:image/...;base64.", param)
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        host = None
    if not host:
        raise _refused("The image URL has no valid host.", param)
    addresses = await _lookup(host, port, param, resolve)
    if not allow_private and any(_internal(address) for address in addresses):
        raise _refused("The image URL points to a private, loopback, link-local or otherwise internal address.", param)
    return addresses


def image_parts(messages: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(param path, url) of every image in upstream-shaped messages."""
    found = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") == "image_url":
                    found.append((f"messages[{i}].content[{j}].image_url.url", part["image_url"]["url"]))
    return found


@dataclass(frozen=True, slots=True)
class RemoteImage:
    """An http(s) image URL as the guard checked it."""

    url: str
    param: str  # the first content part that holds it
    addresses: tuple[str, ...]  # what its host resolved to: the only addresses its download may connect to


@dataclass(frozen=True, slots=True)
class CheckedImages:
    """Every image of a request, checked."""

    count: int
    remote: tuple[RemoteImage, ...]  # each distinct http(s) URL once, in order of appearance


async def check_images(
    messages: Sequence[dict[str, Any]], *, max_images: int, allow_private: bool, resolve: Resolver = resolve_host
) -> CheckedImages:
    """Validate every image of a request; each distinct URL is checked (and its host resolved) once."""
    images = image_parts(messages)
    if len(images) > max_images:
        raise InvalidRequest(
            f"Too many images: {len(images)}, at most {max_images} are accepted.",
            param="messages",
            code="too_many_images",
        )
    distinct: dict[str, str] = {}  # url -> the first part that holds it
    for param, url in images:
        distinct.setdefault(url, param)
    checked = await asyncio.gather(
        *(check_image_url(url, param, allow_private=allow_private, resolve=resolve) for url, param in distinct.items())
    )
    remote = (RemoteImage(url, param, found) for (url, param), found in zip(distinct.items(), checked, strict=True))
    return CheckedImages(len(images), tuple(image for image in remote if image.addresses))


# ------------------------------------------------------------------------------------------------ capability


def sees_images(llm: LLMDefinition, supports_vision: Callable[[str], bool | None]) -> bool:
    """The config's `multimodal` decides; when it is null, LiteLLM's model info (`supports_vision`) does."""
    if llm.multimodal is not None:
        return llm.multimodal
    return bool(supports_vision(llm.model))
