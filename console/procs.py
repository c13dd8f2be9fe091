"""The local process manager for an inventory: start, stop, kill, pause and resume the
agents of the inventory's nodes that live on this machine (`raftdeck up`, `down`, `kill`...).

Unlike ``console.local.LocalCluster`` (a test harness that writes its own inventory and
keeps its children), the agents started here are detached (their own session, no pipes to
us) and outlive the command that started them. What ties a node to its process is a pid
file next to its data directory:

    <data_dir>.pid      one line of JSON:
                        {"pid": 1234, "start_ticks": 567890, "started_at": 1700000000.12,
                         "node": "n1", "inventory": "/abs/inventory.yaml", "argv": [...]}

``start_ticks`` is field 22 of ``/proc/<pid>/stat`` (the process's start time in clock
ticks since boot) when the process was started. A pid file is believed only while
``/proc/<pid>`` exists, has not exited, has the same start time (so a reused pid is not
taken for the agent) and its cmdline contains ``nodeagent`` and the node's name; otherwise
it is *stale* and is removed by the next start or stop, and nothing is signalled on its
word. A file holding just a pid (a number) is accepted too and checked by cmdline only.
"Gone" after a signal means every thread has exited (a zombie main thread alone is not
enough: the agent's other threads may still hold its port and data-directory lock).

    <data_dir>.stderr   the agent's stdout and stderr, appended (start-up errors,
                        crashes); its JSON log goes to the node's ``log_file`` or to
                        ``<data_dir>/../<name>.log``

A node is local when it has no ``ssh:`` mapping, or its host is 127.0.0.1, localhost or
::1. Everything else is refused by ``LocalProcesses`` with ``RemoteNode``; ``Processes``
below controls both kinds: local nodes through ``LocalProcesses``, remote ones over SSH
through ``console.deploy`` (the same pid file, kept on the node's host).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Iterable

from nodeagent.config import Inventory, NodeConfig

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def sighup_held():
    """Around starting an agent: SIGHUP blocked in this thread, so the child starts with
    it blocked (the mask survives fork and exec). The agent unblocks it once it has a
    handler (nodeagent/cli.py), so a reload sent while the interpreter starts waits for it
    instead of ending it (SIGHUP's default action)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

# Children started by this process, by pid: polled so they are reaped (no zombies, and
# no "still running" warnings when a Popen object is dropped).
_CHILDREN: dict[int, subprocess.Popen] = {}
_EXITED: dict[int, int] = {}  # their exit codes once reaped (until the pid is ours again)


class ProcError(Exception):
    """A process operation that cannot be done; ``str()`` is one line for an operator."""

    exit_code = 1


class RemoteNode(ProcError):
    exit_code = 2


class NotRunning(ProcError):
    pass


class PortInUse(ProcError):
    pass


def is_local(node: NodeConfig) -> bool:
    return node.ssh is None or node.host.lower() in LOOPBACK


def _local_path(p: PurePath) -> Path:
    """A node's path on this machine: absolute for a plain local node (the inventory
    loader made it so); for an ``ssh:`` node on a loopback host, relative to home (where
    deploy would put it)."""
    p = Path(p)
    return p if p.is_absolute() else Path.home() / p


# -- /proc ---------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks) of a process, None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _threads_dead(pid: int) -> bool:
    """Whether every thread of ``pid`` has exited (zombie or gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                data = f.read().decode(errors="replace")
        except OSError:
            continue
        state = data[data.rfind(")") + 2:].split()[:1]
        if state and state[0] not in "ZXx":
            return False
    return True


def _have_proc() -> bool:
    return os.path.exists("/proc/self/stat")


def _reap(pid: int) -> int | None:
    """Reap ``pid`` if it is an exited child of ours; its exit code (negative: signal)."""
    if pid in _EXITED:
        return _EXITED[pid]
    p = _CHILDREN.get(pid)
    if p is not None:
        rc = p.poll()
        if rc is not None:
            _CHILDREN.pop(pid, None)
            _EXITED[pid] = rc
        return rc
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        return None
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def start_ticks(pid: int) -> int | None:
    st = _proc_stat(pid)
    return st[1] if st else None


# -- pid files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PidInfo:
    pid: int
    start_ticks: int | None = None
    started_at: float | None = None
    node: str | None = None
    inventory: str | None = None
    argv: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "start_ticks": self.start_ticks,
                           "started_at": self.started_at, "node": self.node,
                           "inventory": self.inventory, "argv": list(self.argv)})

    @classmethod
    def parse(cls, text: str) -> "PidInfo | None":
        text = text.strip()
        if not text:
            return None
        if text.isdigit():
            return cls(int(text))
        try:
            d = json.loads(text)
            pid = d["pid"]
            if type(pid) is not int or pid <= 0:
                return None
            ticks = d.get("start_ticks")
            return cls(pid, ticks if type(ticks) is int else None, d.get("started_at"),
                       d.get("node"), d.get("inventory"), tuple(d.get("argv") or ()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def pid_alive(info: PidInfo, name: str) -> bool:
    """Whether the pid file's process is still that node's agent (not dead, not a zombie,
    not a reused pid)."""
    pid = info.pid
    if not _have_proc():  # no /proc: the best we can do is "some process has this pid"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return _reap(pid) is None
    st = _proc_stat(pid)
    if st is None:
        return False
    if info.start_ticks is not None and st[1] != info.start_ticks:
        return False
    if st[0] in "ZXx":  # exited, or exiting: some threads may still hold its sockets
        return _reap(pid) is None and not _threads_dead(pid) and info.start_ticks is not None
    argv = _cmdline(pid)
    if not argv:
        # Unreadable for a moment while the process execs (just started) or exits; then
        # the matching start time (checked above) is what vouches for it.
        return info.start_ticks is not None
    return any("nodeagent" in a for a in argv) and name in argv


def pid_gone(info: PidInfo) -> bool:
    """Whether the pid file's process has exited (or its pid now names another process).
    Used after signalling it: unlike ``pid_alive`` this does not look at the cmdline, which
    is already empty while a dying process still holds its sockets and files."""
    pid = info.pid
    if not _have_proc():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return _reap(pid) is not None
    st = _proc_stat(pid)
    if st is None:
        return True
    if info.start_ticks is not None and st[1] != info.start_ticks:
        return True
    if st[0] not in "ZXx":
        return False
    # The main thread is a zombie. Its sockets and files are released only once every
    # thread has exited (the agent has worker threads), so look at all of them.
    if _reap(pid) is not None:
        return True
    return _threads_dead(pid)


@dataclass
class NodeProcess:
    """What this machine knows of one node's process."""

    name: str
    pid_file: Path
    state: str  # running | paused | stopped | stale (a pid file whose process is gone)
    pid: int | None = None
    info: PidInfo | None = None

    @property
    def alive(self) -> bool:
        return self.state in ("running", "paused")


@dataclass
class StartResult:
    name: str
    pid: int
    log: Path
    stderr: Path
    stderr_offset: int = 0
    argv: list[str] = field(default_factory=list)


# -- the manager -----------------------------------------------------------------------------


class LocalProcesses:
    """Process control for the local nodes of one inventory."""

    def __init__(self, inventory: Inventory, *, python: str = sys.executable):
        self.inv = inventory
        self.python = python

    # -- which nodes, which files --

    def node(self, name: str) -> NodeConfig:
        """The named node (KeyError with a one-line message if unknown)."""
        return self.inv.node(name)

    def local_node(self, name: str) -> NodeConfig:
        n = self.node(name)
        if not is_local(n):
            raise RemoteNode(f"{name} is a remote node ({n.host}, ssh): it is controlled over "
                             "SSH (`raftdeck deploy`, `raftdeck kill|pause|resume|restart|logs`)")
        return n

    def local_nodes(self) -> list[NodeConfig]:
        return [n for n in self.inv.nodes if is_local(n)]

    def data_dir(self, node: NodeConfig) -> Path:
        return _local_path(node.data_dir)

    def pid_file(self, node: NodeConfig) -> Path:
        d = self.data_dir(node)
        return d.with_name(d.name + ".pid")

    def stderr_file(self, node: NodeConfig) -> Path:
        d = self.data_dir(node)
        return d.with_name(d.name + ".stderr")

    def log_file(self, node: NodeConfig) -> Path:
        if node.log_file is not None:
            return _local_path(node.log_file)
        return self.data_dir(node).parent / f"{node.name}.log"

    # -- state --

    def read_pid_file(self, node: NodeConfig) -> PidInfo | None:
        try:
            return PidInfo.parse(self.pid_file(node).read_text())
        except (OSError, UnicodeDecodeError):
            return None

    def process(self, node: NodeConfig) -> NodeProcess:
        pf = self.pid_file(node)
        info = self.read_pid_file(node)
        if info is None:
            return NodeProcess(node.name, pf, "stale" if pf.exists() else "stopped")
        if not pid_alive(info, node.name):
            return NodeProcess(node.name, pf, "stale", info.pid, info)
        st = _proc_stat(info.pid)
        state = "paused" if st is not None and st[0] in "Tt" else "running"
        return NodeProcess(node.name, pf, state, info.pid, info)

    def remove_pid_file(self, node: NodeConfig) -> None:
        try:
            self.pid_file(node).unlink()
        except FileNotFoundError:
            pass

    def port_in_use(self, node: NodeConfig, timeout: float = 0.5) -> bool:
        """Whether something already accepts connections on the node's address."""
        try:
            with socket.create_connection((node.host, node.port), timeout=timeout):
                return True
        except OSError:
            return False

    # -- start --

    def command(self, node: NodeConfig, *, join: bool = False) -> list[str]:
        return [self.python, "-m", "nodeagent.cli", "run", "--inventory", str(self.inv.path),
                "--name", node.name, "--log-file", str(self.log_file(node))] + \
            (["--join"] if join else [])

    def start(self, node: NodeConfig, *, join: bool = False) -> StartResult:
        """Start the node's agent detached (own session; no pipes to this process) and
        write its pid file. Raises ``ProcError`` if it runs already or its port is taken.
        ``join``: a node added to a running cluster (``nodeagent run --join``)."""
        node = self.local_node(node.name)
        proc = self.process(node)
        if proc.alive:
            raise ProcError(f"{node.name} already runs (pid {proc.pid})")
        if proc.state == "stale":
            self.remove_pid_file(node)
        if self.port_in_use(node):
            raise PortInUse(f"something that raftdeck did not start already listens on "
                            f"{node.host}:{node.port}; stop it or change {node.name}'s port")
        data_dir = self.data_dir(node)
        log = self.log_file(node)
        err_path = self.stderr_file(node)
        for d in {data_dir.parent, log.parent, err_path.parent}:
            d.mkdir(parents=True, exist_ok=True)
        argv = self.command(node, join=join)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.pop("PYTHONSTARTUP", None)
        cwd = Path.home() if node.ssh is not None else self.inv.path.parent
        with open(err_path, "ab") as err:
            offset = err.tell()
            err.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} raftdeck starts "
                      f"{node.name}: {' '.join(argv)}\n".encode())
            err.flush()
            with sighup_held():
                p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=err, stderr=err, start_new_session=True,
                                     close_fds=True)
        _CHILDREN[p.pid] = p
        _EXITED.pop(p.pid, None)
        info = PidInfo(p.pid, start_ticks(p.pid), round(time.time(), 3), node.name,
                       str(self.inv.path), tuple(argv))
        pf = self.pid_file(node)
        tmp = pf.with_name(pf.name + ".tmp")
        tmp.write_text(info.to_json() + "\n")
        os.replace(tmp, pf)
        return StartResult(node.name, p.pid, log, err_path, offset, argv)

    def exit_code(self, pid: int) -> int | None:
        """The exit code of a child this process started and that has exited, else None."""
        return _reap(pid)

    def stderr_tail(self, node: NodeConfig, offset: int = 0, lines: int = 1) -> str:
        """The last lines the agent wrote to its stderr file since ``offset``."""
        try:
            with open(self.stderr_file(node), "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        got = [ln.strip() for ln in text.splitlines()
               if ln.strip() and not ln.startswith("--- ")]
        return " | ".join(got[-lines:])

    def last_words(self, node: NodeConfig, max_bytes: int = 64 << 10) -> str:
        """What the agent last wrote to its stderr file since it was last started (the
        line after the newest ``--- ... raftdeck starts`` header): why an agent that
        stopped by itself stopped (a full disk, a damaged log), or "" (killed: nothing).
        Reads at most the last ``max_bytes`` of the file."""
        try:
            with open(self.stderr_file(node), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        lines = text.splitlines()
        start = max((i for i, ln in enumerate(lines)
                     if ln.startswith("--- ") and "raftdeck starts" in ln), default=-1)
        lines = [ln.strip() for ln in lines[start + 1:] if ln.strip()]
        return lines[-1][:500] if lines else ""

    # -- signals --

    def _running(self, node: NodeConfig) -> NodeProcess:
        proc = self.process(node)
        if not proc.alive:
            if proc.state == "stale":
                self.remove_pid_file(node)
                raise NotRunning(f"{node.name} is not running (its pid file {proc.pid_file} "
                                 "was stale and is removed)")
            raise NotRunning(f"{node.name} is not running (no pid file {proc.pid_file}; "
                             "start it with `raftdeck up`)")
        return proc

    def signal(self, name: str, sig: int) -> int:
        node = self.local_node(name)
        proc = self._running(node)
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            self.remove_pid_file(node)
            raise NotRunning(f"{name} is not running (pid {proc.pid} is gone)") from None
        return proc.pid

    def pause(self, name: str) -> int:
        return self.signal(name, signal.SIGSTOP)

    def resume(self, name: str) -> int:
        return self.signal(name, signal.SIGCONT)

    def kill(self, name: str, timeout: float = 10.0) -> int:
        """SIGKILL the node's agent, wait until it is gone, remove its pid file."""
        node = self.local_node(name)
        proc = self._running(node)
        with _quiet():
            os.kill(proc.pid, signal.SIGKILL)
        if not self._wait_gone({node.name: (node, proc.info)}, timeout):
            raise ProcError(f"{name} (pid {proc.pid}) did not die within {timeout:g}s of SIGKILL")
        self.remove_pid_file(node)
        return proc.pid

    def stop(self, names: Iterable[str], timeout: float = 10.0) -> dict[str, dict]:
        """Stop the named nodes' agents together: SIGTERM (and SIGCONT, in case one is
        paused), then SIGKILL whatever still runs after ``timeout``. Removes their pid
        files. Returns per node ``{"result": stopped|killed|not_running|stale|failed,
        "pid": ...}``."""
        out: dict[str, dict] = {}
        waiting: dict[str, tuple[NodeConfig, PidInfo]] = {}
        for name in names:
            node = self.local_node(name)
            proc = self.process(node)
            if proc.state == "stopped":
                out[name] = {"result": "not_running", "pid": None}
                continue
            if proc.state == "stale":
                self.remove_pid_file(node)
                out[name] = {"result": "stale", "pid": proc.pid}
                continue
            with _quiet():
                os.kill(proc.pid, signal.SIGTERM)
            with _quiet():
                os.kill(proc.pid, signal.SIGCONT)
            waiting[name] = (node, proc.info)
            out[name] = {"result": "stopped", "pid": proc.pid}
        if waiting and not self._wait_gone(waiting, timeout):
            for name, (node, info) in list(waiting.items()):
                if not pid_gone(info):
                    with _quiet():
                        os.kill(info.pid, signal.SIGKILL)
                    out[name]["result"] = "killed"
            if not self._wait_gone(waiting, 5.0):
                for name, (node, info) in waiting.items():
                    if not pid_gone(info):
                        out[name]["result"] = "failed"
        for name, (node, info) in waiting.items():
            if out[name]["result"] != "failed":
                self.remove_pid_file(node)
        return out

    def _wait_gone(self, procs: dict[str, tuple[NodeConfig, PidInfo]], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            if all(pid_gone(info) for _, info in procs.values()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


class _quiet:
    """Ignore a process that is already gone."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        return typ is not None and issubclass(typ, (ProcessLookupError, PermissionError))


# -- local and remote together --------------------------------------------------------------


class Processes:
    """Process control for every node of an inventory, what the console's fault keys use:
    local nodes by their pid files (``LocalProcesses``), remote ones over SSH (SIGKILL /
    SIGSTOP / SIGCONT of the pid in the pid file on the host; restart starts the deployed
    agent again). The methods are synchronous (the console calls them in a worker
    thread); each SSH operation opens its own connection. ``ssh`` is a
    ``console.deploy.SSHOptions`` (default: ~/.ssh/known_hosts or $RAFTDECK_KNOWN_HOSTS,
    strict host key checking)."""

    def __init__(self, inventory: Inventory, *, ssh=None):
        self.inv = inventory
        self.local = LocalProcesses(inventory)
        self._ssh = ssh

    def is_remote(self, name: str) -> bool:
        return not is_local(self.inv.node(name))

    def _deployer(self):
        from console.deploy import Deployer, SSHOptions

        opts = self._ssh
        if opts is None:
            opts = SSHOptions()
            if os.environ.get("RAFTDECK_KNOWN_HOSTS"):
                opts.known_hosts = Path(os.environ["RAFTDECK_KNOWN_HOSTS"]).expanduser()
        return Deployer(self.inv, ssh=opts)

    @staticmethod
    def _sync(coro):
        import asyncio

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as ex:  # called from inside a loop
            return ex.submit(asyncio.run, coro).result()

    def _remote(self, name: str, what: str, *args):
        from console.deploy import HostError

        node = self.inv.node(name)
        d = self._deployer()
        try:
            return self._sync(getattr(d, what)(node, *args))
        except HostError as e:
            raise ProcError(str(e)) from None

    def kill(self, name: str) -> int:
        if self.is_remote(name):
            return self._remote(name, "signal", "KILL")
        return self.local.kill(name)

    def pause(self, name: str) -> int:
        if self.is_remote(name):
            return self._remote(name, "signal", "STOP")
        return self.local.pause(name)

    def resume(self, name: str) -> int:
        if self.is_remote(name):
            return self._remote(name, "signal", "CONT")
        return self.local.resume(name)

    def restart(self, name: str) -> int:
        """Kill (if it runs) and start again; the new pid."""
        if self.is_remote(name):
            return self._remote(name, "restart")[1]
        node = self.inv.node(name)
        proc = self.local.process(node)
        if proc.alive:
            self.local.kill(name)
        elif proc.state == "stale":
            self.local.remove_pid_file(node)
        return self.local.start(node).pid

    def last_words(self, name: str) -> str:
        """Why a local node's agent stopped by itself (``LocalProcesses.last_words``), if
        it is not running; "" for a running or a remote one (not fetched over SSH)."""
        if self.is_remote(name):
            return ""
        node = self.inv.node(name)
        if self.local.process(node).alive:
            return ""
        return self.local.last_words(node)

    def log_path(self, name: str) -> Path | None:
        """The node's log as a local file: the file itself for a local node. For a remote
        one, a cache file (~/.cache/raftdeck/logs/CLUSTER/NODE.log) that a background
        thread fills with the log's last 2,000 lines fetched over SSH (so the caller, the
        console's UI, never waits on the network; the logs screen polls the file)."""
        node = self.inv.node(name)
        if not self.is_remote(name):
            return self.local.log_file(node)
        cache = Path.home() / ".cache" / "raftdeck" / "logs" / self.inv.cluster.name
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"{name}.log"

        def fetch() -> None:
            try:
                out = self._remote(name, "logs", 2000)
                text = "".join(ln + "\n" for ln in out["log"])
            except Exception as e:  # shown in the file: the screen has nothing else
                text = json.dumps({"level": "error", "logger": "raftdeck",
                                   "msg": f"cannot fetch the log over SSH: {e}"}) + "\n"
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

        import threading

        threading.Thread(target=fetch, name=f"fetch-log-{name}", daemon=True).start()
        return path
