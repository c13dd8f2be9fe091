"""One task reads every waiting client connection: ``ReadHub``.

A client connection's task used to wait for its own socket. With 32 clients writing, the
leader then woke 32 tasks for 32 requests: per request a scheduler pass, a task switch and
trio re-arming the socket in its epoll set (issue 9: trio's machinery was about a quarter
of the leader's time per write). The hub keeps the waiting sockets in an epoll set of its
own (level-triggered, registered once per wait) and waits for that set's descriptor in
trio; one wake-up reads every socket that has data.

What it reads it decodes, and hands each message to the connection's ``step``, a
function that must not wait: it answers the message there and then (a write, proposed
and answered later by the driver's callback) and returns True, or returns False for a
message that needs its task (a read, a rate limit to sleep out, a busy answer to send).
The hub then stops watching that connection and gives the message to the connection's
task, which finishes it and calls ``take`` again. An end of stream (None) and any error
(a protocol violation, a broken socket, anything ``step`` raises) go to the task the
same way, so a connection's failures are handled where they always were.

Order is kept: the hub reads a connection only while its task waits in ``take``, and
``take`` hands over what is already buffered before it watches the socket again.
"""

from __future__ import annotations

import select
from typing import TYPE_CHECKING, Callable

import outcome
import trio

from .protocol import CLOSED, NEED_DATA

if TYPE_CHECKING:
    from .server import Connection

__all__ = ["ReadHub"]


class _Watch:
    __slots__ = ("conn", "step", "task")

    def __init__(self, conn: "Connection", step: Callable[[dict], bool], task) -> None:
        self.conn = conn
        self.step = step
        self.task = task


class ReadHub:
    def __init__(self, begin: Callable[[], None] | None = None,
                 end: Callable[[], None] | None = None) -> None:
        self._begin = begin  # called before each wake-up's reads, and
        self._end = end  # after them (the driver's hold_requests / release_requests)
        self._ep = select.epoll()
        self._watches: dict[int, _Watch] = {}
        self.running = False
        self.wakeups = 0  # for tests and profiles: hub wake-ups
        self.messages = 0  # messages answered by a step without their task

    async def run(self) -> None:
        """Serve until cancelled (the agent's server nursery owns it)."""
        ep = self._ep
        self.running = True
        try:
            while True:
                await trio.lowlevel.wait_readable(ep.fileno())
                self.wakeups += 1
                if self._begin is not None:
                    self._begin()
                try:
                    for fd, _ in ep.poll(0):
                        w = self._watches.get(fd)
                        if w is not None:
                            self._readable(fd, w)
                finally:
                    if self._end is not None:
                        self._end()
        finally:
            self.running = False
            for fd, w in list(self._watches.items()):
                self._hand_back(fd, w, outcome.Error(trio.ClosedResourceError("the agent is stopping")))
            ep.close()

    async def take(self, conn: "Connection", step: Callable[[dict], bool]) -> dict | None:
        """Feed ``conn``'s messages to ``step`` until it declines one: that message, or
        None at the end of the stream. Raises what reading or ``step`` raised."""
        while True:
            msg = conn.next_buffered()
            if msg is NEED_DATA:
                # Records that arrived with the last ones the task read (the hello's,
                # say) wait inside TLS, where the poll below would not see them.
                if conn.input_pending() and conn.read_nowait():
                    continue
                break
            if msg is CLOSED:
                return None
            if not step(msg):
                return msg
        fd = conn.fileno()
        if fd is None or not self.running:
            while True:  # not a socket we can poll, or no hub task: the task reads itself
                msg = await conn.receive()
                if msg is None or not step(msg):
                    return msg
        if fd < 0:
            raise trio.ClosedResourceError("the connection was closed")
        self._watches[fd] = _Watch(conn, step, trio.lowlevel.current_task())
        self._ep.register(fd, select.EPOLLIN)

        def abort(_raise_cancel) -> trio.lowlevel.Abort:
            self._unwatch(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _readable(self, fd: int, w: _Watch) -> None:
        conn = w.conn
        try:
            if not conn.read_nowait():
                return  # woken without data after all
            while True:
                msg = conn.next_buffered()
                if msg is NEED_DATA:
                    return  # keep watching
                if msg is CLOSED:
                    self._hand_back(fd, w, outcome.Value(None))
                    return
                if not w.step(msg):
                    self._hand_back(fd, w, outcome.Value(msg))
                    return
                self.messages += 1
        except Exception as exc:
            self._hand_back(fd, w, outcome.Error(exc))

    def _hand_back(self, fd: int, w: _Watch, result: outcome.Outcome) -> None:
        self._unwatch(fd)
        trio.lowlevel.reschedule(w.task, result)

    def _unwatch(self, fd: int) -> None:
        self._watches.pop(fd, None)
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass  # already closed: the kernel dropped it from the set
