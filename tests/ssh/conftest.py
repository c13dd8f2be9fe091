"""Real OpenSSH hosts for the deploy tests.

``SSHHosts`` makes N hosts, each running its own real ``/usr/sbin/sshd`` with a generated
host key, config and authorized_keys (a generated test key):

* **netns** mode (root with iproute2): each host is a network namespace with loopback up
  and a veth pair to a bridge in the root namespace; host i has 10.77.K.i/24, the bridge
  10.77.K.254 (K is a free slot, held with a lock file, so parallel test workers and
  other users of this machine never collide). sshd listens on port 22 inside.
* **loopback** mode (anywhere else): each host is a loopback address 127.77.K.i with sshd
  on a free port; agents bind their own loopback address the same way.

Every sshd, every process left in a namespace (the deployed agents) and every namespace,
veth and bridge is removed at the end, by PID and by name, even when the test fails.
The namespaces share this machine's filesystem: each host gets its own directory
(install_dir) under the test's temp dir.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
LOCK_DIR = Path("/tmp/raftdeck-ssh-test-slots")


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def netns_available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("ip"):
        return "no ip command (iproute2)"
    name = f"rdprobe{os.getpid()}"
    r = _run("ip", "netns", "add", name, check=False)
    if r.returncode != 0:
        return r.stderr.strip() or "ip netns add failed"
    _run("ip", "netns", "del", name, check=False)
    return None


MODE_REASON = None


def ssh_mode() -> str:
    global MODE_REASON
    forced = os.environ.get("RAFTDECK_SSH_TEST_MODE")
    if forced in ("netns", "loopback"):
        MODE_REASON = "forced by RAFTDECK_SSH_TEST_MODE"
        return forced
    why = netns_available()
    MODE_REASON = why
    return "netns" if why is None else "loopback"


def report_header() -> str:
    """The line `pytest` prints at its start (tests/conftest.py asks for it)."""
    if not os.path.exists(SSHD):
        return "ssh tests: no sshd (install openssh-server); they are skipped"
    mode = ssh_mode()
    extra = f" ({MODE_REASON})" if MODE_REASON else ""
    return f"ssh tests: {mode} mode{extra}"


def keygen(path: Path, kind: str = "ed25519") -> Path:
    _run("ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "raftdeck-test", "-f", str(path))
    return path


class Host:
    def __init__(self, index: int, addr: str, ssh_port: int, root: Path, ns: str | None):
        self.index = index
        self.addr = addr
        self.ssh_port = ssh_port
        self.root = root  # this host's own directory (its install_dir lives here)
        self.ns = ns
        self.host_key = root / "ssh_host_ed25519_key"
        self.sshds: list[subprocess.Popen] = []


class SSHHosts:
    def __init__(self, tmp: Path, n: int, mode: str | None = None):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.mode = mode or ssh_mode()
        self.hosts: list[Host] = []
        self.slot = None
        self._lock = None
        self.bridge = None
        self.user = os.environ.get("USER") or __import__("getpass").getuser()
        self.client_key = keygen(self.tmp / "client_key")
        self.wrong_key = keygen(self.tmp / "wrong_key")
        self.authorized = self.tmp / "authorized_keys"
        self.authorized.write_text((self.tmp / "client_key.pub").read_text())
        self.known_hosts = self.tmp / "known_hosts"
        try:
            self._take_slot()
            if self.mode == "netns":
                self._bridge_up()
            for i in range(1, n + 1):
                self.hosts.append(self._make_host(i))
        except BaseException:
            self.close()
            raise

    # -- slots and addresses --

    def _take_slot(self) -> None:
        LOCK_DIR.mkdir(exist_ok=True)
        for k in range(1, 250):
            f = open(LOCK_DIR / f"{k}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            if self.mode == "netns":
                if _run("ip", "link", "show", f"rdbr{k}", check=False).returncode == 0:
                    # left over by a killed run: ours now that we hold the lock
                    _run("ip", "link", "del", f"rdbr{k}", check=False)
                if _run("ip", "route", "show", f"10.77.{k}.0/24", check=False).stdout.strip():
                    f.close()  # someone else on this machine uses that network
                    continue
            self.slot, self._lock = k, f
            return
        raise RuntimeError("no free test network slot")

    def _bridge_up(self) -> None:
        k = self.slot
        self.bridge = f"rdbr{k}"
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"10.77.{k}.254/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    def addr(self, i: int) -> str:
        return f"10.77.{self.slot}.{i}" if self.mode == "netns" else f"127.77.{self.slot}.{i}"

    def unused_addr(self) -> str:
        """An address in the hosts' network where nothing answers."""
        return self.addr(200)

    # -- hosts --

    def _make_host(self, i: int) -> Host:
        root = self.tmp / f"host{i}"
        root.mkdir()
        ns = None
        addr = self.addr(i)
        if self.mode == "netns":
            k = self.slot
            ns = f"rd{k}h{i}"
            _run("ip", "netns", "del", ns, check=False)  # a leftover of a killed run
            a, b = f"rd{k}h{i}a", f"rd{k}h{i}b"
            _run("ip", "link", "del", a, check=False)
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            _run("ip", "link", "set", b, "netns", ns)
            _run("ip", "link", "set", a, "master", self.bridge)
            _run("ip", "link", "set", a, "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", b)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", b, "up")
            port = 22
        else:
            port = _free_port(addr)
        h = Host(i, addr, port, root, ns)
        keygen(h.host_key)
        self.start_sshd(h)
        return h

    def start_sshd(self, h: Host, *, port: int | None = None, extra: str = "") -> int:
        """Start (another) sshd for host ``h``; its port."""
        port = port or h.ssh_port
        cfg = h.root / f"sshd_config.{port}"
        cfg.write_text("\n".join([
            f"Port {port}",
            f"ListenAddress {h.addr}",
            f"HostKey {h.host_key}",
            "PidFile none",
            f"AuthorizedKeysFile {self.authorized}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "StrictModes no",
            "UsePAM no",
            "MaxStartups 100",
            "MaxSessions 100",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
            extra,
        ]) + "\n")
        os.makedirs("/run/sshd", exist_ok=True) if os.geteuid() == 0 else None
        argv = [SSHD, "-D", "-e", "-f", str(cfg)]
        if h.ns:
            argv = ["ip", "netns", "exec", h.ns] + argv
        log = open(h.root / f"sshd.{port}.log", "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        h.sshds.append(p)
        deadline = time.monotonic() + 20
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"sshd for host {h.index} exited: "
                                   f"{(h.root / f'sshd.{port}.log').read_text()[-500:]}")
            try:
                with socket.create_connection((h.addr, port), timeout=0.5):
                    return port
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd for host {h.index} does not listen on {h.addr}:{port}")
                time.sleep(0.05)

    def host_pub(self, h: Host) -> str:
        return (h.root / "ssh_host_ed25519_key.pub").read_text().split()[1]

    def trust(self, h: Host, port: int | None = None) -> None:
        port = port or h.ssh_port
        pattern = h.addr if port == 22 else f"[{h.addr}]:{port}"
        with open(self.known_hosts, "a") as f:
            f.write(f"{pattern} ssh-ed25519 {self.host_pub(h)}\n")

    def node_yaml(self, name: str, h: Host, port: int, *, key: Path | None = None,
                  ssh_port: int | None = None, python: str | None = None,
                  extra: str = "") -> str:
        lines = [f"  - name: {name}", f"    host: {h.addr}", f"    port: {port}",
                 "    ssh:", f"      port: {ssh_port or h.ssh_port}", f"      user: {self.user}",
                 f"      key: {key or self.client_key}", f"      install_dir: {h.root / 'raftdeck'}"]
        if python:
            lines.append(f"      python: {python}")
        return "\n".join(lines) + "\n" + extra

    # -- cleanup --

    def agent_pids(self) -> list[int]:
        """Every process whose command line mentions one of our hosts' directories."""
        pids = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if "nodeagent" in cmd and str(self.tmp) in cmd:
                pids.append(int(d))
        return pids

    def close(self) -> None:
        for pid in self.agent_pids():
            _kill(pid)
        for h in self.hosts:
            for p in h.sshds:
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=10)
            if h.ns:
                r = _run("ip", "netns", "pids", h.ns, check=False)
                for pid in r.stdout.split():
                    _kill(int(pid))
                _run("ip", "netns", "del", h.ns, check=False)
                _run("ip", "link", "del", f"rd{self.slot}h{h.index}a", check=False)
        if self.bridge:
            _run("ip", "link", "del", self.bridge, check=False)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def free_port_on(addr: str) -> int:
    return _free_port(addr) if not addr.startswith("10.77.") else _free_port("0.0.0.0")


def _mode_param() -> str:
    return ssh_mode() if os.path.exists(SSHD) else "no-sshd"


@pytest.fixture(scope="session", params=[_mode_param()])
def ssh_mode_name(request) -> str:
    """netns or loopback; it is also in every ssh test's id (``test_x[netns]``), so any
    report that lists the tests says which mode ran."""
    if not os.path.exists(SSHD):
        pytest.skip("no /usr/sbin/sshd: install openssh-server (.ci/run does)")
    mode = ssh_mode()
    print(f"\nssh tests run in {mode} mode" + (f" ({MODE_REASON})" if MODE_REASON else ""),
          file=sys.stderr)
    return mode


@pytest.fixture
def ssh_hosts(tmp_path, ssh_mode_name):
    """``ssh_hosts(n)``: N fresh hosts with sshd; all torn down after the test."""
    made: list[SSHHosts] = []

    def make(n: int) -> SSHHosts:
        hs = SSHHosts(tmp_path / f"hosts{len(made)}", n, ssh_mode_name)
        made.append(hs)
        return hs

    yield make
    for hs in made:
        hs.close()
