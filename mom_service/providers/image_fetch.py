"""Image URLs downloaded by the service itself, for the providers that need the bytes (sanitize.RULES).

Each download connects only to the addresses the URL guard checked (no second DNS lookup, so a name that answers
differently the next time reaches nothing new), follows no redirect, stops at `max_bytes` and at `timeout_s`, and
takes only a 200 with an `image/*` type. Any failure is a 400 `invalid_image_url` naming the content part, never
an address, before any upstream call.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import socket
from collections.abc import Sequence

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from mom_service.errors import InvalidRequest
from mom_service.providers.images import RemoteImage

logger = logging.getLogger(__name__)

_IMAGE_TYPE = re.compile(r"^image/[a-z0-9.+-]+$")
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


class CheckedAddresses(AbstractResolver):
    """A resolver that looks nothing up: every name is the addresses the URL guard checked."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self._addresses = tuple(addresses)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,  # TLS and SNI still use the name
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=_NUMERIC,
            )
            for address in self._addresses
        ]

    async def close(self) -> None:
        return None


def _refused(message: str, image: RemoteImage) -> InvalidRequest:
    return InvalidRequest(message, param=image.param, code="invalid_image_url")


def _media_type(response: aiohttp.ClientResponse, image: RemoteImage, max_bytes: int) -> str:
    """The image's media type, once the status line and headers say it is one worth reading."""
    if 300 <= response.status < 400:
        raise _refused(
            f"The image URL answered with a redirect (HTTP {response.status}); redirects are not followed: "
            "send the image's final URL.",
            image,
        )
    if response.status != 200:
        raise _refused(f"The image URL answered HTTP {response.status}, not 200.", image)
    media_type = response.content_type.lower()
    if not _IMAGE_TYPE.match(media_type):  # a missing Content-Type is application/octet-stream
        raise _refused("The image URL's answer is not an image (its Content-Type is not image/*).", image)
    if response.content_length is not None and response.content_length > max_bytes:
        raise _too_big(image, max_bytes)
    return media_type


def _too_big(image: RemoteImage, max_bytes: int) -> InvalidRequest:
    return _refused(f"The image is larger than {max_bytes} bytes (MOM_MAX_IMAGE_BYTES).", image)


async def _body(response: aiohttp.ClientResponse, image: RemoteImage, max_bytes: int) -> bytes:
    """The body, reading at most `max_bytes` + 1 bytes: one more than allowed is enough to refuse it."""
    body = bytearray()
    while len(body) <= max_bytes:
        chunk = await response.content.read(max_bytes + 1 - len(body))
        if not chunk:
            break
        body += chunk
    if len(body) > max_bytes:
        raise _too_big(image, max_bytes)
    if not body:
        raise _refused("The image URL's answer is empty.", image)
    return bytes(body)


async def _get(image: RemoteImage, max_bytes: int) -> str:
    connector = aiohttp.TCPConnector(resolver=CheckedAddresses(image.addresses), use_dns_cache=False)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),  # `download`'s own limit rules
        trust_env=False,  # no proxy from the environment: it would look the name up again
    )
    async with (
        session,
        session.get(image.url, allow_redirects=False, headers={"Accept": "image/*"}) as response,
    ):
        media_type = _media_type(response, image, max_bytes)
        body = await _body(response, image, max_bytes)
    return f"data:{media_type};base64,{base64.b64encode(body).decode('ascii')}"


async def download(image: RemoteImage, *, max_bytes: int, timeout_s: float) -> str:
    """The image as a `data:` URL, or a 400 saying why it could not be had."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _get(image, max_bytes)
    except TimeoutError:
        raise _refused(f"The image took longer than {timeout_s:g} s to download.", image) from None
    except (aiohttp.ClientError, OSError) as exc:
        logger.info("image download failed: %s: %s", type(exc).__name__, exc)  # the details stay in our log
        raise _refused("The image could not be downloaded (no connection, or a broken answer).", image) from None


async def download_all(images: Sequence[RemoteImage], *, max_bytes: int, timeout_s: float) -> dict[str, str]:
    """Each URL's `data:` URL, downloaded concurrently; the first failure cancels the others and is the answer."""
    if not images:
        return {}
    try:
        async with asyncio.TaskGroup() as group:
            tasks = {
                image.url: group.create_task(download(image, max_bytes=max_bytes, timeout_s=timeout_s))
                for image in images
            }
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return {url: task.result() for url, task in tasks.items()}
