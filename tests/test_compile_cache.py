"""The CLI's persistent compilation cache: a second run on the same shapes reads compiled code from it."""

import os
import subprocess
import sys

from acdc_jax.compile_cache import cache_enabled_by_env, default_cache_dir

COMMAND = [sys.executable, "-m", "acdc_jax.cli", "discover", "--task", "tracr-reverse", "--method", "eap"]


def _run(cache_dir, *extra):
    env = {**os.environ, "ACDC_JAX_CACHE_DIR": str(cache_dir), "ACDC_JAX_COMPILE_CACHE": "1",
           "JAX_LOG_COMPILES": "0"}
    for name in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(name, None)  # the test suite's own cache (conftest) must not stand in for the CLI's
    out = subprocess.run(COMMAND + list(extra), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _entries(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_second_run_reuses_the_cache_and_prints_the_same_circuit(tmp_path):
    cache = tmp_path / "cache"
    first = _run(cache)
    written = _entries(cache)
    assert written, "the first run wrote nothing to the compilation cache"
    second = _run(cache)
    assert _entries(cache) == written, "the repeated run compiled programs the first one had cached"
    timed = ("metric done", " s")  # the progress bar's elapsed time, the summary's seconds
    strip = lambda text: [line for line in text.splitlines() if not line.rstrip().endswith(timed) and "metric done" not in line]  # noqa: E731
    assert strip(second) == strip(first)


def test_no_compile_cache_writes_nothing(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "ACDC_JAX_CACHE_DIR": str(cache), "ACDC_JAX_COMPILE_CACHE": "1"}
    for name in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "acdc_jax.cli", "--no-compile-cache"] + COMMAND[3:]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _entries(cache) == []


def test_cache_location_and_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("ACDC_JAX_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("ACDC_JAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "acdc-jax" / "jax"
    for off in ("0", "false", "OFF", "no"):
        monkeypatch.setenv("ACDC_JAX_COMPILE_CACHE", off)
        assert not cache_enabled_by_env()
    monkeypatch.setenv("ACDC_JAX_COMPILE_CACHE", "1")
    assert cache_enabled_by_env()
