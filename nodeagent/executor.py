"""Runs this node's tasks in subprocesses, with a concurrency limit, timeouts and bounded output.

A task never runs in the agent's event loop or in a thread: each one is a child process in
its own session (``start_new_session=True``, so its process group id is its pid), and the
agent only waits on pipes and a pidfd. A CPU-heavy task therefore cannot delay heartbeats.

    ex = Executor(capacity=2, on_start=..., on_result=...)
    await nursery.start(ex.run)          # the executor's own nursery; returns once accepting
    ex.submit(TaskSpec("t1", 1, "sleep", {"ms": 100}, timeout_ms=5000))   # -> True
    ex.cancel("t1")                      # queued: dropped; running: SIGTERM, grace, SIGKILL

Kinds: ``sleep {ms}``, ``cpu {ms}`` (ms of CPU time), ``echo {data}`` run
``python -P nodeagent/taskrunner.py <kind>`` with the args as msgpack on stdin;
``shell {cmd}`` runs ``/bin/sh -c cmd`` with stdin from /dev/null, only if ``allow_shell``.

Decisions:

* **Identity is (id, attempt).** ``submit()`` returns False for a pair that is already
  queued, running, or finished here (the last ``remember`` results are kept), so the agent
  may re-submit after a restart or a re-apply. A *newer* attempt of an id supersedes older
  attempts still queued or running here (they end ``cancelled``, error "superseded by
  attempt N"): the leader ignores their results anyway. Submitting an *older* attempt while
  a newer one is queued or running returns False.
* **Refusals are results, not exceptions.** A shell task on a node without ``allow_shell``,
  an unknown kind, bad args, a non-positive timeout, or a full queue (``max_queued``) is
  accepted by ``submit()`` (True) and ends at once with outcome ``failed`` and a clear
  ``error``; it never calls ``on_start``. So every accepted task produces exactly one
  ``on_result``, through the same path the leader already listens to.
* **Callbacks are synchronous** and called from the executor's tasks: ``on_start(spec)``
  when a task takes a slot (just before its process is spawned), ``on_result(result)`` once
  per accepted task, *before* its slot is released. They must not block; to do async work,
  hand off with a memory channel's ``send_nowait`` or ``nursery.start_soon``. An exception
  from a callback is a bug and propagates out of ``run()`` (trio: exceptions propagate),
  which kills every running task.
* **Results are delivered by ``run()``.** Submitting before ``run()`` starts queues the
  task; refusals and cancellations of queued tasks are reported by ``run()`` (never from
  inside ``submit()``/``cancel()``, so callbacks are never re-entered). After ``run()``
  has ended, ``submit()`` refuses (returns False): the agent is stopping, and its driver
  may still apply an assignment in the meantime.
* **Timeout** (``timeout_ms``, counted from the spawn, so it includes interpreter start-up):
  the process group gets SIGTERM, then SIGKILL after ``kill_grace`` seconds; outcome
  ``timed_out``. ``cancel()`` of a running task does the same; outcome ``cancelled``.
  ``exit_code`` is the observed status for any task whose process ran (negative: killed by
  that signal), None for a task that never started a process.
* **A task ends when its main process ends.** Once the main process has exited, whatever
  else is left in its process group (a shell's background job) is SIGKILLed *before* the
  main process is reaped, so the group id cannot have been reused. The pipes are then
  drained for at most ``drain_timeout`` seconds (a grandchild that left the group may hold
  them open) and closed. Processes that escape with their own ``setsid()`` are out of reach.
* **Output is capped per stream.** Both pipes are read concurrently and continuously (so a
  chatty task never blocks on a full pipe), keeping only the last ``output_limit`` bytes of
  each; ``stdout_dropped``/``stderr_dropped`` count the bytes discarded from the front. The
  echo payload is written to stdin concurrently too.
* **Shutdown.** Cancelling ``run()`` kills every running process group (SIGTERM, grace,
  SIGKILL) and reaps each child, under a shielded, bounded scope; tasks killed this way
  produce no ``on_result`` (the leader reassigns them after their lease). Pending results
  not yet delivered are dropped likewise.
* **Every wait is bounded**: by the task's timeout, ``kill_grace``, ``KILL_WAIT`` or
  ``drain_timeout``; the only unbounded wait is ``run()`` itself, idle for work.

Spawning uses ``trio.lowlevel.open_process`` (which calls ``Popen`` in a worker thread:
fork/exec may block; the task itself never runs in one). Waiting for exit uses our own
pidfd (Linux >= 5.3), which reports the exit without reaping; where pidfds are not
available we fall back to ``Process.wait()``, which reaps first, and then the left-over
group kill has a (tiny) pid-reuse window.
"""

