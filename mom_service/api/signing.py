"""The signature of a thinking block (Anthropic's Messages surface): HMAC-SHA256 of its text, base64, so that a
block a client sends back can be told apart from one it wrote or changed.

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


class ThinkingSigner:
    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def from_settings(cls, settings: Settings) -> ThinkingSigner:
        if settings.mom_signing_key is not None and settings.mom_signing_key.get_secret_value():
            return cls(settings.mom_signing_key.get_secret_value().encode())
        return cls(hashlib.sha256(_DERIVED + b"\0".join(sorted(settings.api_tokens))).digest())

    def sign(self, thinking: str) -> str:
        digest = hmac.new(self._key, thinking.encode(), hashlib.sha256).digest()
        return base64.b64encode(digest).decode()

    def verify(self, thinking: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(thinking).encode(), signature.encode())

    def __repr__(self) -> str:  # never the key
        return "ThinkingSigner(<key>)"
