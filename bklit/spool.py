"""The local spool: where accepted operations wait while Redis cannot take them.

When a batch for Redis fails (down, too slow, out of memory), the producer
appends its operations here instead, and acks the events once the spool
has synced them to disk; a replayer later moves them into Redis in order
(see ``queue.StreamProducer``).

On disk, ``spool_dir`` holds segment files named
``<nanoseconds>-<random>.spool``, oldest first by name, and ``id``, the
spool's random name (Redis remembers under it which batches it applied).
A segment is a sequence of records (``bklit.records``).

Appends are whole records written from the reactor thread; ``fsync`` runs
in a thread of the spool's own, one at a time, and covers every record
written before it started, so a burst of events costs one sync.  A record
cut short by a crash or a full disk is removed when the spool is opened;
records whose sync failed are cut at once (their events were refused), and
the next append starts a new segment.  A segment that cannot be read is
moved aside as ``<name>.damaged``.  A lock on ``spool_dir/lock`` keeps a
second daemon out of the directory.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from bklit.records import decode, encode, whole_length

SUFFIX = ".spool"
SEGMENT_BYTES = 64 << 20
READ_BYTES = 1 << 20


class SpoolError(Exception):
    """The spool cannot take more (full, or the disk failed); nothing was acked."""


class SpoolFull(SpoolError):
    """The spool reached ``spool_max_bytes``."""


class Spool:
    """Append-only segments in one directory, synced in groups.

    ``open`` (before the reactor runs), ``start`` and ``close`` (at stop)
    bracket its use; between them everything runs in the reactor thread
    except ``fsync``.
    """

    log = Logger()

    def __init__(self, directory: str, max_bytes: int, reactor: Any, segment_bytes: int = SEGMENT_BYTES):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.reactor = reactor
        self.segment_bytes = segment_bytes
        self.sizes: dict[str, int] = {}
        self.id = ""
        self.trouble = ""
        self._durable: dict[str, int] = {}
        self._lock: Any = None
        self._tail: str | None = None
        self._fd: int | None = None
        self._unsynced: list[defer.Deferred] = []
        self._dirty: set[int] = set()
        self._retired: set[int] = set()
        self._syncing: defer.Deferred | None = None
        self._pool = ThreadPool(1, 1, name="bklit-spool")
        self._shutdown: Any = None
        self._closed = False

    # Start and stop ------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory and cut torn records; raises SpoolError (one line)."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock = open(self.directory / "lock", "a")
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.id = self._read_id()
            names = sorted(p.name for p in self.directory.glob("*" + SUFFIX))
            for name in names:
                self.sizes[name] = (self.directory / name).stat().st_size
            if names:  # only the newest can end in a record cut short (older damage: see read)
                path = self.directory / names[-1]
                whole = whole_length(path)
                if whole < self.sizes[names[-1]]:
                    self.log.warn("spool: cut {cut} bytes of an incomplete record from {name}",
                                  cut=self.sizes[names[-1]] - whole, name=names[-1])
                    os.truncate(path, whole)
                    self.sizes[names[-1]] = whole
            self._durable = dict(self.sizes)
        except BlockingIOError:
            self._unlock()
            raise SpoolError(f"{self.directory} is in use by another bklit process") from None
        except OSError as e:
            self._unlock()
            raise SpoolError(f"cannot use {self.directory}: {e.strerror or e}") from None

    def _read_id(self) -> str:
        path = self.directory / "id"
        if not path.exists():
            fresh = path.with_suffix(".new")
            fresh.write_text(secrets.token_hex(8) + "\n")
            os.replace(fresh, path)
        return path.read_text().strip()

    def start(self) -> None:
        """Start the sync thread (after twistd forked, so not in ``open``).

        Should ``close`` never run (a failed start), the reactor's shutdown
        stops the thread, which would otherwise keep the process alive.
        """
        self._pool.start()
        self._shutdown = self.reactor.addSystemEventTrigger("during", "shutdown", self._stop_pool)

    def close(self) -> defer.Deferred:
        """Wait for the last sync, then release the files and the lock."""
        return defer.ensureDeferred(self._close())

    async def _close(self) -> None:
        self._closed = True
        while self._syncing is not None or self._unsynced:
            await (self._syncing or self._sync())
        self._stop_pool()
        self.reactor.removeSystemEventTrigger(self._shutdown)
        for fd in self._retired | ({self._fd} if self._fd is not None else set()):
            os.close(fd)
        self._retired.clear()
        self._fd = self._tail = None
        self._unlock()

    def _stop_pool(self) -> None:
        if self._pool.started:
            self._pool.stop()

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # Appending ---------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes spooled and not yet removed."""
        return sum(self.sizes.values())

    @property
    def empty(self) -> bool:
        """Whether nothing waits in the spool."""
        return not any(self.sizes.values())

    def append(self, ops: list[list[str]]) -> defer.Deferred:
        """Write ``ops`` in order; fires once they are on disk.

        Fails with ``SpoolFull`` past ``max_bytes`` and with ``SpoolError``
        when the disk refuses; then nothing of ``ops`` stays in the spool.
        """
        if self._closed:
            return defer.fail(SpoolError("the local spool is closed (shutting down)"))
        data = b"".join(encode(op) for op in ops)
        if self.size + len(data) > self.max_bytes:
            self._report("full", f"the spool reached its cap of {self.max_bytes} bytes")
            return defer.fail(SpoolFull("the local spool is full"))
        try:
            self._write(data)
        except OSError as e:
            self._report("disk", f"cannot write to {self.directory}: {e.strerror or e}")
            return defer.fail(SpoolError("the local spool cannot be written"))
        if self.trouble:
            self.log.info("spool: writing again")
            self.trouble = ""
        d: defer.Deferred = defer.Deferred()
        self._unsynced.append(d)
        if self._syncing is None:
            self._sync()
        return d

    def _write(self, data: bytes) -> None:
        if self._tail is None or self.sizes.get(self._tail, 0) >= self.segment_bytes:
            self._rotate()
        assert self._fd is not None and self._tail is not None
        before = self.sizes[self._tail]
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:
            try:
                os.ftruncate(self._fd, before)
            except OSError:  # the partial record stays: never append after it
                self.log.failure("spool: cannot cut a partial record from {name}", name=self._tail)
                self._abandon_tail()
            raise
        self.sizes[self._tail] = before + len(data)
        self._dirty.add(self._fd)

    def _rotate(self) -> None:
        """Start a new segment, named after the newest one."""
        newest = max((int(n.split("-")[0]) for n in self.sizes), default=0)
        name = f"{max(time.time_ns(), newest + 1):020d}-{secrets.token_hex(4)}{SUFFIX}"
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        if self._fd is not None:
            self._retire(self._fd)
        self._fd, self._tail = fd, name
        self.sizes[name] = 0
        self._dirty.add(-1)  # the directory entry too

    def _abandon_tail(self) -> None:
        """Append to a new segment from now on."""
        if self._fd is not None:
            self._retire(self._fd)
        self._fd = self._tail = None

    def _retire(self, fd: int) -> None:
        """Close a segment's descriptor once no sync needs it."""
        if fd in self._dirty or self._syncing is not None:
            self._retired.add(fd)
        else:
            os.close(fd)

    def _report(self, kind: str, message: str) -> None:
        """Log a refusal once, not for every event it refuses."""
        if self.trouble != kind:
            self.trouble = kind
            self.log.error("spool: {message}; events are refused (overloaded) until it can write again",
                           message=message)

    # Syncing -------------------------------------------------------------------

    def _sync(self) -> defer.Deferred:
        """fsync what was written; then fire its waiters and start the next round."""
        waiters, self._unsynced = self._unsynced, []
        fds, self._dirty = self._dirty, set()
        d = self._syncing = deferToThreadPool(self.reactor, self._pool, self._thd_sync, sorted(fds),
                                              str(self.directory))
        d.addBoth(self._synced, waiters, dict(self.sizes))
        return d

    @staticmethod
    def _thd_sync(fds: list[int], directory: str) -> None:
        for fd in fds:
            if fd == -1:
                dir_fd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            else:
                os.fsync(fd)

    def _synced(self, outcome: Any, waiters: list[defer.Deferred], covered: dict[str, int]) -> None:
        self._syncing = None
        if isinstance(outcome, Failure):
            self._report("sync", f"cannot sync {self.directory}: {outcome.getErrorMessage()}")
            waiters += self._unsynced
            self._unsynced = []
            self._cut_unsynced()
            for d in waiters:
                d.errback(SpoolError("the local spool cannot be synced"))
        else:
            for name, size in covered.items():
                if name in self.sizes:
                    self._durable[name] = max(self._durable.get(name, 0), size)
            for d in waiters:
                d.callback(None)
        for fd in [fd for fd in self._retired if fd not in self._dirty]:
            self._retired.discard(fd)
            os.close(fd)
        if self._unsynced:
            self._sync()

    def _cut_unsynced(self) -> None:
        """Remove what was written but not synced (its events were refused); start a new segment."""
        self._abandon_tail()
        for name, size in self.sizes.items():
            durable = self._durable.get(name, 0)
            if size > durable:
                try:
                    os.truncate(self.directory / name, durable)
                except OSError:
                    self.log.failure("spool: cannot cut unsynced records from {name}", name=name)
                self.sizes[name] = durable

    # Replaying -------------------------------------------------------------------

    def oldest(self) -> str | None:
        """The oldest segment, or None."""
        return min(self.sizes) if self.sizes else None

    def read_later(self, name: str, offset: int, max_ops: int,
                   boundary: Callable[[list[str]], bool] | None = None) -> defer.Deferred:
        """``read`` in the spool's thread (the reactor does not wait for the disk)."""
        return deferToThreadPool(self.reactor, self._pool, self.read, name, offset, max_ops, boundary,
                                 self.sizes.get(name, 0))

    def read(self, name: str, offset: int, max_ops: int, boundary: Callable[[list[str]], bool] | None = None,
             end: int | None = None) -> tuple[list[list[str]], int]:
        """Operations of a segment from ``offset`` (up to ``end``: its size), and the offset after them.

        With ``boundary`` (true for an operation that starts a batch), whole
        batches only, at least one, stopping at the first batch to start
        after ``max_ops``; without, up to ``max_ops`` operations.  The good
        records before a damaged one come first; then ``SpoolError``.
        """
        end = self.sizes.get(name, 0) if end is None else end
        size = READ_BYTES
        while offset < end:
            with open(self.directory / name, "rb") as handle:
                handle.seek(offset)
                data = handle.read(min(end - offset, size))
            ops: list[list[str]] = []
            last_start = (0, 0)  # (index, position) of the last batch start read
            position = 0
            while True:
                op, after = decode(data, position)
                if op is None or (boundary is None and len(ops) >= max_ops):
                    break
                if boundary is not None and boundary(op):
                    if len(ops) >= max_ops:
                        return ops, offset + position
                    last_start = (len(ops), position)
                ops.append(op)
                position = after
            whole = len(data) == end - offset
            if offset + position == end or (whole and ops) or (boundary is None and ops):
                return ops, offset + position
            if whole:
                raise SpoolError(f"{name} is damaged at byte {offset}")
            if last_start[0] > 0:  # the read ended inside a batch: up to its start
                return ops[:last_start[0]], offset + last_start[1]
            size *= 2  # one batch larger than the read
        return [], offset

    def quarantine(self, name: str) -> str:
        """Move a segment that cannot be read aside; returns its new name."""
        if name == self._tail:
            self._abandon_tail()
        self.sizes.pop(name, None)
        self._durable.pop(name, None)
        damaged = name + ".damaged"
        os.replace(self.directory / name, self.directory / damaged)
        return damaged

    def remove(self, name: str) -> None:
        """Delete a replayed segment (the tail too: the next append starts another)."""
        self.sizes.pop(name, None)
        self._durable.pop(name, None)
        if name == self._tail:
            self._abandon_tail()
        try:
            os.unlink(self.directory / name)
        except FileNotFoundError:
            pass
