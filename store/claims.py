"""Claims: any number of writers (torchrun ranks, job-array tasks, spot machines) share the units of one store.

Before computing a unit, a writer claims it by creating ``claims/<split>/eEEEEEE-sSSSSSS/NNNN.json``
*exclusively*: of many racing writers exactly one succeeds. A claim holds its owner and an expiry
time that a heartbeat thread pushes forward while the owner lives; when the owner dies, the claim
expires (at once when the owner was a process on this same host that no longer runs) and the next
writer takes the unit over by creating the next attempt number, again exclusively. So no unit is
computed twice while its claim is alive, and a killed writer's unit is computed by another. Claims
are deleted once the unit's done record is written.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from store.objects import Objects

CLAIMS = "claims"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that pid runs (a process of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_id() -> str:
    """This process, uniquely: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _unit_prefix(split: str, epoch: int, shard: int) -> str:
    return f"{CLAIMS}/{split}/e{epoch:06d}-s{shard:06d}"


def alive(claim: dict, now: float | None = None) -> bool:
    """Whether a claim still holds: not expired, and not owned by a process of this host that has died."""
    if float(claim.get("expires", 0)) <= (time.time() if now is None else now):
        return False
    host, _, rest = str(claim.get("owner", "")).partition(":")
    pid = rest.partition(":")[0]
    return not (host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)))


@dataclass
class Claims:
    """The claims one process holds on one store, kept alive by a heartbeat thread (use as a context)."""

    objs: Objects
    ttl: float = 120.0
    owner: str = field(default_factory=owner_id)
    held: dict[tuple[str, int, int], str] = field(default_factory=dict)
    taken_over: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.ttl}).encode()

    def try_claim(self, split: str, epoch: int, shard: int) -> bool:
        """Claim a unit; False when another writer's claim on it is alive (or wins the race for it)."""
        prefix = _unit_prefix(split, epoch, shard)
        attempts = sorted(k for k in self.objs.list(prefix) if k.endswith(".json"))
        nxt = 0
        if attempts:
            last = attempts[-1]
            data = self.objs.get(last)
            if data is not None:
                try:
                    if alive(json.loads(data)):
                        return False
                except (ValueError, TypeError):
                    pass  # a claim being written or damaged: take the next attempt
            nxt = int(last.rsplit("/", 1)[-1][:-5]) + 1
        key = f"{prefix}/{nxt:04d}.json"
        with self._lock:
            if not self.objs.put(key, self._body(), exclusive=True):
                return False
            self.held[(split, epoch, shard)] = key
        self.taken_over += nxt > 0
        return True

    def release(self, split: str, epoch: int, shard: int) -> None:
        """Drop a claim (after the unit's record is written, or when giving the unit up): every attempt goes."""
        with self._lock:
            self.held.pop((split, epoch, shard), None)
        for key in self.objs.list(_unit_prefix(split, epoch, shard)):
            self.objs.delete(key)

    def renew(self) -> None:
        """Push every held claim's expiry forward (the heartbeat calls this every ttl / 4)."""
        with self._lock:
            for key in list(self.held.values()):
                self.objs.put(key, self._body())

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except OSError:  # a passing storage hiccup: the next beat tries again
                pass

    def __enter__(self) -> Claims:
        self._thread = threading.Thread(target=self._beat, name="claims-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for unit in list(self.held):
            self.release(*unit)
