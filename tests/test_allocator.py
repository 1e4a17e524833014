"""Memory allocator set-up: tcmalloc when installed (re-exec), else glibc mallopt, else nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ensc.engine.allocator import preload_env, tcmalloc_library

GLIBC = sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "_ENSC_MALLOC_REEXEC")}
    return {**env, **extra}


def test_malloc_tuning_applies_once_and_can_be_turned_off() -> None:
    code = "from ensc.engine.allocator import tune_malloc as t; print(t()); print(t())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_clean_env()
    )
    first, second = out.stdout.split("\n")[:2]
    assert first == second
    if GLIBC:
        assert first == "glibc: mmap off, no trim"
    env = _clean_env(ENSC_MALLOC="system")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.startswith("system (ENSC_MALLOC)")


def _allocator_of_cli(env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "ensc.cli", "--debug", "train", "--help"],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return next(line for line in proc.stderr.splitlines() if "memory allocator" in line)


@pytest.mark.skipif(tcmalloc_library() is None, reason="tcmalloc is not installed")
def test_cli_reexecutes_itself_under_tcmalloc() -> None:
    assert "tcmalloc" in preload_env(_clean_env())["LD_PRELOAD"]
    assert "preloaded libtcmalloc" in _allocator_of_cli(_clean_env())
    assert "ENSC_MALLOC" in _allocator_of_cli(_clean_env(ENSC_MALLOC="system"))


def test_user_preloaded_allocator_is_left_alone() -> None:
    env = _clean_env(LD_PRELOAD="libjemalloc.so.2")
    assert preload_env(env)["LD_PRELOAD"] == "libjemalloc.so.2"
