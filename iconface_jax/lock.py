"""One trainer per workdir: a lock file naming its holder (host, pid, start time) with a heartbeat the holder refreshes.

A second trainer refuses to start while the holder is alive. A holder that died without releasing (SIGKILL, a
preempted host) is recognised by a heartbeat older than `stale_s` or, on the same host, by its process being gone,
and its lock is taken over. The file is read and written through `storage.path`, so a `gs://` workdir is locked
too; an object store has no exclusive create, so a new holder writes its record, waits `settle_s` and reads it back:
of two trainers that start together, the one whose record was overwritten refuses.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from iconface_jax import storage

LOCK_FILE = "trainer.lock"
HEARTBEAT_S = 30.0
STALE_S = 600.0  # twenty missed heartbeats: the holder is dead or cut off
SETTLE_S = 1.0  # longer than a write takes to become visible (GCS is read-after-write consistent)


class LockHeld(RuntimeError):
    """The workdir belongs to a running trainer."""


class WorkdirLock:
    """`workdir`/trainer.lock: `acquire` takes it (or raises `LockHeld`), a thread refreshes its heartbeat, and
    `release` (also run at exit, whatever the exit) removes it."""

    def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 settle_s: float = SETTLE_S):
        self.path = storage.path(workdir) / LOCK_FILE
        self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
        now = time.time()
        self.record = dict(host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now,
                           token=uuid.uuid4().hex)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Takes the lock; returns a line on a stale lock taken over, None otherwise. Raises `LockHeld` naming
        the holder while it is alive."""
        holder = self._read()
        takeover = None
        if holder is not None:
            stale = self._stale(holder)
            if stale is None:
                raise LockHeld(f"{self.path.parent} is in use by the trainer of {_describe(holder)}; stop it, or "
                               f"wait for its lock to go stale ({self.stale_s:.0f} s without a heartbeat) if it died")
            takeover = f"took over the lock of {_describe(holder)}: {stale}"
        self._write()
        time.sleep(self.settle_s)
        holder = self._read()
        if holder is None or holder.get("token") != self.record["token"]:
            raise LockHeld(f"{self.path.parent} was locked at the same time by the trainer of "
                           f"{_describe(holder or {})}")
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
        # At exit, also on an error: before the interpreter's thread pools close, which a bucket's client still needs
        # (atexit runs after them). `release` is idempotent.
        threading._register_atexit(self.release)  # the one hook that runs early enough
        return takeover

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if this trainer still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            holder = self._read()
            if holder is not None and holder.get("token") == self.record["token"]:
                self.path.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._read()
                if holder is None or holder.get("token") != self.record["token"]:
                    print(f"warning: the lock {self.path} was taken over by {_describe(holder or {})}; this "
                          "trainer no longer holds it", flush=True)
                    return
                self.record["heartbeat"] = time.time()
                self._write()
            except OSError as e:  # a passing storage error: the next beat tries again
                print(f"warning: heartbeat of {self.path} not written: {e}", flush=True)

    def _stale(self, holder: dict) -> str | None:
        """Why `holder` is dead, or None while it may be alive."""
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_s:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_s:.0f} s)"
        if holder.get("host") == self.record["host"]:
            pid = int(holder.get("pid", 0))
            if pid == os.getpid():  # a restarted container reuses its pids: this process cannot be the holder
                return f"process {pid} on this host is this one"
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"process {pid} on this host has exited"
            except PermissionError:  # another user's live process
                pass
        return None

    def _read(self) -> dict | None:
        """The lock file's record; None when there is none (a damaged one reads as a heartbeat of 0: stale)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return {"heartbeat": 0}

    def _write(self) -> None:
        if storage.is_remote(self.path):  # an object appears whole
            self.path.write_text(json.dumps(self.record))
            return
        # A file is truncated first, then written: a reader in between would see an empty lock. A rename is atomic.
        partial = self.path.with_name(f".{LOCK_FILE}.{self.record['token']}")
        partial.write_text(json.dumps(self.record))
        partial.replace(self.path)


def _describe(holder: dict) -> str:
    """'pid 123 on host, started 2026-12-07 19:40:00 UTC, heartbeat 12 s ago'."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder.get("started", 0))))
    age = time.time() - float(holder.get("heartbeat", 0))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {started}, heartbeat {age:.0f} s ago"