from __future__ import annotations

import collections
import inspect
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgpack
import trio

__all__ = [
    "KINDS",
    "OUTCOMES",
    "SHELL_DISABLED",
    "Executor",
    "TaskResult",
    "TaskSpec",
]

log = logging.getLogger("nodeagent.executor")

KINDS: Final = ("sleep", "cpu", "echo", "shell")
OUTCOMES: Final = ("succeeded", "failed", "timed_out", "cancelled")
SHELL_DISABLED: Final = "shell tasks are disabled on this node (allow_shell: false)"
TASKRUNNER: Final = os.path.join(os.path.dirname(os.path.abspath(__file__)), "taskrunner.py")
KILL_WAIT: Final = 5.0  # after SIGKILL, how long to wait for the exit before giving up (logged)
READ_CHUNK: Final = 64 * 1024
# Tasks run at a lower scheduling priority than the agent, so a node busy with tasks still
# answers heartbeats on time.
TASK_NICENESS: Final = 10

Outcome = Literal["succeeded", "failed", "timed_out", "cancelled"]


@dataclass(frozen=True)
class TaskSpec:
    id: str
    attempt: int
    kind: str
    args: dict
    timeout_ms: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.id, self.attempt)


@dataclass(frozen=True)
class TaskResult:
    id: str
    attempt: int
    outcome: Outcome
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    error: str | None
    started_at: float  # time.time()
    finished_at: float  # time.time()
    stdout_dropped: int = 0  # bytes discarded from the front of stdout (only the tail is kept)
    stderr_dropped: int = 0

    @property
    def truncated(self) -> bool:
        return bool(self.stdout_dropped or self.stderr_dropped)


@dataclass(eq=False)
class _Entry:
    """One accepted task while it is queued or running."""

    spec: TaskSpec
    cancel_reason: str | None = None  # set by cancel() or a superseding attempt
    scope: trio.CancelScope | None = None  # the wait for exit, while running
    pid: int | None = None
    started_at: float | None = None


class _Tail:
    """Keeps the last ``limit`` bytes written to it and counts what it discarded."""

    __slots__ = ("limit", "buf", "dropped")

    def __init__(self, limit: int):
        self.limit = limit
        self.buf = bytearray()
        self.dropped = 0

    def write(self, data: bytes) -> None:
        if len(data) >= self.limit:
            self.dropped += len(self.buf) + len(data) - self.limit
            self.buf = bytearray(data[len(data) - self.limit:]) if self.limit else bytearray()
            return
        self.buf += data
        excess = len(self.buf) - self.limit
        if excess > 0:
            del self.buf[:excess]  # deleting from the front of a bytearray is cheap
            self.dropped += excess


