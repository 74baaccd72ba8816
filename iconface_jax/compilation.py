"""Compiling ahead: the persistent compilation cache, and a run's programs compiled in parallel before step 1.

    compilation.enable(cfg.compile_cache)      # before anything compiles; "" or "none": off
    programs = compilation.compile_all({"train step R=0": lambda: step.lower(*args), ...})

JAX's cache (local or gs://) keys a compiled program by its HLO, compile options, devices and the jax and XLA
versions, so a restarted run reads every program it compiled before instead of compiling it again. In a
multi-process run only process 0 writes entries (JAX's rule) and every process reads them: the directory must
be one all hosts see (the trainer's default is its workdir's compile_cache/).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

import jax

OFF = ("", "none")
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_ENV = "JAX_COMPILATION_CACHE_DIR"
_seen = threading.local()  # cache hits counted per compiling thread (each compile reports in its own thread)


def default_dir() -> str:
    """The tools' default cache: iconface_jax/jax_cache under $XDG_CACHE_HOME (~/.cache), kept across runs."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "iconface_jax", "jax_cache")


def add_flag(parser: argparse.ArgumentParser) -> None:
    """`--compile-cache DIR` on an argparse tool (restore, evaluate, demo_check)."""
    parser.add_argument("--compile-cache", default=default_dir(), metavar="DIR",
                        help=f"persistent compilation cache, local or gs:// (default {default_dir()}); "
                             f"'' or none: off; ${_ENV} overrides it")


def enable(directory: str, min_compile_s: float = 0.0) -> str | None:
    """Points JAX's persistent compilation cache at `directory`, for every program that took `min_compile_s` or
    more to compile, whatever its size (0: all, the trainer's choice: its small CPU programs and the eager ops of
    its start are read back too). An explicit $JAX_COMPILATION_CACHE_DIR wins (JAX read it at import), as do
    thresholds set in JAX's environment variables. Returns the directory in use, or None when the cache is off
    ("" or "none"). Call it before the first compile."""
    directory = os.environ.get(_ENV) or directory
    off = directory.strip().lower() in OFF
    jax.config.update("jax_enable_compilation_cache", not off)  # off: no cache keys computed either
    if off:
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no minimum, and no override of it
    return directory


def _count_hit(event: str, **_) -> None:
    if event == _HIT_EVENT:
        _seen.hits = getattr(_seen, "hits", 0) + 1


jax.monitoring.register_event_listener(_count_hit)


def compile_timed(lower: Callable[[], jax.stages.Lowered]) -> tuple[jax.stages.Compiled, float, bool]:
    """`lower().compile()`: the executable, the seconds it took and whether it came from the persistent cache."""
    start, before = time.perf_counter(), getattr(_seen, "hits", 0)
    compiled = lower().compile()
    return compiled, time.perf_counter() - start, getattr(_seen, "hits", 0) > before


def release_host_memory() -> None:
    """Returns the heap a finished compile freed to the OS. XLA compiles on its own threads, whose glibc arenas
    keep freed memory: after klein-4B's first train step for a v5e-64 (peak 12.2 GB) the process held 10.4 GB,
    3.8 GB after `malloc_trim` (docs/performance.md#compile-time-and-host-memory). No-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl, macOS: no glibc arenas to trim
        pass


def compile_all(programs: dict[str, Callable[[], jax.stages.Lowered]]) -> dict[str, jax.stages.Compiled]:
    """Each program's executable, compiled in parallel threads (XLA compiles outside the GIL), with one progress
    line each as it finishes. Tracing and lowering run in the calling thread first: they need its mesh context."""
    lowered = {}
    for name, lower in programs.items():
        lowered[name] = lower()
    compiled = {}
    with ThreadPoolExecutor(max_workers=max(len(lowered), 1)) as pool:
        futures = {pool.submit(compile_timed, lambda low=low: low): name for name, low in lowered.items()}
        for future in as_completed(futures):
            name = futures[future]
            compiled[name], seconds, cached = future.result()
            print(f"compiled {name} in {seconds:.1f} s{' (from the compilation cache)' if cached else ''}", flush=True)
    release_host_memory()
    return {name: compiled[name] for name in programs}
