"""`uvicorn mom_service.main:app` works, as in every FastAPI project: the app is built on first access (from the
environment, as `mom-service serve` builds it), not at import."""

from __future__ import annotations

from functools import cache
from typing import Any

from fastapi import FastAPI

from mom_service.api.app import create_app


@cache
def _default_app() -> FastAPI:
    return create_app()


def __getattr__(name: str) -> Any:
    if name == "app":
        return _default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
