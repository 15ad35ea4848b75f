"""How the daemon's parts start and stop: one service tree, stopped in a stated order.

``OrderedService`` is a ``MultiService`` that stops its children one after
the other, each once the one before has finished stopping: first those its
``stop_order`` names, in that order, then any other child in reverse start
order (as Buildbot's ``AsyncMultiService`` does), so nothing is forgotten
and nothing is stopped while a part stopped before it still needs it.

``Periodic`` is Twisted's ``TimerService`` (stopping it waits for the run
in progress) that may wait one interval before its first run and never
stops looping because a run failed.  ``Part`` makes a service of an object
that only has start and stop functions.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

log = Logger()


class OrderedService(MultiService):
    """Starts children in the order they were added; stops them one at a time.

    ``stop_order`` names the children to stop first, in that order; the
    others stop after them, in reverse start order.  A child that fails to
    stop is logged and the next one is stopped all the same.
    """

    stop_order: tuple[str, ...] = ()

    def stopService(self) -> defer.Deferred:
        Service.stopService(self)
        return defer.ensureDeferred(self.stop_children())

    def stopping_order(self) -> list[Any]:
        """The children in the order ``stopService`` stops them."""
        first = [self.namedServices[name] for name in self.stop_order if name in self.namedServices]
        return first + [child for child in reversed(list(self)) if child not in first]

    async def stop_children(self) -> None:
        for child in self.stopping_order():
            if not child.running:
                continue
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("shutdown: stopping {name} failed", name=child.name or type(child).__name__)


class Periodic(TimerService):
    """Runs ``work`` every ``interval`` seconds while running; 0 or less: never.

    ``now``: the first run is at start (as ``TimerService``), otherwise one
    interval later.  A run that fails is logged and the next one comes on
    time.  ``stopService`` fires once the run in progress (if any) is over.
    """

    def __init__(self, interval: float, work: Callable[[], Any], clock: Any, *, now: bool = True,
                 name: str | None = None):
        super().__init__(interval, self._run)
        self.clock = clock
        self.work = work
        self.now = now
        self._skip = False
        if name is not None:
            self.name = name

    def startService(self) -> None:
        self._skip = not self.now
        if self.step > 0:
            super().startService()
        else:
            Service.startService(self)

    def stopService(self) -> defer.Deferred:
        if self.step > 0:
            return super().stopService()
        Service.stopService(self)
        return defer.succeed(None)

    def _run(self) -> defer.Deferred | None:
        if self._skip:
            self._skip = False
            return None
        d = defer.maybeDeferred(self.work)
        return d.addErrback(lambda f: log.failure("{name} failed", f, name=self.name or _name(self.work)))


class Part(Service):
    """A service made of a start and a stop function (either may return a Deferred)."""

    def __init__(self, name: str, start: Callable[[], Any] | None = None,
                 stop: Callable[[], Any] | None = None):
        self.name = name
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        super().startService()
        if self._start is not None:
            self._start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.maybeDeferred(self._stop) if self._stop is not None else defer.succeed(None)


def _name(work: Any) -> str:
    return getattr(work, "__qualname__", None) or repr(work)
