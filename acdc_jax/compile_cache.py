"""JAX's persistent compilation cache, in a per-user folder, so a repeated run on the same shapes
loads its compiled code from disk instead of compiling it again.

The CLI turns it on for every command (``--no-compile-cache`` or ``ACDC_JAX_COMPILE_CACHE=0`` turn it
off); the library leaves JAX's settings alone unless you call :func:`enable_compile_cache` yourself.
Entries are keyed by JAX on the compiled program, the jax/jaxlib version and the device, so a cache
shared between shapes, versions or machines never serves the wrong code; it only grows, and deleting
the folder is always safe.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV_DIR = "ACDC_JAX_CACHE_DIR"
ENV_SWITCH = "ACDC_JAX_COMPILE_CACHE"


def default_cache_dir() -> Path:
    """``$ACDC_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/acdc-jax/jax``, else ``~/.cache/acdc-jax/jax``."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "acdc-jax" / "jax"


def cache_enabled_by_env() -> bool:
    """False when ``ACDC_JAX_COMPILE_CACHE`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at ``path`` (default: :func:`default_cache_dir`).

    Every compiled program is cached, however quick its compilation (JAX's default skips those under
    one second, which on a small model is most of them). Returns the folder, or None when it cannot
    be created (a read-only home, for instance): the run then compiles as usual.
    """
    folder = Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
