"""Signatures made with the service's key: a thinking block's (Anthropic's Messages surface: HMAC-SHA256 of its
text, base64, so that a block a client sends back can be told apart from one it wrote or changed), and the link
token of a run's progress stream (an HMAC of the run's id under a key of its own derived from the same key, URL-safe
base64: it opens that run's stream only).

The key is MOM_SIGNING_KEY, or when it is unset one derived from the API tokens: every replica with the same
configuration signs alike, and a signature made before a token rotation stops verifying once the old token is
removed. The key is never logged, nor held anywhere but here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from mom_service.settings import Settings

_DERIVED = b"mom-thinking-signature\0"
_LINKS = b"mom-progress-link"


def signing_key(settings: Settings) -> bytes:
    if settings.mom_signing_key is not None and settings.mom_signing_key.get_secret_value():
        return settings.mom_signing_key.get_secret_value().encode()
    return hashlib.sha256(_DERIVED + b"\0".join(sorted(settings.api_tokens))).digest()


class ThinkingSigner:
    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def from_settings(cls, settings: Settings) -> ThinkingSigner:
        return cls(signing_key(settings))

    def sign(self, thinking: str) -> str:
        digest = hmac.new(self._key, thinking.encode(), hashlib.sha256).digest()
        return base64.b64encode(digest).decode()

    def verify(self, thinking: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(thinking).encode(), signature.encode())

    def __repr__(self) -> str:  # never the key
        return "ThinkingSigner(<key>)"


class LinkSigner:
    """The link tokens of progress streams: one per run id, under a key derived from the signing key for this use
    alone (a link token is never a thinking block's signature, nor the other way)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = hmac.new(key, _LINKS, hashlib.sha256).digest()

    @classmethod
    def from_settings(cls, settings: Settings) -> LinkSigner:
        return cls(signing_key(settings))

    def token(self, run_id: str) -> str:
        digest = hmac.new(self._key, run_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def verify(self, run_id: str, token: str) -> bool:
        return hmac.compare_digest(self.token(run_id).encode(), token.encode())

    def __repr__(self) -> str:  # never the key
        return "LinkSigner(<key>)"
