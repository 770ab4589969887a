"""The adapters one vLLM (or LoRAX) server has, and their files: the agent is their only writer.

An adapter is a directory under the agent's (memory-backed) root, named by a hash of its id,
holding ``adapter_model.safetensors``, ``adapter_config.json`` and ``name`` (the id, for
reconciling after a restart). It is written into a ``.tmp-*`` directory first and renamed into
place, so vLLM never reads a half-written adapter, and it exists exactly as long as vLLM has the
adapter registered: registered after the rename, deleted after unregistering.

Gateways *ensure* an adapter and hold a *lease* on it (holder, expiry), renewed while they
stream from it; a leased adapter is never unloaded. Room for a new adapter (at most
``max_adapters`` registered, ``max_bytes`` of files) is made by unloading the least recently
used unleased adapters: from vLLM first, then their files.

``reconcile`` makes files and registrations agree after either side restarted: adapters vLLM
has registered from one of our directories are kept (adopted, unleased); adapters vLLM has
that no file backs are unregistered; our adapters vLLM lost (it restarted) are registered
again; files nobody registered are deleted. One lock serialises every change.

A LoRAX server loads an adapter from its path on first use and lists none: there the holdings
are the agent's alone (registering and unregistering are no-ops), and after the agent restarts
its files are deleted and the gateways send their adapters again.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..backends.errors import AdapterProblem, BackendUnavailable
from .admin import ServerAdmin

log = logging.getLogger("tensafe.agent")
WEIGHTS, CONFIG, NAME = "adapter_model.safetensors", "adapter_config.json", "name"
DIR_MODE, FILE_MODE = 0o750, 0o640  # the pod's group (fsGroup) reads them: vLLM's container


@dataclasses.dataclass
class Holding:
    adapter_id: str
    path: Path
    size: int
    last_used: float
    leases: dict[str, float] = dataclasses.field(default_factory=dict)  # holder -> expiry (monotonic)

    def leased(self, now: float, besides: str | None = None) -> bool:
        return any(expiry > now for holder, expiry in self.leases.items() if holder != besides)


def directory_name(adapter_id: str) -> str:
    return hashlib.sha256(adapter_id.encode()).hexdigest()[:40]


class Holdings:
    def __init__(self, root: Path, server: ServerAdmin, *, max_adapters: int, max_bytes: int, max_lease_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.server = server
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.max_lease_s = max_lease_s
        self._clock = clock
        self._held: dict[str, Holding] = {}
        self._lock = asyncio.Lock()
        self.reconciled = False  # once vLLM has answered and both sides agree

    # ---- reading ------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return sum(h.size for h in self._held.values())

    def listing(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [{"adapter_id": h.adapter_id, "bytes": h.size, "path": str(h.path),
                 "leases": sum(1 for e in h.leases.values() if e > now)} for h in self._held.values()]

    def ids(self) -> list[str]:
        return list(self._held)

    # ---- leases -------------------------------------------------------------------------------
    def _lease(self, h: Holding, holder: str, ttl_s: float) -> None:
        now = self._clock()
        h.leases = {k: e for k, e in h.leases.items() if e > now}
        if ttl_s > 0:
            h.leases[holder] = now + min(ttl_s, self.max_lease_s)
        else:
            h.leases.pop(holder, None)
        h.last_used = now

    def renew(self, holder: str, ttl_s: float, ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Renew (ttl 0: release) ``holder``'s leases; (renewed, not held here)."""
        renewed, missing = [], []
        for adapter_id in ids:
            h = self._held.get(adapter_id)
            if h is None:
                missing.append(adapter_id)
            else:
                self._lease(h, holder, ttl_s)
                renewed.append(adapter_id)
        return renewed, missing

    # ---- changes ------------------------------------------------------------------------------
    async def ensure(self, adapter_id: str, weights: bytes, config: dict[str, Any], holder: str,
                     ttl_s: float) -> bool:
        """Hold ``adapter_id`` registered in vLLM, leased to ``holder``; True when it was new."""
        async with self._lock:
            held = self._held.get(adapter_id)
            if held is not None:
                self._lease(held, holder, ttl_s)
                return False
            size = len(weights) + len(json.dumps(config))
            if size > self.max_bytes:
                raise AdapterProblem(f"adapter {adapter_id!r}: {size} bytes exceed the agent's budget of "
                                     f"{self.max_bytes}", adapter_id, "invalid")
            await self._make_room(adapter_id, size)
            path = await asyncio.to_thread(self._write, adapter_id, weights, config)
            try:
                await self.server.load(adapter_id, str(path))
            except BaseException:
                await asyncio.to_thread(_remove, path)
                raise
            h = Holding(adapter_id, path, size, self._clock())
            self._lease(h, holder, ttl_s)
            self._held[adapter_id] = h
            log.info("adapter %s registered (%d bytes; %d held)", adapter_id, size, len(self._held))
            return True

    async def remove(self, adapter_id: str, holder: str = "") -> None:
        """Unregister and delete ``adapter_id``; refused (in_use) while another holder leases it."""
        async with self._lock:
            h = self._held.get(adapter_id)
            if h is None:
                raise AdapterProblem(f"adapter {adapter_id!r} is not held here", adapter_id, "not_found")
            if h.leased(self._clock(), besides=holder):
                raise AdapterProblem(f"adapter {adapter_id!r} is leased; unload refused", adapter_id, "in_use")
            await self._drop(h)

    async def _make_room(self, adapter_id: str, size: int) -> None:
        now = self._clock()
        victims = sorted((h for h in self._held.values() if not h.leased(now)), key=lambda h: h.last_used)
        while len(self._held) + 1 > self.max_adapters or self.size + size > self.max_bytes:
            if not victims:
                raise AdapterProblem(f"no room for adapter {adapter_id!r}: {len(self._held)} adapters "
                                     f"({self.size} bytes) held, every one leased", adapter_id, "slots_full")
            await self._drop(victims.pop(0))

    async def _drop(self, h: Holding) -> None:
        await self.server.unload(h.adapter_id)  # vLLM first: it may reread the files until then
        del self._held[h.adapter_id]
        await asyncio.to_thread(_remove, h.path)
        log.info("adapter %s unloaded and deleted (%d held)", h.adapter_id, len(self._held))

    def _write(self, adapter_id: str, weights: bytes, config: dict[str, Any]) -> Path:
        final = self.root / directory_name(adapter_id)
        tmp = self.root / f".tmp-{secrets.token_hex(8)}"
        tmp.mkdir(mode=DIR_MODE)
        try:
            for name, data in ((WEIGHTS, weights), (CONFIG, json.dumps(config).encode()),
                               (NAME, adapter_id.encode())):
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            _remove(final)  # left by a crash between its registration and ours
            os.rename(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
        return final

    # ---- start-up and restarts ----------------------------------------------------------------
    def prepare(self) -> None:
        """Create the root; delete what a crash left half-written."""
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-"):
                _remove(entry)

    async def reconcile(self) -> None:
        """Make our files and vLLM's registrations agree (BackendUnavailable while vLLM is down)."""
        async with self._lock:
            if self.server.lists_adapters:
                registered = await self.server.registered()
            else:  # LoRAX: what we hold is all there is
                registered = {h.adapter_id: str(h.path) for h in self._held.values()}
            on_disk = await asyncio.to_thread(self._scan)
            for adapter_id, root in registered.items():
                path = on_disk.get(adapter_id)
                if adapter_id in self._held:
                    continue
                if path is not None and os.path.realpath(root) == os.path.realpath(path):
                    self._held[adapter_id] = Holding(adapter_id, path, _size(path), self._clock())
                    log.info("adapter %s adopted: vLLM has it registered from its files", adapter_id)
                else:
                    log.warning("adapter %s is registered in vLLM but no file of ours backs it: unloading",
                                adapter_id)
                    await self.server.unload(adapter_id)
            for adapter_id, h in list(self._held.items()):
                if adapter_id not in registered:
                    if h.path.is_dir():
                        log.warning("adapter %s was lost by vLLM (restarted?): registering it again", adapter_id)
                        try:
                            await self.server.load(adapter_id, str(h.path))
                        except AdapterProblem:
                            del self._held[adapter_id]
                            await asyncio.to_thread(_remove, h.path)
                    else:
                        del self._held[adapter_id]
            kept = {h.path.name for h in self._held.values()}
            for path in on_disk.values():
                if path.name not in kept:
                    log.info("deleting %s: no registered adapter", path.name)
                    await asyncio.to_thread(_remove, path)
            self.reconciled = True

    def _scan(self) -> dict[str, Path]:
        """Our adapter directories: id -> path (a directory without its name file is deleted)."""
        found: dict[str, Path] = {}
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                adapter_id = (entry / NAME).read_text()
            except OSError:
                _remove(entry)
                continue
            if entry.name == directory_name(adapter_id):
                found[adapter_id] = entry
            else:
                _remove(entry)
        return found

    async def run_reconciler(self, interval_s: float) -> None:
        """Reconcile now and every ``interval_s`` (vLLM may start later, or restart)."""
        while True:
            try:
                await self.reconcile()
            except BackendUnavailable as exc:
                if self.reconciled:
                    log.warning("reconcile: %s", exc)
                self.reconciled = False
            await asyncio.sleep(interval_s)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name != NAME)
