"""Claims: any number of writers (torchrun ranks, job-array tasks, spot machines) share the units of one store.

Before computing a unit, a writer claims it by creating ``claims/<split>/eEEEEEE-sSSSSSS/NNNN.json``
*exclusively* (a conditional PUT on object stores, ``os.link`` locally): of many racing writers exactly one
succeeds, and a conflict (S3's 409 on racing conditional writes) is a lost race. The claim's body names its
owner and a heartbeat counter that a thread of the owner bumps every ``ttl / 4`` seconds, so the object
changes (a new ETag, a new mtime) while its owner lives.

Whether a claim is alive is decided without comparing clocks: a writer lists the claims once per round and
remembers when, on its *own* monotonic clock, it first saw each claim's current version; a claim that has not
changed for ``ttl`` seconds of that clock is dead (after a third of it when its owner was a process on this same
host that no longer runs), and the next writer takes the unit over by creating the next attempt number, again
exclusively. Skewed wall clocks cannot make a live claim look dead. Before a writer marks a unit done it checks
that its attempt is still the unit's latest (a *fence*: a writer cut off long enough to lose its claim does not
write a done record), and when it lets go it deletes its own attempt and the ones it took over, never a later
one.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field

from store.objects import Objects
from store.provenance import StoreError

CLAIMS = "claims"
Unit = tuple[str, int, int]


class ClaimLost(StoreError):
    """A writer's claim on a unit was taken over (it was cut off from the storage for longer than the claim's
    ttl): it must not mark the unit done."""


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


def unit_prefix(split: str, epoch: int, shard: int) -> str:
    return f"{CLAIMS}/{split}/e{epoch:06d}-s{shard:06d}"


def _unit_of(key: str) -> tuple[Unit, int] | None:
    """(unit, attempt number) of a claim key; None for anything else under ``claims/``."""
    parts = key.split("/")
    if len(parts) != 4 or not parts[3].endswith(".json") or not parts[3][:-5].isdigit():
        return None
    e, _, s = parts[2].removeprefix("e").partition("-s")
    if not (e.isdigit() and s.isdigit()):
        return None
    return (parts[1], int(e), int(s)), int(parts[3][:-5])


def _dead_local_owner(body: bytes | None) -> bool:
    """Whether a claim's owner is a process of this host that no longer runs."""
    try:
        host, _, rest = str(json.loads(body or b"{}").get("owner", "")).partition(":")
    except (ValueError, TypeError, AttributeError):
        return False
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