class _Child:
    """A spawned task process: group signals, and an exit wait that does not reap."""

    def __init__(self, proc: trio.Process):
        self.proc = proc
        self.pgid = proc.pid  # start_new_session=True: the child leads its own group
        self.exited = False
        self.pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(proc.pid)
            except OSError:
                self.pidfd = None

    async def wait_exited(self) -> None:
        """Until the main process has exited. With a pidfd it stays a zombie (unreaped)."""
        if not self.exited:
            if self.pidfd is not None:
                await trio.lowlevel.wait_readable(self.pidfd)
            else:
                await self.proc.wait()
            self.exited = True

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass  # the whole group is gone (and reaped)
        except PermissionError as e:  # only possible if the pgid was reused: leave it alone
            log.warning("cannot signal task process group %d: %s", self.pgid, e)

    async def terminate(self, grace: float) -> None:
        """SIGTERM the group; SIGKILL it if the main process outlives ``grace``. Bounded."""
        if self.exited:
            return
        self.signal_group(signal.SIGTERM)
        with trio.move_on_after(grace):
            await self.wait_exited()
            return
        self.signal_group(signal.SIGKILL)
        with trio.move_on_after(KILL_WAIT):
            await self.wait_exited()
            return
        log.error("task process %d did not exit %.0fs after SIGKILL", self.pgid, KILL_WAIT)

    async def finish(self) -> int | None:
        """After the exit: kill what is left of the group, then reap. Returns the status."""
        self.signal_group(signal.SIGKILL)
        with trio.move_on_after(KILL_WAIT):
            return await self.proc.wait()  # immediate: the process has exited
        return None

    def close(self) -> None:
        if self.pidfd is not None:
            trio.lowlevel.notify_closing(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None


def _check_args(spec: TaskSpec) -> str | None:
    """Why this spec cannot run (an error string), or None. Pure."""
    if not isinstance(spec.args, dict):
        return "bad args: args must be a map"
    if isinstance(spec.timeout_ms, bool) or not isinstance(spec.timeout_ms, (int, float)) \
            or not spec.timeout_ms > 0:
        return f"bad timeout_ms: must be a number > 0, got {spec.timeout_ms!r}"
    a = spec.args
    if spec.kind in ("sleep", "cpu"):
        ms = a.get("ms")
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not ms >= 0:
            return f"bad args: {spec.kind} needs 'ms', a number >= 0, got {ms!r}"
    elif spec.kind == "echo":
        if not isinstance(a.get("data", b""), (bytes, bytearray, str)):
            return f"bad args: echo needs 'data' as bytes, got {type(a.get('data')).__name__}"
    elif spec.kind == "shell":
        if not isinstance(a.get("cmd"), str) or not a["cmd"]:
            return "bad args: shell needs 'cmd', a non-empty string"
    else:
        return f"unknown task kind {spec.kind!r} (known: {', '.join(KINDS)})"
    return None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}"


