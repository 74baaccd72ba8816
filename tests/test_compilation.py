"""The persistent compilation cache: a second start reads what the first compiled; the environment's directory wins;
"none" turns it off. Counted from JAX's own monitoring events and the cache directory's files."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ROOT, env_with, run_train

pytestmark = pytest.mark.subprocess

# Compiles two programs through `compilation.compile_all` after `compilation.enable(argv[1])`, then prints JAX's
# count of cache hits and of compiles that consulted the cache.
PROGRAM = """
import sys, collections, jax, jax.numpy as jnp
from iconface_jax import compilation
events = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **_: events.update([event]))
compilation.enable(sys.argv[1])
x = jnp.ones((8, 8))
compilation.compile_all({"matmul": lambda: jax.jit(lambda a: jnp.sin(a) @ a.T).lower(x),
                         "cosine": lambda: jax.jit(jnp.cos).lower(x)})
print("hits", events["/jax/compilation_cache/cache_hits"], "requests",
      events["/jax/compilation_cache/compile_requests_use_cache"])
"""


def start(directory: str, tmp_path, **env) -> str:
    """One process running PROGRAM with the cache at `directory`; its stdout."""
    environment = {k: v for k, v in env_with().items() if not k.startswith(("JAX_PERSISTENT_CACHE", "JAX_COMPILATION"))}
    environment.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "xdg"), **env)
    out = subprocess.run([sys.executable, "-c", PROGRAM, directory], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=environment)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_second_start_hits_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = start(str(cache), tmp_path)
    assert "hits 0 requests" in first and "(from the compilation cache)" not in first, first
    assert any(name.startswith("jit_cos") for name in os.listdir(cache))  # below JAX's 1 s default: cached too
    second = start(str(cache), tmp_path)
    requests = int(second.split("requests")[1])
    assert requests > 0 and f"hits {requests} requests" in second, second  # every compile read from the cache
    assert second.count("(from the compilation cache)") == 2, second


def test_environment_directory_wins_and_none_is_off(tmp_path):
    given, env_dir = tmp_path / "given", tmp_path / "from_env"
    start(str(given), tmp_path, JAX_COMPILATION_CACHE_DIR=str(env_dir))
    assert os.listdir(env_dir) and not given.exists()
    off = start("none", tmp_path)
    assert "requests 0" in off, off
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "none").exists()


def test_second_start_of_the_demo_reads_every_program_from_the_cache(toy_run, tmp_path):
    """The session's toy run (in the shared compilation cache, helpers.CACHE) compiled the trainer's programs; a
    second start of the same config in another workdir reads each one, as JAX itself logs, and says so on its
    progress lines."""
    out = run_train(tmp_path / "again", "--config.train.steps=6", "--config.log.checkpoint_every=100",
                    "--config.train.stop_at=1", env={"JAX_LOG_COMPILES": "1"})
    hits = out.stderr.count("Persistent compilation cache hit for 'jit_train_step'")
    assert hits == 2 and out.stderr.count("Persistent compilation cache hit for 'jit_run'") == 2, out.stderr[-3000:]
    for encoder in ("jit_encode", "jit_embed"):
        assert out.stderr.count(f"Persistent compilation cache hit for '{encoder}'") == 1, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("compiled ")]
    assert sorted(line.split(" in ")[0] for line in lines) == [
        "compiled embed faces", "compiled encode images", "compiled sample grid R=0", "compiled sample grid R=1",
        "compiled train step R=0", "compiled train step R=1"]
    assert all(line.endswith("(from the compilation cache)") for line in lines), lines


RETAINED_HEAP = """
import ctypes, os, threading
from iconface_jax import compilation
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def compile_like():  # many mid-sized blocks on a worker thread's arena, one kept at its top, as XLA's compiles leave it
    blocks = [libc.malloc(60000) for _ in range(5000)]
    for b in blocks:
        ctypes.memset(b, 1, 60000)
    libc.malloc(100)
    for b in blocks:
        libc.free(b)

thread = threading.Thread(target=compile_like)
thread.start()
thread.join()
before = rss_mb()
compilation.release_host_memory()
print(before, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's arenas")
def test_release_host_memory_returns_what_a_worker_thread_freed():
    """300 MB freed on a worker thread stays in the process until `release_host_memory` hands it back."""
    out = subprocess.run([sys.executable, "-c", RETAINED_HEAP], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    before, after = map(float, out.stdout.split())
    assert before - after > 150, (before, after)