@dataclass
class Claims:
    """The claims one process holds on one store, kept alive by a heartbeat thread (use as a context)."""

    objs: Objects
    ttl: float = 120.0
    owner: str = field(default_factory=owner_id)
    held: dict[Unit, str] = field(default_factory=dict)
    taken_over: int = 0
    latest: dict[Unit, tuple[int, str, str]] = field(default_factory=dict)
    """From the last :meth:`refresh`: each claimed unit's latest attempt (number, key, version)."""
    seen: dict[str, tuple[str, float]] = field(default_factory=dict)
    """claim key -> (its version, when this process first saw that version, on its monotonic clock)."""
    checked: set[str] = field(default_factory=set)
    """Stale-looking claims whose owner this process has looked up."""
    dead: set[str] = field(default_factory=set)
    """Claims whose owner is a process of this host that no longer runs."""
    beats: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "beat": self.beats, "at": time.time()}).encode()

    def refresh(self) -> None:
        """One listing of every claim of the store (with each object's version): what :meth:`try_claim` uses."""
        latest: dict[Unit, tuple[int, str, str]] = {}
        now = time.monotonic()
        for key, version in self.objs.versions(CLAIMS).items():
            parsed = _unit_of(key)
            if parsed is None:
                continue
            unit, n = parsed
            if unit not in latest or n > latest[unit][0]:
                latest[unit] = (n, key, version)
            if self.seen.get(key, ("", 0.0))[0] != version:
                self.seen[key] = (version, now)
        self.latest = latest

    def _alive(self, key: str) -> bool:
        """Alive unless unchanged for ``ttl`` on this process's clock, or (unchanged for a third of it, looked up
        once) owned by a process of this host that no longer runs."""
        if key in self.dead:
            return False
        _, since = self.seen.get(key, ("", time.monotonic()))
        age = time.monotonic() - since
        if age >= self.ttl:
            return False
        if age > self.ttl / 3 and key not in self.checked:
            self.checked.add(key)
            if _dead_local_owner(self.objs.get(key)):
                self.dead.add(key)
                return False
        return True

    def wants(self, unit: Unit) -> bool:
        """Whether this writer takes part in computing (or packing) ``unit``: every cooperating writer does."""
        return True

    def try_claim(self, split: str, epoch: int, shard: int) -> bool:
        """Claim a unit from the last :meth:`refresh`; False when another writer's claim on it is alive (or wins
        the race for it)."""
        unit = (split, epoch, shard)
        nxt = 0
        if unit in self.latest:
            n, key, _ = self.latest[unit]
            if key in self.held.values() or self._alive(key):
                return False
            nxt = n + 1
        key = f"{unit_prefix(*unit)}/{nxt:04d}.json"
        with self._lock:
            if not self.objs.put(key, self._body(), exclusive=True):
                return False
            self.held[unit] = key
        self.latest[unit] = (nxt, key, "")
        self.taken_over += nxt > 0
        return True

    def fence(self, split: str, epoch: int, shard: int) -> bool:
        """Whether this process still holds the unit: its attempt is there, still its own, and no later attempt
        exists (attempts are numbered in order). Call it right before marking the unit done."""
        key = self.held.get((split, epoch, shard))
        if key is None:
            return False
        try:
            mine = json.loads(self.objs.get(key) or b"{}").get("owner") == self.owner
        except (ValueError, TypeError, AttributeError):
            mine = False
        number = int(key.rsplit("/", 1)[-1][:-5])
        return mine and self.objs.get_range(f"{unit_prefix(split, epoch, shard)}/{number + 1:04d}.json", 0, 1) is None

    def release(self, split: str, epoch: int, shard: int) -> None:
        """Let go of a unit: delete this process's attempt and the ones it took over, never a later one."""
        with self._lock:
            key = self.held.pop((split, epoch, shard), None)
        if key is None:
            return
        number = int(key.rsplit("/", 1)[-1][:-5])
        for n in range(number, -1, -1):
            self.objs.delete(f"{unit_prefix(split, epoch, shard)}/{n:04d}.json")

    def renew(self) -> None:
        """Change every held claim (a new heartbeat count): other writers see it alive."""
        with self._lock:
            self.beats += 1
            for key in list(self.held.values()):
                self.objs.put(key, self._body())

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except Exception:  # a storage that does not answer: keep trying; this process's next request fails
                pass  # with a message, and a writer that lost its claims meanwhile is stopped by the fence

    def __enter__(self) -> Claims:
        self._thread = threading.Thread(target=self._beat, name="claims-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for unit in list(self.held):
            try:
                self.release(*unit)
            except Exception:  # the storage is gone: these claims stop changing and die after ttl
                if exc[0] is None:
                    raise


class StaticPart(Claims):
    """Claims for a writer that fills part ``index`` of ``parts`` of a store on its own (``distill teacher --part
    i/n``: a job array on storage without conditional writes): it takes every unit of its part, and no other."""

    def __init__(self, objs: Objects, index: int, parts: int) -> None:
        super().__init__(objs, ttl=3600.0)
        self.index, self.parts = index, parts

    def refresh(self) -> None:
        pass

    def wants(self, unit: Unit) -> bool:
        return part_of(unit, self.parts) == self.index

    def try_claim(self, split: str, epoch: int, shard: int) -> bool:
        return self.wants((split, epoch, shard))

    def fence(self, split: str, epoch: int, shard: int) -> bool:
        return True

    def release(self, split: str, epoch: int, shard: int) -> None:
        pass

    def renew(self) -> None:
        pass


def part_of(unit: Unit, parts: int) -> int:
    """The part (of ``parts``) a unit belongs to in a static split: a hash of the unit, the same in every process."""
    split, epoch, shard = unit
    return zlib.crc32(f"{split}:{epoch}:{shard}".encode()) % parts


def conditional_writes_hold(objs: Objects) -> bool:
    """Whether the storage honours exclusive creates (``If-None-Match``): a probe object written twice, the second
    time exclusively, must be refused. Some S3-compatible servers ignore the header: on them every claimant would
    win."""
    key = f"{CLAIMS}/probe-{uuid.uuid4().hex}"
    try:
        objs.put(key, b"1", exclusive=True)
        return not objs.put(key, b"2", exclusive=True)
    finally:
        objs.delete(key)