class Executor:
    """Runs tasks in subprocesses: at most ``capacity`` at once, the rest in a FIFO queue."""

    def __init__(
        self,
        capacity: int,
        *,
        allow_shell: bool = False,
        output_limit: int = 64 * 1024,
        python: str = sys.executable,
        on_start: Callable[[TaskSpec], Any] | None = None,
        on_result: Callable[[TaskResult], Any] | None = None,
        max_queued: int = 1024,
        kill_grace: float = 2.0,
        drain_timeout: float = 1.0,
        remember: int = 4096,
    ):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if output_limit < 0 or max_queued < 0 or remember < 0:
            raise ValueError("output_limit, max_queued and remember must be >= 0")
        for cb in (on_start, on_result):
            if cb is not None and inspect.iscoroutinefunction(cb):
                raise TypeError("on_start/on_result are called synchronously; pass a plain "
                                "function (hand async work to a channel's send_nowait)")
        self.capacity = capacity
        self.allow_shell = allow_shell
        self.output_limit = output_limit
        self.python = python
        self.on_start = on_start
        self.on_result = on_result
        self.max_queued = max_queued
        self.kill_grace = kill_grace
        self.drain_timeout = drain_timeout
        self.remember = remember

        self._queue: collections.OrderedDict[tuple[str, int], _Entry] = collections.OrderedDict()
        self._running: dict[tuple[str, int], _Entry] = {}
        self._done: collections.OrderedDict[tuple[str, int], TaskResult] = collections.OrderedDict()
        self._pending: collections.deque[TaskResult] = collections.deque()  # to report
        self._wakeup = trio.Event()
        self._state = "new"  # new -> running -> closed
        self._counts: collections.Counter[str] = collections.Counter()

    # == the executor's task ====================================================================

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start queued tasks as slots free up and report results, until cancelled."""
        if self._state != "new":
            raise RuntimeError(f"Executor.run() can be called once (state: {self._state})")
        self._state = "running"
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    # a fresh event first: a callback below that submits or cancels sets it
                    self._wakeup = trio.Event()
                    while self._pending:
                        self._report(self._pending.popleft())
                    while self._queue and len(self._running) < self.capacity:
                        key, entry = self._queue.popitem(last=False)
                        self._running[key] = entry
                        self._counts["started"] += 1
                        if self.on_start is not None:
                            self.on_start(entry.spec)
                        nursery.start_soon(self._run_one, entry, name=f"task {key[0]}#{key[1]}")
                    await self._wakeup.wait()
        finally:
            # every task of the nursery has ended here: its process was killed and reaped
            self._state = "closed"
            self._pending.clear()
            self._queue.clear()
            self._running.clear()

    async def _run_one(self, entry: _Entry) -> None:
        result = await self._execute(entry)
        key = entry.spec.key
        self._remember(result)
        self._counts[result.outcome] += 1
        self._report(result)  # before the slot is released: on_start/on_result bracket a slot
        del self._running[key]
        self._wakeup.set()

    # == API (non-blocking) =====================================================================

    def submit(self, spec: TaskSpec) -> bool:
        """Accept a task. False if (id, attempt) is already queued/running/done here, or a
        newer attempt of the id is queued/running. Never blocks; see the module docstring
        for refusals (accepted, then reported ``failed``)."""
        if self._state == "closed":
            # The agent is stopping: its driver can still apply an entry that assigns a
            # task here after this executor's task ended. The table keeps the task
            # assigned; the restarted agent runs it, or the leader's lease moves it.
            return False
        key = spec.key
        if key in self._queue or key in self._running or key in self._done:
            self._counts["duplicates"] += 1
            return False
        older: list[_Entry] = []
        for e in (*self._queue.values(), *self._running.values()):
            if e.spec.id == spec.id:
                if e.spec.attempt > spec.attempt:
                    self._counts["stale"] += 1
                    return False
                older.append(e)
        self._counts["submitted"] += 1
        for e in older:
            self._cancel_entry(e, f"superseded by attempt {spec.attempt}")

        if spec.kind == "shell" and not self.allow_shell:
            error: str | None = SHELL_DISABLED
        else:
            error = _check_args(spec)
        if error is None and len(self._queue) >= self.max_queued:
            error = f"node queue is full (max_queued={self.max_queued})"
        if error is not None:
            self._counts["refused"] += 1
            self._finish_now(spec, "failed", error)
            return True
        self._queue[key] = _Entry(spec)
        self._wakeup.set()
        return True

    def cancel(self, task_id: str) -> bool:
        """Cancel every queued or running attempt of ``task_id``. True if there was one not
        already being cancelled.

        Queued: removed, reported ``cancelled``. Running: the process group gets SIGTERM,
        then SIGKILL after ``kill_grace``; reported ``cancelled`` (best effort: a task that
        exits on its own at the same moment keeps its own outcome)."""
        found = False
        for e in (*self._queue.values(), *self._running.values()):
            if e.spec.id == task_id and e.cancel_reason is None:
                self._cancel_entry(e, "cancelled")
                found = True
        return found

    def running(self) -> int:
        return len(self._running)

    def active_ids(self) -> set[str]:
        """Ids of every task queued or running here (not being cancelled)."""
        return {e.spec.id for e in (*self._queue.values(), *self._running.values())
                if e.cancel_reason is None}

    def queued(self) -> int:
        return len(self._queue)

    def started(self, task_id: str, attempt: int) -> bool:
        """Whether (id, attempt) is running here now (started, not finished)."""
        return (task_id, attempt) in self._running

    def result(self, task_id: str, attempt: int) -> TaskResult | None:
        """The result of a finished (id, attempt), if it is still remembered here."""
        return self._done.get((task_id, attempt))

    def stats(self) -> dict:
        """A snapshot for load reports and the console (plain data)."""
        c = self._counts
        return {
            "capacity": self.capacity,
            "running": len(self._running),
            "queued": len(self._queue),
            "allow_shell": self.allow_shell,
            "submitted": c["submitted"],
            "started": c["started"],
            "succeeded": c["succeeded"],
            "failed": c["failed"],
            "timed_out": c["timed_out"],
            "cancelled": c["cancelled"],
            "refused": c["refused"],
            "duplicates": c["duplicates"],
            "stale": c["stale"],
            "running_tasks": [
                {"id": e.spec.id, "attempt": e.spec.attempt, "kind": e.spec.kind,
                 "pid": e.pid, "started_at": e.started_at}
                for e in self._running.values()
            ],
        }

    # == internals ==============================================================================

    def _cancel_entry(self, entry: _Entry, reason: str) -> None:
        key = entry.spec.key
        if key in self._queue:
            del self._queue[key]
            self._finish_now(entry.spec, "cancelled", reason)
        else:
            entry.cancel_reason = reason
            if entry.scope is not None:
                entry.scope.cancel()

    def _finish_now(self, spec: TaskSpec, outcome: Outcome, error: str) -> None:
        """A task that ends without a process: remembered now, reported by run()."""
        now = time.time()
        result = TaskResult(spec.id, spec.attempt, outcome, None, b"", b"", error, now, now)
        self._remember(result)
        self._counts[outcome] += 1
        self._pending.append(result)
        self._wakeup.set()

    def _remember(self, result: TaskResult) -> None:
        self._done[(result.id, result.attempt)] = result
        while len(self._done) > self.remember:
            self._done.popitem(last=False)

    def _report(self, result: TaskResult) -> None:
        if self.on_result is not None:
            self.on_result(result)

    def _command(self, spec: TaskSpec) -> tuple[list[str], bytes | None]:
        if spec.kind == "shell":
            return ["/bin/sh", "-c", spec.args["cmd"]], None
        args = dict(spec.args)
        if spec.kind == "echo" and isinstance(args.get("data"), str):
            args["data"] = args["data"].encode()
        return [self.python, "-P", TASKRUNNER, spec.kind], msgpack.packb(args, use_bin_type=True)

    async def _execute(self, entry: _Entry) -> TaskResult:
        spec = entry.spec
        started_at = entry.started_at = time.time()
        argv, stdin_data = self._command(spec)

        def result(outcome: Outcome, code: int | None, error: str | None,
                   out: _Tail | None = None, err: _Tail | None = None) -> TaskResult:
            return TaskResult(
                spec.id, spec.attempt, outcome, code,
                bytes(out.buf) if out else b"", bytes(err.buf) if err else b"", error,
                started_at, time.time(),
                out.dropped if out else 0, err.dropped if err else 0,
            )

        if entry.cancel_reason is not None:  # cancelled between taking the slot and now
            return result("cancelled", None, entry.cancel_reason)
        try:
            proc = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            return result("failed", None, f"could not start the task process ({argv[0]}): {e}")

        entry.pid = proc.pid
        try:
            os.setpriority(os.PRIO_PGRP, proc.pid, TASK_NICENESS)
        except OSError:
            pass  # already gone, or not permitted: it runs at the agent's priority
        child = _Child(proc)
        out, err = _Tail(self.output_limit), _Tail(self.output_limit)
        stopped = False  # the timeout or cancel() fired
        code: int | None = None
        try:
            async with trio.open_nursery() as io:
                io.start_soon(_drain, proc.stdout, out)
                io.start_soon(_drain, proc.stderr, err)
                if stdin_data is not None:
                    io.start_soon(_feed, proc.stdin, stdin_data)
                with trio.CancelScope(deadline=trio.current_time() + spec.timeout_ms / 1000) as scope:
                    entry.scope = scope
                    if entry.cancel_reason is not None:
                        scope.cancel()
                    await child.wait_exited()
                entry.scope = None
                if not child.exited:
                    stopped = True
                    await child.terminate(self.kill_grace)
                code = await child.finish()
                # the group is gone: the pipes reach EOF at once, unless an escaped
                # grandchild holds them open
                io.cancel_scope.deadline = trio.current_time() + self.drain_timeout
        finally:
            with trio.CancelScope(shield=True):
                if code is None:  # cancelled from outside (shutdown) or an error
                    with trio.move_on_after(self.kill_grace + 2 * KILL_WAIT):
                        await child.terminate(self.kill_grace)
                        await child.finish()
                child.close()
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        await trio.aclose_forcefully(stream)

        if stopped:
            if entry.cancel_reason is not None:
                return result("cancelled", code, entry.cancel_reason, out, err)
            return result("timed_out", code, f"timed out after {spec.timeout_ms} ms", out, err)
        if code is None:
            return result("failed", None, "the task process could not be reaped", out, err)
        if code != 0:
            return result("failed", code, _describe_exit(code), out, err)
        return result("succeeded", 0, None, out, err)


async def _drain(stream: trio.abc.ReceiveStream, tail: _Tail) -> None:
    while True:
        try:
            chunk = await stream.receive_some(READ_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if not chunk:
            return
        tail.write(chunk)


async def _feed(stream: trio.abc.SendStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the task exited without reading all of its input
