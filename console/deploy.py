"""Deploy, upgrade, undeploy and control agents on remote hosts over SSH (asyncssh).

For every inventory node with an ``ssh:`` mapping, ``Deployer.deploy`` connects (client
keys from ``ssh.key``, else the SSH agent and the default keys; host keys checked against
known_hosts, unknown ones learnt only with ``accept_new``, a *changed* one never), checks
the host's Python (>= 3.11), uploads what is missing of the wheels (this project's wheel,
built here once per run, and a wheelhouse of the agent's runtime dependencies, so the
hosts need no internet), creates or reuses a venv under ``ssh.install_dir``, installs,
writes the node config (0600) and the TLS material (the node's key 0600; never the CA
key), starts the agent as a detached process with a pid file, and checks its health
through its client port (a ``status`` request).

What was deployed is recorded on the host (``manifest.json``: digests of the project
wheel, the wheelhouse, the node config and the TLS files). A second run compares and does
nothing for a host whose inputs did not change and whose agent runs and answers.

The host-side work is done by ``console/remote.py``, a stdlib-only program sent as the
program text of ``python3 -`` for each operation (see there). Every failure is one
``HostError`` line for that host: who (node, user@host:port), what failed, what to do.
The other hosts carry on.

Remote layout, under ``install_dir`` (relative paths: under the login directory)::

    venv/                 the agent's dependencies (a venv created --without-pip)
    releases/<digest>/    one folder per project version (pip --target); the agent runs with
                          PYTHONPATH=<its release>, so installing a new one never touches the
                          files of the running agent; the current and previous are kept
    wheels/               the uploaded wheels (kept: a rerun uploads only what changed)
    tls/                  ca.crt, node.crt, node.key (0600), when the inventory has TLS
    node.yaml             the node config (0600)
    manifest.json         digests of what the running deploy installed
    <data_dir>            as in the inventory (default .raftdeck/<name>), with
    <data_dir>.pid, .stderr  and the agent's JSON log <data_dir>/../<name>.log
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import getpass
import hashlib
import importlib.metadata as md
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from nodeagent.config import ClusterConfig, Inventory, NodeConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
AGENT_REQUIREMENTS = ("trio", "msgpack", "pyyaml", "cryptography")  # what nodeagent imports
MIN_PYTHON = (3, 11)
MANIFEST_VERSION = 1
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_REMOTE_PROGRAM = (Path(__file__).with_name("remote.py")).read_text()


class HostError(Exception):
    """One host's failure; ``str()`` is one line: who, what failed, what to do."""


class DeployError(Exception):
    """A failure before any host is touched (building the wheels, a bad option)."""


# == wheels ======================================================================================


@dataclass(frozen=True)
class Wheel:
    path: Path
    sha256: str  # of the file
    digest: str  # of its contents (names and file hashes; not zip timestamps)

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def of(cls, path: Path) -> "Wheel":
        data = path.read_bytes()
        return cls(path, hashlib.sha256(data).hexdigest(), content_digest(path))


def content_digest(path: Path) -> str:
    """A digest of a wheel's contents that does not depend on zip timestamps or order."""
    h = hashlib.sha256()
    with zipfile.ZipFile(path) as z:
        for name in sorted(z.namelist()):
            if name.endswith(".dist-info/RECORD"):
                continue
            h.update(name.encode() + b"\0" + hashlib.sha256(z.read(name)).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class Artifacts:
    project: Wheel
    deps: tuple[Wheel, ...]
    pip: Wheel

    @property
    def deps_digest(self) -> str:
        h = hashlib.sha256()
        for w in sorted(self.deps, key=lambda w: w.name):
            h.update(f"{w.name} {w.digest}\n".encode())
        return h.hexdigest()

    @property
    def all(self) -> tuple[Wheel, ...]:
        return (self.project, self.pip, *self.deps)

    @property
    def size(self) -> int:
        return sum(w.path.stat().st_size for w in self.all)


def build_project_wheel(out_dir: Path, root: Path = PROJECT_ROOT) -> Path:
    """This project's wheel, built from a copy of the source tree (so concurrent builds and
    the tree's own build/ directory never interfere), or, for an installed console without
    a source tree, repacked from the installed distribution."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (root / "pyproject.toml").exists():
        return repack_installed("raftdeck", out_dir)
    with tempfile.TemporaryDirectory(prefix="raftdeck-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            if (root / name).exists():
                shutil.copy2(root / name, src / name)
        for pkg in ("nodeagent", "console"):
            shutil.copytree(root / pkg, src / pkg,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "__snapshots__"))
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "--disable-pip-version-check", "-q",
                            "-w", str(Path(tmp) / "out"), str(src)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            tail = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()][-1:]
            raise DeployError(f"building the raftdeck wheel failed: {' '.join(tail)}; "
                              "install setuptools and wheel (`pip install setuptools wheel`)")
        built = sorted((Path(tmp) / "out").glob("raftdeck-*.whl"))
        if not built:
            raise DeployError("building the raftdeck wheel produced no wheel")
        dest = out_dir / built[0].name
        shutil.move(str(built[0]), dest)
        return dest


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(names: Iterable[str]) -> list[md.Distribution]:
    """The installed distributions ``names`` need, recursively, with environment markers
    evaluated for this Python (extras are not followed)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - pip always vendors it
        from pip._vendor.packaging.requirements import Requirement  # type: ignore
    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        name = _canonical(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise DeployError(f"the agent needs {name}, which is not installed here; "
                              f"`pip install {name}` (or pass --wheelhouse DIR)") from None
        seen[name] = dist
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return [seen[k] for k in sorted(seen)]


def repack_installed(name: str, out_dir: Path) -> Path:
    """Rebuild the wheel of an installed distribution from its RECORD (files under
    site-packages; scripts and bytecode are left out), with fixed timestamps, so the same
    installation always gives the same bytes. Its tags are the ones pip recorded in the
    installed WHEEL file, so a compiled package keeps its platform."""
    dist = md.distribution(name)
    meta_dir = None
    files = []
    for f in dist.files or ():
        s = str(f).replace(os.sep, "/")
        if s.startswith("..") or "/__pycache__/" in f"/{s}" or s.endswith(".pyc"):
            continue
        top = s.split("/", 1)[0]
        if top.endswith(".dist-info"):
            meta_dir = top
            if s.rsplit("/", 1)[-1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue
        files.append((s, Path(f.locate())))
    if meta_dir is None:
        raise DeployError(f"cannot rebuild a wheel of {name}: no .dist-info in its RECORD")
    tags = [ln.split(":", 1)[1].strip() for ln in (dist.read_text("WHEEL") or "").splitlines()
            if ln.startswith("Tag:")] or ["py3-none-any"]
    parts = [t.split("-") for t in tags]
    tag = "-".join(".".join(dict.fromkeys(p[i] for p in parts)) for i in range(3))
    dist_name, version = meta_dir[: -len(".dist-info")].rsplit("-", 1)
    path = out_dir / f"{dist_name}-{version}-{tag}.whl"
    out_dir.mkdir(parents=True, exist_ok=True)
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for arc, src in sorted(files):
            data = src.read_bytes()
            info = zipfile.ZipInfo(arc, _ZIP_TIME)
            info.external_attr = ((0o755 if os.access(src, os.X_OK) else 0o644) | 0o100000) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{arc},sha256={digest},{len(data)}")
        record.append(f"{meta_dir}/RECORD,,")
        info = zipfile.ZipInfo(f"{meta_dir}/RECORD", _ZIP_TIME)
        info.external_attr = 0o100644 << 16
        z.writestr(info, "\n".join(record) + "\n")
    return path


def build_artifacts(work_dir: Path, *, wheel: Path | None = None,
                    wheelhouse: Path | None = None) -> Artifacts:
    """The project wheel (``wheel``, or built here), the agent's dependencies
    (``wheelhouse``'s wheels, or rebuilt from this machine's installed packages) and pip's
    own wheel (to install with on hosts that have no pip)."""
    work_dir = Path(work_dir)
    project = Path(wheel) if wheel else build_project_wheel(work_dir / "project")
    if not project.is_file():
        raise DeployError(f"--wheel {project}: no such file")
    deps_dir = work_dir / "deps"
    deps: list[Path] = []
    pip_wheel = None
    if wheelhouse:
        found = sorted(Path(wheelhouse).glob("*.whl"))
        if not found:
            raise DeployError(f"--wheelhouse {wheelhouse}: no wheels there")
        for p in found:
            if _canonical(p.name.split("-", 1)[0]) == "pip":
                pip_wheel = p
            elif _canonical(p.name.split("-", 1)[0]) != "raftdeck":
                deps.append(p)
    else:
        for dist in dependency_closure(AGENT_REQUIREMENTS):
            deps.append(repack_installed(dist.metadata["Name"], deps_dir))
    if pip_wheel is None:
        pip_wheel = repack_installed("pip", work_dir / "pip")
    return Artifacts(Wheel.of(project), tuple(Wheel.of(p) for p in deps), Wheel.of(pip_wheel))


# == the remote layout and the node config =======================================================


@dataclass(frozen=True)
class Layout:
    home: PurePosixPath
    install_dir: PurePosixPath
    data_dir: PurePosixPath
    log_file: PurePosixPath

    def _p(self, name: str) -> PurePosixPath:
        return self.install_dir / name

    venv = property(lambda self: self._p("venv"))
    releases = property(lambda self: self._p("releases"))
    wheels = property(lambda self: self._p("wheels"))
    tls = property(lambda self: self._p("tls"))
    config = property(lambda self: self._p("node.yaml"))
    manifest = property(lambda self: self._p("manifest.json"))
    python = property(lambda self: self._p("venv") / "bin" / "python")

    def release(self, project_digest: str) -> PurePosixPath:
        """The folder one version of the project is installed in (pip --target)."""
        return self.releases / project_digest[:16]

    @property
    def pid_file(self) -> PurePosixPath:
        return self.data_dir.with_name(self.data_dir.name + ".pid")

    @property
    def stderr_file(self) -> PurePosixPath:
        return self.data_dir.with_name(self.data_dir.name + ".stderr")


def layout(node: NodeConfig, home: str) -> Layout:
    h = PurePosixPath(home)
    assert node.ssh is not None
    inst = h / node.ssh.install_dir  # an absolute install_dir replaces home
    data = h / PurePosixPath(node.data_dir)
    log = h / PurePosixPath(node.log_file) if node.log_file is not None else \
        data.parent / f"{node.name}.log"
    return Layout(h, inst, data, log)


def tls_sources(inv: Inventory, node: NodeConfig) -> dict[str, Path] | None:
    """The local TLS files for a node: the cluster CA's certificate and the node's own
    certificate and key (``<tls dir>/nodes/<name>.crt|.key``, the layout `raftdeck init`
    writes). None when the inventory has no TLS. The CA key is never among them."""
    tls = inv.cluster.tls
    if tls is None:
        return None
    if hasattr(tls, "for_node"):  # the TLSConfig that knows the init layout ({dir: D} / on)
        mine = tls.for_node(node.name)
        return {"ca": Path(mine.ca), "cert": Path(mine.cert), "key": Path(mine.key)}
    base = getattr(tls, "dir", None)
    ca = getattr(tls, "ca", None)
    base = Path(base) if base else Path(ca).parent
    ca = Path(ca) if ca else base / "ca.crt"
    return {"ca": ca, "cert": base / "nodes" / f"{node.name}.crt",
            "key": base / "nodes" / f"{node.name}.key"}


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def node_config_text(inv: Inventory, node: NodeConfig, lay: Layout,
                     tls_remote: dict[str, str] | None) -> str:
    """The node config (`nodeagent run --config`) for one remote node, as YAML. Every
    cluster setting of the inventory is carried over; paths are the host's."""
    import yaml

    cluster: dict[str, Any] = {}
    for f in dataclasses.fields(ClusterConfig):
        v = getattr(inv.cluster, f.name)
        if f.name == "tls" or not _scalar(v):
            continue
        cluster[f.name] = v
    if tls_remote:
        cluster["tls"] = dict(tls_remote)
    me: dict[str, Any] = {"name": node.name, "host": node.host, "port": node.port,
                          "priority": node.priority, "capacity": node.capacity,
                          "role": node.role, "allow_shell": node.allow_shell,
                          "data_dir": str(lay.data_dir), "log_file": str(lay.log_file)}
    if node.metrics_port is not None:
        me["metrics_port"] = node.metrics_port
    peers = [{"name": n.name, "host": n.host, "port": n.port, "priority": n.priority,
              "role": n.role} for n in inv.nodes if n.name != node.name]
    head = f"# written by raftdeck deploy from {inv.path.name}; changes here are overwritten\n"
    return head + yaml.safe_dump({"cluster": cluster, "node": me, "peers": peers},
                                 sort_keys=False, default_flow_style=False)


# == progress ====================================================================================


@dataclass
class HostRow:
    name: str
    address: str  # user@host:port
    step: str = "waiting"
    state: str = "pending"  # pending | running | ok | unchanged | failed
    message: str = ""
    changed: tuple[str, ...] = ()
    started: float | None = None
    finished: float | None = None

    @property
    def done(self) -> bool:
        return self.state in ("ok", "unchanged", "failed")

    @property
    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.monotonic()) - self.started


class DeployProgress:
    """Per-host step and state of one deploy / upgrade / undeploy run (pure: the CLI's
    progress display and the console's deploy screen both read it). ``listeners`` are
    called with the row after every change."""

    def __init__(self, action: str = "deploy"):
        self.action = action
        self.rows: dict[str, HostRow] = {}
        self.listeners: list[Callable[[HostRow], None]] = []
        self.version = 0
        self.error: str | None = None  # the run itself failed (e.g. building the wheels)
        self.ended = False  # the run returned or failed (set by whoever runs it)

    def add(self, name: str, address: str) -> None:
        self.rows[name] = HostRow(name, address)

    def update(self, name: str, *, step: str | None = None, state: str | None = None,
               message: str | None = None, changed: Iterable[str] | None = None) -> None:
        row = self.rows.get(name) or self.rows.setdefault(name, HostRow(name, ""))
        if step is not None:
            row.step = step
        if state is not None:
            if state == "running" and row.started is None:
                row.started = time.monotonic()
            row.state = state
            if row.done:
                row.finished = time.monotonic()
        if message is not None:
            row.message = message
        if changed is not None:
            row.changed = tuple(changed)
        self.version += 1
        for fn in list(self.listeners):
            fn(row)

    @property
    def failed(self) -> list[HostRow]:
        return [r for r in self.rows.values() if r.state == "failed"]

    @staticmethod
    def line(row: HostRow) -> str:
        """One host's line: its step while it runs, the outcome once done (a failure is
        the host's one-line error)."""
        if row.state == "failed":
            return f"FAILED {row.message}"
        el = f" ({row.elapsed:.1f}s)" if row.done and row.elapsed is not None else ""
        if row.done:
            return f"{row.name}  {row.address}  {row.message or row.state}{el}"
        if row.state == "pending":
            return f"{row.name}  {row.address}  waiting"
        return f"{row.name}  {row.address}  {row.step}..."


# == SSH =========================================================================================


def who(node: NodeConfig) -> str:
    assert node.ssh is not None
    user = node.ssh.user or getpass.getuser()
    host = f"[{node.ssh.host}]" if ":" in node.ssh.host else node.ssh.host
    return f"{node.name} ({user}@{host}:{node.ssh.port})"


def _known_hosts_pattern(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


@dataclass
class SSHOptions:
    known_hosts: Path = field(default_factory=lambda: Path.home() / ".ssh" / "known_hosts")
    accept_new: bool = False
    connect_timeout: float = 10.0
    command_timeout: float = 300.0


def _client_class():
    import asyncssh

    class HostKeyPolicy(asyncssh.SSHClient):
        """Called by asyncssh for a host key that known_hosts does not trust: accept it
        only when the host has no entry at all there and new keys may be learnt."""

        def __init__(self, known, accept_new: bool):
            self.known = known
            self.accept_new = accept_new
            self.offered = None
            self.host_known = False
            self.learnt = False

        def validate_host_public_key(self, host, addr, port, key) -> bool:
            self.offered = key
            self.host_known = bool(self.known.match(host, addr, port)[0])
            if self.host_known or not self.accept_new:
                return False
            self.learnt = True
            return True

    return HostKeyPolicy


def _fingerprint(key) -> str:
    return f"{key.get_algorithm()} {key.get_fingerprint()}"


async def ssh_connect(node: NodeConfig, opts: SSHOptions):
    """An asyncssh connection to the node's host, or ``HostError`` (one line)."""
    import asyncssh

    ssh = node.ssh
    assert ssh is not None
    w = who(node)
    keys = None
    if ssh.key is not None:
        try:
            keys = [asyncssh.read_private_key(str(ssh.key))]
        except FileNotFoundError:
            raise HostError(f"{w}: ssh.key {ssh.key} does not exist; fix the path in the "
                            "inventory") from None
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, OSError) as e:
            raise HostError(f"{w}: cannot use ssh.key {ssh.key} ({e}); give an unencrypted "
                            "key, or leave ssh.key out to use the SSH agent") from None
    try:
        text = opts.known_hosts.read_text()
    except FileNotFoundError:
        text = ""
    except OSError as e:
        raise HostError(f"{w}: cannot read {opts.known_hosts}: {e.strerror}") from None
    known = asyncssh.import_known_hosts(text)
    policy = _client_class()(known, opts.accept_new)
    kw: dict[str, Any] = {"port": ssh.port, "known_hosts": known,
                          "client_factory": lambda: policy, "connect_timeout": opts.connect_timeout,
                          "keepalive_interval": 15}
    if ssh.user:
        kw["username"] = ssh.user
    if keys is not None:
        kw["client_keys"] = keys
        kw["agent_path"] = None
    try:
        conn = await asyncio.wait_for(asyncssh.connect(ssh.host, **kw), opts.connect_timeout + 5)
    except asyncssh.HostKeyNotVerifiable:
        fp = _fingerprint(policy.offered) if policy.offered is not None else "its key"
        pattern = _known_hosts_pattern(ssh.host, ssh.port)
        if policy.host_known:
            raise HostError(f"{w}: host key CHANGED (now {fp}; {opts.known_hosts} has another "
                            f"for {pattern}): refusing to connect; if the host was "
                            f"reinstalled, remove the old key with ssh-keygen -R '{pattern}' "
                            f"-f {opts.known_hosts} and run again") from None
        raise HostError(f"{w}: unknown host key ({fp}), not in {opts.known_hosts}; check the "
                        "fingerprint on the host (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) "
                        "and run again with --accept-new-host-keys") from None
    except asyncssh.PermissionDenied:
        user = ssh.user or getpass.getuser()
        tried = f"key {ssh.key}" if ssh.key else "the SSH agent's and default keys"
        raise HostError(f"{w}: authentication refused (tried {tried}); add the public key to "
                        f"~{user}/.ssh/authorized_keys on the host, or set ssh.key and ssh.user "
                        "in the inventory") from None
    except (asyncio.TimeoutError, TimeoutError):
        raise HostError(f"{w}: cannot connect: no answer within {opts.connect_timeout:g}s; "
                        "check ssh.host and ssh.port, and that the host is up") from None
    except ConnectionRefusedError:
        raise HostError(f"{w}: cannot connect: connection refused; check ssh.port and that "
                        "sshd runs on the host") from None
    except OSError as e:
        why = (e.strerror or str(e) or type(e).__name__).rstrip(".")
        raise HostError(f"{w}: cannot connect: {why[0].lower() + why[1:]}; check ssh.host and "
                        "the network path to the host") from None
    except asyncssh.Error as e:
        raise HostError(f"{w}: SSH failed: {e.reason}; check the host's sshd log") from None
    if policy.learnt and policy.offered is not None:
        _learn_host_key(opts.known_hosts, ssh.host, ssh.port, policy.offered)
    return conn


def _learn_host_key(path: Path, host: str, port: int, key) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = " ".join(key.export_public_key().decode().split()[:2])
    with open(path, "a") as f:
        f.write(f"{_known_hosts_pattern(host, port)} {line}\n")


async def _run(conn, command: str, *, input: str | None = None, timeout: float = 300.0):
    return await asyncio.wait_for(conn.run(command, input=input, check=False), timeout)


async def remote_op(conn, node: NodeConfig, op: str, /, *, wait: float = 300.0, **fields) -> dict:
    """Run one ``console/remote.py`` operation on the host; its JSON answer."""
    assert node.ssh is not None
    arg = json.dumps({"op": op, **{k: (str(v) if isinstance(v, PurePosixPath) else v)
                                   for k, v in fields.items()}})
    import asyncssh

    try:
        r = await _run(conn, f"{shlex.quote(node.ssh.python)} - {shlex.quote(arg)}",
                       input=_REMOTE_PROGRAM, timeout=wait)
    except asyncio.TimeoutError:
        # Named here, so that every caller (kill, logs, reload, restore, remove-node...)
        # says which host and step, not a bare "timed out".
        raise HostError(f"{who(node)}: {op}: no answer within {wait:g}s; check the host "
                        "(load, disk, sshd) and run again") from None
    except (asyncssh.Error, OSError) as e:
        raise HostError(_describe_io(node, e, f"during {op}")) from None
    for ln in reversed((r.stdout or "").splitlines()):
        if ln.startswith("{"):
            try:
                return json.loads(ln)
            except ValueError:
                break
    err = " ".join((r.stderr or r.stdout or f"exit status {r.exit_status}").split())[-300:]
    raise HostError(f"{who(node)}: {op} failed on the host: {err}")


async def check_python(conn, node: NodeConfig) -> tuple[tuple[int, int, int], str, str]:
    """(version, machine, home) of ``ssh.python`` on the host, or ``HostError``."""
    assert node.ssh is not None
    py = node.ssh.python
    code = ("import sys, os, platform; print('RAFTDECK', *sys.version_info[:3], "
            "platform.machine(), os.path.expanduser('~'))")
    r = await _run(conn, f"{shlex.quote(py)} -c {shlex.quote(code)}", timeout=60)
    out = [ln for ln in (r.stdout or "").splitlines() if ln.startswith("RAFTDECK ")]
    if r.exit_status == 127 or (not out and ("not found" in (r.stderr or "")
                                             or "No such file" in (r.stderr or ""))):
        raise HostError(f"{who(node)}: no Python on the host ({py}: command not found); install "
                        "Python 3.11 or newer there, or set ssh.python to its path")
    if not out:
        err = " ".join((r.stderr or "").split())[-200:] or f"exit status {r.exit_status}"
        raise HostError(f"{who(node)}: {py} does not run on the host ({err}); install Python "
                        "3.11 or newer there, or set ssh.python to its path")
    parts = out[-1].split()
    version = (int(parts[1]), int(parts[2]), int(parts[3]))
    if version[:2] < MIN_PYTHON:
        raise HostError(f"{who(node)}: {py} on the host is Python "
                        f"{'.'.join(map(str, version))}, too old; install Python 3.11 or newer "
                        "and set ssh.python to it")
    return version, parts[4], " ".join(parts[5:])


# == the deployer ================================================================================


@dataclass
class HostResult:
    name: str
    ok: bool
    action: str  # deployed | updated | started | unchanged | upgraded | removed | failed ...
    message: str = ""
    changed: tuple[str, ...] = ()
    pid: int | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def remote_nodes(inv: Inventory, names: Iterable[str] | None = None) -> list[NodeConfig]:
    """The inventory's nodes with ``ssh:`` (in inventory order), restricted to ``names``.
    ``KeyError`` for an unknown name; ``DeployError`` for a named node without ssh."""
    if names is None:
        return [n for n in inv.nodes if n.ssh is not None]
    out = []
    for name in names:
        n = inv.node(name)
        if n.ssh is None:
            raise DeployError(f"{name} has no ssh: settings in {inv.path.name}; deploy only "
                              "manages nodes with ssh:")
        out.append(n)
    return out


class Deployer:
    """Deploy, upgrade, undeploy and control the ``ssh:`` nodes of one inventory."""

    def __init__(self, inv: Inventory, *, ssh: SSHOptions | None = None,
                 artifacts: Artifacts | None = None, parallel: int = 4,
                 progress: DeployProgress | None = None, health_timeout: float = 30.0,
                 client_ssl=None):
        self.inv = inv
        self.opts = ssh or SSHOptions()
        self.artifacts = artifacts
        self.parallel = max(1, parallel)
        self.progress = progress or DeployProgress()
        self.health_timeout = health_timeout
        self.client_ssl = client_ssl  # an ssl.SSLContext for the health check when TLS is on

    # -- helpers --

    def _track(self, nodes: list[NodeConfig], action: str) -> None:
        self.progress.action = action
        for n in nodes:
            if n.name not in self.progress.rows:
                self.progress.add(n.name, who(n).split(" ", 1)[1].strip("()"))

    def _step(self, name: str, step: str) -> None:
        self.progress.update(name, step=step, state="running")

    async def _each(self, nodes: list[NodeConfig], fn, action: str) -> dict[str, HostResult]:
        self._track(nodes, action)
        sem = asyncio.Semaphore(self.parallel)

        async def one(node: NodeConfig) -> HostResult:
            async with sem:
                return await self._guarded(node, fn)

        results = await asyncio.gather(*(one(n) for n in nodes))
        return {r.name: r for r in results}

    async def _guarded(self, node: NodeConfig, fn) -> HostResult:
        self.progress.update(node.name, state="running")
        try:
            r = await fn(node)
        except HostError as e:
            r = HostResult(node.name, False, "failed", str(e))
        except asyncio.TimeoutError:
            r = HostResult(node.name, False, "failed",
                           f"{who(node)}: {self.progress.rows[node.name].step}: timed out; "
                           "check the host (load, disk) and run again")
        except Exception as e:  # one host's surprise must not stop the others
            import asyncssh

            if isinstance(e, (asyncssh.Error, OSError)):
                r = HostResult(node.name, False, "failed", _describe_io(node, e))
            else:
                r = HostResult(node.name, False, "failed",
                               f"{who(node)}: internal error: {type(e).__name__}: {e}")
        self.progress.update(node.name, state="failed" if not r.ok else
                             ("unchanged" if r.action == "unchanged" else "ok"),
                             message=r.message, changed=r.changed)
        return r

    async def _health(self, node: NodeConfig, timeout: float | None = None) -> dict:
        """The agent's status through its client port, or ``HostError``."""
        from console.client import ClusterClient

        deadline = time.monotonic() + (timeout or self.health_timeout)
        last: Any = "no answer"
        async with ClusterClient({node.name: (node.host, node.port)}, self.inv.cluster.name,
                                 timeout=2.0, op_timeout=5.0, ssl=self.client_ssl) as client:
            while time.monotonic() < deadline:
                try:
                    st = await asyncio.wait_for(client.call(node.name, "status"), 5.0)
                    if isinstance(st, dict) and st.get("node") == node.name:
                        return st
                    last = f"answered as {st.get('node') if isinstance(st, dict) else st!r}"
                except Exception as e:  # not up yet: try again until the deadline
                    last = str(e) or type(e).__name__
                await asyncio.sleep(0.3)
        raise HostError(f"{who(node)}: the agent runs but does not answer status on "
                        f"{node.host}:{node.port} ({last}); check that the console can reach that "
                        "address, and see `raftdeck logs " + node.name + "`")

    async def _layout(self, conn, node: NodeConfig) -> tuple[Layout, tuple[int, int, int], str]:
        self._step(node.name, "check python")
        version, machine, home = await check_python(conn, node)
        return layout(node, home), version, machine

    # -- deploy --

    async def deploy(self, names: Iterable[str] | None = None, *,
                     restart_changed: bool = True, join: bool = False) -> dict[str, HostResult]:
        nodes = remote_nodes(self.inv, names)
        return await self._each(
            nodes, lambda n: self.deploy_one(n, restart=restart_changed, join=join), "deploy")

    def _desired(self, node: NodeConfig, lay: Layout) -> tuple[dict, str, dict[str, Path] | None]:
        tls_src = tls_sources(self.inv, node)
        tls_remote = None
        tls_hashes = None
        if tls_src is not None:
            tls_remote = {"ca": str(lay.tls / "ca.crt"), "cert": str(lay.tls / "node.crt"),
                          "key": str(lay.tls / "node.key")}
            tls_hashes = {}
            for k, p in tls_src.items():
                try:
                    tls_hashes[k] = hashlib.sha256(p.read_bytes()).hexdigest()
                except OSError as e:
                    raise HostError(f"{who(node)}: TLS file {p} for {k}: {e.strerror}; run "
                                    "`raftdeck init` to create the cluster's certificates") from None
        config = node_config_text(self.inv, node, lay, tls_remote)
        assert self.artifacts is not None
        want = {"version": MANIFEST_VERSION, "node": node.name,
                "project": self.artifacts.project.digest,
                "project_wheel": self.artifacts.project.name,
                "release": str(lay.release(self.artifacts.project.digest)),
                "deps": self.artifacts.deps_digest,
                "config": hashlib.sha256(config.encode()).hexdigest(),
                "tls": tls_hashes}
        return want, config, tls_src

    async def deploy_one(self, node: NodeConfig, *, restart: bool = True,
                         force_restart: bool = False, check_only: bool = False,
                         join: bool = False) -> HostResult:
        """Bring one host to the desired state; restart its agent only if its inputs
        changed (or ``force_restart``), or start it if it does not run. ``check_only``:
        change nothing; the result's action is ``unchanged`` or ``would_change``.
        ``join``: the node was just added to the running cluster (`raftdeck add-node`);
        its agent starts with ``--join``."""
        name = node.name
        self._step(name, "connect")
        conn = await ssh_connect(node, self.opts)
        async with conn:
            lay, version, machine = await self._layout(conn, node)
            want, config, tls_src = self._desired(node, lay)
            self._step(name, "probe")
            probe = await remote_op(conn, node, "probe", install_dir=lay.install_dir,
                                    wheel_dir=lay.wheels, manifest=lay.manifest,
                                    pid_file=lay.pid_file, config=lay.config,
                                    hash_files=[str(lay.python)], exists=[want["release"]])
            _check_ok(node, "probe", probe)
            have = probe.get("manifest") or {}
            have_inputs = {k: have.get(k) for k in want}
            venv_ok = probe["files"].get(str(lay.python)) is not None
            release_ok = probe["exists"].get(want["release"], False)
            changed = [k for k in ("project", "deps", "config", "tls")
                       if have_inputs.get(k) != want[k]]
            if not have:
                changed = ["new"]
            agent = probe.get("agent") or {}
            state = agent.get("state")
            if not changed and venv_ok and release_ok and state in ("running", "paused") \
                    and not force_restart:
                if state == "paused":
                    return HostResult(name, True, "unchanged",
                                      f"unchanged; the agent (pid {agent.get('pid')}) is PAUSED: "
                                      f"`raftdeck resume {name}`", (), agent.get("pid"))
                self._step(name, "health")
                await self._health(node)
                return HostResult(name, True, "unchanged",
                                  f"unchanged (agent pid {agent.get('pid')} answers)", (),
                                  agent.get("pid"))
            if check_only:
                return HostResult(name, True, "would_change" if changed or not venv_ok or
                                  not release_ok or state not in ("running", "paused")
                                  else "unchanged",
                                  "", tuple(changed), agent.get("pid"))
            if changed == ["tls"] and venv_ok and release_ok and state == "running" \
                    and restart and not force_restart:
                reloaded = await self._reload_tls(conn, node, lay, config, tls_src, want, version)
                if reloaded is not None:
                    return reloaded
            need_install = not (venv_ok and release_ok) or \
                bool({"new", "project", "deps"} & set(changed))
            if need_install:
                self._step(name, "upload")
                await self._upload_wheels(conn, node, lay, probe)
                self._step(name, "install")
                r = await remote_op(conn, node, "install", venv=lay.venv,
                                    release=want["release"],
                                    pip_wheel=lay.wheels / self.artifacts.pip.name,
                                    deps=[str(lay.wheels / w.name) for w in self.artifacts.deps]
                                    if not venv_ok or {"new", "deps"} & set(changed) else [],
                                    project_wheel=lay.wheels / self.artifacts.project.name,
                                    wait=self.opts.command_timeout)
                if not r.get("ok"):
                    raise HostError(_install_error(node, r, version, machine))
            self._step(name, "config")
            await self._write_config(conn, node, lay, config, tls_src)
            if state in ("running", "paused"):
                if not (restart or force_restart):
                    return HostResult(name, True, "installed",
                                      "installed; the agent still runs the old version "
                                      "(restart it, or use `raftdeck upgrade`)",
                                      tuple(changed), agent.get("pid"))
                self._step(name, "stop")
                r = await remote_op(conn, node, "stop", pid_file=lay.pid_file, config=lay.config,
                                    grace_s=10)
                _check_ok(node, "stop", r)
            pid = await self._start(conn, node, lay, want["release"], join=join)
            # only now: a failed run leaves the old manifest, and the next run tries again
            await self._put_manifest(conn, node, lay, want, version)
            # keep this release and the one before (to go back to); remove older ones
            await remote_op(conn, node, "prune", releases=lay.releases,
                            keep=[want["release"], have.get("release") or want["release"]])
        self._step(name, "health")
        st = await self._health(node)
        if "new" in changed:
            action, msg = "deployed", f"deployed, agent pid {pid} answers as {st.get('role')}"
        elif changed:
            action, msg = "updated", (f"updated ({', '.join(changed)}), agent restarted as pid "
                                      f"{pid}, answers as {st.get('role')}")
        elif force_restart:
            action, msg = "restarted", f"restarted as pid {pid}, answers as {st.get('role')}"
        else:
            action, msg = "started", (f"inputs unchanged; the agent was {state or 'stopped'}, "
                                      f"started as pid {pid}")
        return HostResult(name, True, action, msg, tuple(changed), pid)

    async def _reload_tls(self, conn, node: NodeConfig, lay: Layout, config: str,
                          tls_src: dict[str, Path] | None, want: dict,
                          version) -> HostResult | None:
        """Only the TLS files changed and the agent runs: write them and send it SIGHUP
        (it rereads them, keeping its process, its role and its links: no election), then
        check that it presents the new certificate. None when the running agent cannot
        reload (TLS off in it, or a version without the reload): restart it instead."""
        from nodeagent.security import TLSError, cert_file_facts

        name = node.name
        before = (await self._health(node)).get("security") or {}
        had = before.get("cert")
        if tls_src is None or not isinstance(had, dict) or "reload_failures" not in had:
            return None
        try:
            expect = cert_file_facts(tls_src["cert"])["sha256"]
        except TLSError as e:
            raise HostError(f"{who(node)}: {e}; run `raftdeck init`") from None
        self._step(name, "config")
        await self._write_config(conn, node, lay, config, tls_src)
        self._step(name, "reload")
        r = await remote_op(conn, node, "signal", pid_file=lay.pid_file, config=lay.config,
                            signal="HUP", timeout=10)
        if not r.get("ok") and r.get("kind") == "not_running":
            return None  # it stopped meanwhile: start it as any stopped agent
        _check_ok(node, "SIGHUP", r)

        problem = None
        deadline = time.monotonic() + self.health_timeout
        while True:
            cert = ((await self._health(node)).get("security") or {}).get("cert") or {}
            outcome = reload_outcome(had, cert)
            if outcome == "refused":
                problem = (f"the agent refused the new TLS files ({cert.get('reload_error')}); "
                           "it keeps its certificate and runs on. Fix the files (`raftdeck "
                           "init`) and deploy again")
            elif outcome == "reloaded":
                if cert.get("sha256") != expect:
                    problem = (f"after the reload the agent presents certificate "
                               f"{str(cert.get('sha256'))[:16]}, not the deployed {expect[:16]}; "
                               f"see `raftdeck logs {name}`")
            elif time.monotonic() > deadline:
                problem = (f"the agent did not reload its TLS files within "
                           f"{self.health_timeout:g}s of SIGHUP; see `raftdeck logs {name}`")
            else:
                await asyncio.sleep(0.2)
                continue
            break
        if problem is not None:
            # The host holds files its agent does not use: the next deploy writes them again.
            await self._put_manifest(conn, node, lay, {**want, "tls": None}, version)
            raise HostError(f"{who(node)}: {problem}")
        await self._put_manifest(conn, node, lay, want, version)
        pid = r.get("pid")
        return HostResult(name, True, "reloaded",
                          f"TLS files updated; agent pid {pid} reloaded them without a restart "
                          f"(certificate sha256 {expect[:16]})", ("tls",), pid)

    async def _put_manifest(self, conn, node: NodeConfig, lay: Layout, inputs: dict,
                            version) -> None:
        """Record on the host what this deploy installed (compared by the next one)."""
        await self._put_bytes(conn, node, lay.manifest,
                              json.dumps({**inputs, "deployed_at": round(time.time(), 3),
                                          "python": list(version)}, indent=1).encode(), 0o644)

    async def _start(self, conn, node: NodeConfig, lay: Layout, release: str | None = None,
                     *, join: bool = False) -> int:
        self._step(node.name, "start")
        if release is None:  # the deployed one
            probe = await remote_op(conn, node, "probe", manifest=lay.manifest)
            release = (probe.get("manifest") or {}).get("release")
            if not release:
                raise HostError(f"{who(node)}: nothing deployed under {lay.install_dir}; run "
                                "`raftdeck deploy` first")
        r = await remote_op(conn, node, "start", python=lay.python, config=lay.config,
                            pythonpath=release,
                            pid_file=lay.pid_file, stderr_file=lay.stderr_file,
                            log_file=lay.log_file, data_dir=lay.data_dir, cwd=lay.install_dir,
                            node=node.name, host=node.host, port=node.port, wait_s=20,
                            join=join)
        if not r.get("ok"):
            raise HostError(f"{who(node)}: start failed: {r.get('error')}; fix it and run "
                            "`raftdeck deploy` again")
        return r["pid"]

    async def _upload_wheels(self, conn, node: NodeConfig, lay: Layout, probe: dict) -> None:
        assert self.artifacts is not None
        have = probe.get("wheels") or {}
        todo = [w for w in self.artifacts.all if have.get(w.name) != w.sha256]
        need = sum(w.path.stat().st_size for w in todo) + 64 * 1024 * 1024
        free = probe.get("free_bytes")
        if free is not None and free < need:
            raise HostError(f"{who(node)}: not enough disk space: {free // (1 << 20)} MiB free "
                            f"under {lay.install_dir}, about {need // (1 << 20)} MiB needed; free "
                            "some space or point ssh.install_dir elsewhere")
        async with conn.start_sftp_client() as sftp:
            await _makedirs(sftp, lay.wheels)
            for w in todo:
                dest = lay.wheels / w.name
                tmp = str(dest) + ".part"
                try:
                    await sftp.put(str(w.path), tmp)
                    await sftp.posix_rename(tmp, str(dest))
                except Exception as e:
                    raise HostError(_describe_io(node, e, f"uploading {w.name}")) from None

    async def _put_bytes(self, conn, node: NodeConfig, dest: PurePosixPath, data: bytes,
                         mode: int) -> None:
        import asyncssh

        async with conn.start_sftp_client() as sftp:
            await _makedirs(sftp, dest.parent)
            tmp = f"{dest}.part"
            try:
                async with sftp.open(tmp, "wb",
                                     attrs=asyncssh.SFTPAttrs(permissions=mode)) as f:
                    await f.write(data)
                await sftp.chmod(tmp, mode)
                await sftp.posix_rename(tmp, str(dest))
            except Exception as e:
                raise HostError(_describe_io(node, e, f"writing {dest}")) from None

    async def _write_config(self, conn, node: NodeConfig, lay: Layout, config: str,
                            tls_src: dict[str, Path] | None) -> None:
        if tls_src is not None:
            import asyncssh

            async with conn.start_sftp_client() as sftp:
                await _makedirs(sftp, lay.tls)
                try:
                    await sftp.chmod(str(lay.tls), 0o700)
                except asyncssh.SFTPError:
                    pass
            for k, remote_name, mode in (("ca", "ca.crt", 0o644), ("cert", "node.crt", 0o644),
                                         ("key", "node.key", 0o600)):
                await self._put_bytes(conn, node, lay.tls / remote_name,
                                      tls_src[k].read_bytes(), mode)
        await self._put_bytes(conn, node, lay.config, config.encode(), 0o600)

    # -- control --

    async def _with_conn(self, node: NodeConfig, fn):
        conn = await ssh_connect(node, self.opts)
        async with conn:
            lay, _, _ = await self._layout(conn, node)
            return await fn(conn, lay)

    async def process_state(self, node: NodeConfig) -> dict:
        async def go(conn, lay):
            return await remote_op(conn, node, "status", pid_file=lay.pid_file, config=lay.config)

        return await self._with_conn(node, go)

    async def signal(self, node: NodeConfig, sig: str) -> int:
        """SIGKILL (waits until gone, removes the pid file), SIGSTOP, SIGCONT or SIGHUP
        the node's agent over SSH; its pid. ``HostError`` if it does not run."""
        self._track([node], sig.lower())

        async def go(conn, lay):
            r = await remote_op(conn, node, "signal", pid_file=lay.pid_file, config=lay.config,
                                signal=sig, timeout=10)
            if not r.get("ok"):
                if r.get("kind") == "not_running":
                    from console.procs import NotRunning

                    raise NotRunning(f"{node.name} is not running on {node.ssh.host} "
                                     f"({r.get('error')}); `raftdeck restart {node.name}` or "
                                     "`raftdeck deploy` starts it")
                raise HostError(f"{who(node)}: SIG{sig} failed: {r.get('error')}")
            return r["pid"]

        return await self._with_conn(node, go)

    async def stop(self, node: NodeConfig, grace_s: float = 10.0) -> int | None:
        """Stop the node's agent over SSH (SIGTERM, SIGKILL after ``grace_s``); the pid it
        had, None if it was not running. Its files and data stay."""
        self._track([node], "stop")

        async def go(conn, lay):
            r = await remote_op(conn, node, "stop", pid_file=lay.pid_file, config=lay.config,
                                grace_s=grace_s)
            _check_ok(node, "stop", r)
            return r.get("pid")

        return await self._with_conn(node, go)

    async def restart(self, node: NodeConfig) -> tuple[int | None, int]:
        """Kill the agent if it runs, start it again from the deployed files; (old, new) pid."""

        async def go(conn, lay):
            old = None
            r = await remote_op(conn, node, "signal", pid_file=lay.pid_file, config=lay.config,
                                signal="KILL", timeout=10)
            if r.get("ok"):
                old = r["pid"]
            elif r.get("kind") != "not_running":
                raise HostError(f"{who(node)}: SIGKILL failed: {r.get('error')}")
            return old, await self._start(conn, node, lay)

        self._track([node], "restart")
        return await self._with_conn(node, go)

    async def logs(self, node: NodeConfig, lines: int = 100) -> dict:
        async def go(conn, lay):
            r = await remote_op(conn, node, "logs", log_file=lay.log_file,
                                stderr_file=lay.stderr_file, lines=lines)
            return {"log": r.get("log") or [], "stderr": r.get("stderr") or [],
                    "log_file": str(lay.log_file), "stderr_file": str(lay.stderr_file)}

        return await self._with_conn(node, go)

    # -- restore (console/backup.py prepares the directories) --

    async def data_dir_state(self, node: NodeConfig) -> dict:
        """Whether the node's agent runs and its data directory is absent, empty or used:
        ``{"state", "pid", "data", "where"}`` (``where``: host:path, for messages)."""

        async def go(conn, lay):
            r = await remote_op(conn, node, "datadir", pid_file=lay.pid_file, config=lay.config,
                                data_dir=lay.data_dir)
            _check_ok(node, "datadir", r)
            return {**r, "where": f"{node.ssh.host}:{lay.data_dir}"}

        return await self._with_conn(node, go)

    async def restore(self, prepared: dict[str, Path]) -> dict[str, HostResult]:
        """Upload each node's prepared data directory (``prepared``: name -> local folder)
        beside its data directory on the host, and have the host check it file by file,
        fsync it and rename it into place (remote op ``adopt``). Each host is all or
        nothing: its data directory is either what was prepared or as it was."""
        nodes = remote_nodes(self.inv, prepared)
        return await self._each(nodes, lambda n: self._restore_one(n, prepared[n.name]),
                                "restore")

    async def _restore_one(self, node: NodeConfig, local: Path) -> HostResult:
        from console.remote import file_sha256

        files = {p.relative_to(local).as_posix(): [p.stat().st_size, file_sha256(p)]
                 for p in sorted(local.rglob("*")) if p.is_file()}

        async def go(conn, lay):
            staging = lay.data_dir.with_name(lay.data_dir.name + ".restoring")
            self._step(node.name, "upload")
            r = await remote_op(conn, node, "remove", paths=[str(staging)])  # a failed try's
            _check_ok(node, "remove", r)
            async with conn.start_sftp_client() as sftp:
                await _makedirs(sftp, staging)
                try:
                    await sftp.put([str(p) for p in sorted(local.iterdir())], str(staging),
                                   recurse=True)
                except Exception as e:
                    raise HostError(_describe_io(node, e, f"uploading to {staging}")) from None
            self._step(node.name, "adopt")
            r = await remote_op(conn, node, "adopt", pid_file=lay.pid_file, config=lay.config,
                                data_dir=lay.data_dir, staging=staging, files=files)
            if not r.get("ok") and r.get("kind") in ("running", "not_empty"):
                await remote_op(conn, node, "remove", paths=[str(staging)])
                raise HostError(f"{who(node)}: {r.get('error')}; nothing was written there")
            _check_ok(node, "adopt", r)
            return HostResult(node.name, True, "restored",
                              f"{len(files)} files in {node.ssh.host}:{lay.data_dir}")

        return await self._with_conn(node, go)

    # -- undeploy --

    async def undeploy(self, names: Iterable[str] | None = None, *, purge_data: bool = False,
                       grace_s: float = 10.0) -> dict[str, HostResult]:
        nodes = remote_nodes(self.inv, names)

        async def one(node: NodeConfig) -> HostResult:
            self._step(node.name, "connect")
            conn = await ssh_connect(node, self.opts)
            async with conn:
                lay, _, _ = await self._layout(conn, node)
                self._step(node.name, "stop")
                r = await remote_op(conn, node, "stop", pid_file=lay.pid_file, config=lay.config,
                                    grace_s=grace_s)
                _check_ok(node, "stop", r)
                self._step(node.name, "remove")
                paths = [lay.venv, lay.releases, lay.wheels, lay.tls, lay.config, lay.manifest,
                         lay.pid_file]
                if purge_data:
                    paths += [lay.data_dir, lay.stderr_file, lay.log_file]
                rm = await remote_op(conn, node, "remove", paths=[str(p) for p in paths],
                                     rmdirs=[str(lay.data_dir.parent), str(lay.install_dir)]
                                     if purge_data else [str(lay.install_dir)])
                _check_ok(node, "remove", rm)
            stopped = {"stopped": f"agent pid {r.get('pid')} stopped",
                       "killed": f"agent pid {r.get('pid')} killed after {grace_s:g}s",
                       "not_running": "agent was not running",
                       "stale": "agent was not running"}[r["result"]]
            kept = "data removed" if purge_data else f"data kept in {lay.data_dir}"
            return HostResult(node.name, True, "removed", f"{stopped}; files removed; {kept}")

        return await self._each(nodes, one, "undeploy")

    # -- upgrade --

    async def upgrade(self, names: Iterable[str] | None = None, *,
                      catch_up_s: float = 60.0) -> dict[str, HostResult]:
        """Rolling: one node at a time, followers first, the leader last after handing
        leadership to an upgraded node; each waited on until it has caught up (applied >=
        the leader's commit at the time it came back)."""
        from console.client import ClusterClient

        nodes = remote_nodes(self.inv, names)
        self._track(nodes, "upgrade")
        addresses = {n.name: (n.host, n.port) for n in self.inv.nodes}
        results: dict[str, HostResult] = {}
        async with ClusterClient(addresses, self.inv.cluster.name, timeout=2.0, op_timeout=10.0,
                                 ssl=self.client_ssl) as client:
            leader = await _leader(client, list(addresses))
            order = sorted((n for n in nodes if n.name != leader), key=lambda n: n.name)
            order += [n for n in nodes if n.name == leader]
            for node in order:
                if any(not r.ok for r in results.values()):
                    results[node.name] = HostResult(node.name, False, "skipped",
                                                    f"{who(node)}: not upgraded: an earlier "
                                                    "node failed; fix it and run again")
                    self.progress.update(node.name, state="failed",
                                         message=results[node.name].message)
                    continue
                results[node.name] = await self._guarded(
                    node, lambda n: self._upgrade_one(client, n, list(addresses), catch_up_s))
        return results

    async def _upgrade_one(self, client, node: NodeConfig, members: list[str],
                           catch_up_s: float) -> HostResult:
        leader = await _leader(client, members)
        if leader == node.name:
            self._step(node.name, "probe")
            if (await self.deploy_one(node, check_only=True)).action == "unchanged":
                return await self.deploy_one(node)  # nothing to do: no transfer either
            others = [m for m in members if m != node.name]
            self._step(node.name, "transfer leadership")
            target = await _best_follower(client, others, self.inv)
            if target is not None:
                await client.transfer(target)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    now = await _leader(client, members)
                    if now is not None and now != node.name:
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise HostError(f"{who(node)}: leadership did not move off it within 15s; "
                                    "upgrade stopped before touching the leader")
        r = await self.deploy_one(node, restart=True)
        if r.action == "unchanged":
            return r
        self._step(node.name, "catch up")
        leader = await _leader(client, members, wait_s=catch_up_s)
        if leader is None:
            raise HostError(f"{who(node)}: upgraded, but the cluster has no leader within "
                            f"{catch_up_s:g}s; check `raftdeck status`")
        target = (await client.call(leader, "status"))["commit"]
        deadline = time.monotonic() + catch_up_s
        applied = None
        while time.monotonic() < deadline:
            try:
                st = await asyncio.wait_for(client.call(node.name, "status"), 5)
                applied = st.get("applied")
                if applied is not None and applied >= target:
                    r.message += f"; caught up (applied {applied} >= leader commit {target})"
                    return dataclasses.replace(r, action="upgraded")
            except Exception:
                pass
            await asyncio.sleep(0.2)
        raise HostError(f"{who(node)}: upgraded, but applied {applied} < the leader's commit "
                        f"{target} after {catch_up_s:g}s; check `raftdeck status`")


async def _leader(client, members: list[str], wait_s: float = 10.0) -> str | None:
    """The node that a status of the highest term says leads, waiting up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        async def one(n):
            try:
                return await asyncio.wait_for(client.call(n, "status"), 3)
            except Exception:
                return None

        sts = [s for s in await asyncio.gather(*(one(n) for n in members)) if isinstance(s, dict)]
        leaders = sorted((s["term"], s["node"]) for s in sts if s.get("role") == "leader")
        if leaders:
            return leaders[-1][1]
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.2)


async def _best_follower(client, names: list[str], inv: Inventory) -> str | None:
    """The caught-up voter of highest priority among ``names`` (ties: most applied)."""
    best = None
    for n in names:
        node = inv.node(n)
        if not node.is_voter or node.priority == 0:
            continue
        try:
            st = await asyncio.wait_for(client.call(n, "status"), 3)
        except Exception:
            continue
        key = (node.priority, st.get("applied") or 0)
        if best is None or key > best[0]:
            best = (key, n)
    return best and best[1]


async def _makedirs(sftp, path: PurePosixPath) -> None:
    try:
        await sftp.makedirs(str(path), exist_ok=True)
    except Exception:
        if not await sftp.isdir(str(path)):
            raise


def reload_outcome(before: dict, cert: dict) -> str | None:
    """After a SIGHUP: "reloaded" or "refused" once the agent's ``security.cert`` counters
    (``cert``) moved past ``before``, None while neither has."""
    if cert.get("reload_failures", 0) > before["reload_failures"]:
        return "refused"
    if cert.get("reloads", 0) > before["reloads"]:
        return "reloaded"
    return None


def _check_ok(node: NodeConfig, op: str, r: dict) -> None:
    if not r.get("ok"):
        err = r.get("error") or "failed"
        if "No space left" in err:
            raise HostError(f"{who(node)}: disk full on the host ({op}: {err}); free some "
                            "space or point ssh.install_dir elsewhere")
        raise HostError(f"{who(node)}: {op} failed on the host: {err}")


def _install_error(node: NodeConfig, r: dict, version, machine: str) -> str:
    err = r.get("error") or "failed"
    if "No space left" in err:
        return (f"{who(node)}: disk full on the host while installing ({err}); free some "
                "space or point ssh.install_dir elsewhere")
    if "is not a supported wheel" in err or "No matching distribution" in err:
        here = f"{sys.version_info[0]}.{sys.version_info[1]} {os.uname().machine}"
        there = f"{version[0]}.{version[1]} {machine}"
        return (f"{who(node)}: install failed: the wheelhouse was built for Python {here}, the "
                f"host has Python {there} ({err}); pass --wheelhouse DIR with wheels for the "
                "host (pip download --only-binary :all: --python-version ...)")
    if r.get("kind") == "import":
        return (f"{who(node)}: install failed: the new version does not import on the host "
                f"({err}); a running agent was not restarted and still runs the previous "
                "version; fix the wheel and run again")
    return f"{who(node)}: install failed ({r.get('kind')}): {err}"


def _describe_io(node: NodeConfig, e: BaseException, doing: str = "") -> str:
    text = " ".join(str(getattr(e, "reason", None) or e or type(e).__name__).split())
    where = f" {doing}" if doing else ""
    if "No space left" in text or getattr(e, "errno", None) == 28:
        return (f"{who(node)}: disk full on the host{where} ({text}); free some space or point "
                "ssh.install_dir elsewhere")
    if "Permission denied" in text:
        return (f"{who(node)}: permission denied on the host{where} ({text}); check the "
                "ownership of ssh.install_dir")
    return f"{who(node)}: SSH error{where}: {text}; check the host and run again"


# == the raftdeck commands (console/cli.py has only their parsers) ================================


def ssh_options_from(args) -> SSHOptions:
    kh = getattr(args, "known_hosts", None) or os.environ.get("RAFTDECK_KNOWN_HOSTS")
    opts = SSHOptions(accept_new=getattr(args, "accept_new_host_keys", False),
                      connect_timeout=getattr(args, "connect_timeout", None) or 10.0)
    if kh:
        opts.known_hosts = Path(kh).expanduser()
    return opts


class ProgressPrinter:
    """The CLI's progress display: on a terminal, one live line per host redrawn in
    place; otherwise one plain line per step change."""

    def __init__(self, progress: DeployProgress, out=None, tty: bool | None = None):
        self.p = progress
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.drawn = 0
        self.last: dict[str, str] = {}
        progress.listeners.append(self.changed)

    def changed(self, row: HostRow) -> None:
        if self.tty:
            self.redraw()
            return
        text = self.p.line(row)
        if self.last.get(row.name) != text:
            self.last[row.name] = text
            print(text, file=self.out, flush=True)

    def redraw(self) -> None:
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F")
        rows = list(self.p.rows.values())
        for r in rows:
            self.out.write("\x1b[2K" + self.p.line(r) + "\n")
        self.drawn = len(rows)
        self.out.flush()


def _names_arg(inv: Inventory, text: str | None) -> list[str] | None:
    if not text:
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


async def run(inv: Inventory, action: str, progress: DeployProgress, *,
              names: Iterable[str] | None = None, ssh: SSHOptions | None = None,
              wheel: Path | None = None, wheelhouse: Path | None = None, parallel: int = 4,
              client_ssl=None, purge_data: bool = False, grace_s: float = 10.0,
              catch_up_s: float = 60.0, join: bool = False) -> tuple[dict[str, HostResult], Deployer]:
    """One whole ``deploy`` / ``upgrade`` / ``undeploy`` run, reporting into ``progress``
    (what the CLI and the console's deploy screen both start): the wheels are built once,
    in a temporary folder, then every host is worked on. Raises ``DeployError`` if the
    wheels cannot be built and ``KeyError`` for an unknown node name. ``join``: deploy
    only, for nodes just added to the running cluster (their agents start with --join)."""
    nodes = remote_nodes(inv, names)
    for n in nodes:  # every host is listed from the start, "waiting"
        if n.name not in progress.rows:
            progress.add(n.name, who(n).split(" ", 1)[1].strip("()"))
    with tempfile.TemporaryDirectory(prefix="raftdeck-deploy-") as work:
        artifacts = None
        if action in ("deploy", "upgrade"):
            artifacts = await asyncio.to_thread(build_artifacts, Path(work), wheel=wheel,
                                                wheelhouse=wheelhouse)
        d = Deployer(inv, ssh=ssh, artifacts=artifacts, parallel=parallel, progress=progress,
                     client_ssl=client_ssl)
        names = [n.name for n in nodes]
        if action == "deploy":
            res = await d.deploy(names, join=join)
        elif action == "upgrade":
            res = await d.upgrade(names, catch_up_s=catch_up_s)
        elif action == "undeploy":
            res = await d.undeploy(names, purge_data=purge_data, grace_s=grace_s)
        else:
            raise ValueError(action)
    return res, d


def _client_ssl(inv: Inventory, args):
    """The TLS context the CLI's cluster client uses (None without TLS): the health checks
    speak to the agents the way every other command does."""
    from console.cli import _client

    return _client(inv, args).ssl


async def _run_action(args, inv: Inventory, action: str) -> tuple[dict[str, HostResult], Deployer]:
    from console.cli import EXIT_USAGE, CliError

    names = _names_arg(inv, getattr(args, "hosts", None))
    try:
        nodes = remote_nodes(inv, names)
    except KeyError as e:
        raise CliError(f"{inv.path.name}: --hosts: {e.args[0]}", EXIT_USAGE) from None
    except DeployError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    if not nodes:
        raise CliError(f"no node in {inv.path.name} has ssh: settings; nothing to {action} "
                       "(see docs/OPERATIONS.md, Deploying to real hosts)", EXIT_USAGE)
    progress = DeployProgress(action)
    if not args.json:
        ProgressPrinter(progress)
    wheel = getattr(args, "wheel", None)
    wheelhouse = getattr(args, "wheelhouse", None)
    try:
        return await run(inv, action, progress, names=[n.name for n in nodes],
                         ssh=ssh_options_from(args), wheel=Path(wheel) if wheel else None,
                         wheelhouse=Path(wheelhouse) if wheelhouse else None,
                         parallel=getattr(args, "parallel", 4),
                         client_ssl=_client_ssl(inv, args),
                         purge_data=getattr(args, "purge_data", False),
                         grace_s=getattr(args, "grace_s", 10.0),
                         catch_up_s=getattr(args, "catch_up_s", 60.0))
    except DeployError as e:
        raise CliError(str(e)) from None


def _finish(args, inv, action: str, res: dict[str, HostResult], extra: dict | None = None) -> int:
    from console.cli import EXIT_OK, CliError, _print_json

    failed = [r for r in res.values() if not r.ok]
    counts: dict[str, int] = {}
    for r in res.values():
        counts[r.action] = counts.get(r.action, 0) + 1
    if args.json:
        _print_json({"action": action, "hosts": [r.to_json() for r in res.values()],
                     **(extra or {})})
    else:
        print(f"{action}: {len(res)} hosts: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        if extra and "leader" in extra:
            print(f"leader: {extra['leader']} (term {extra.get('term')})" if extra["leader"]
                  else "leader: none")
    if failed:
        raise CliError(f"{action} failed on {len(failed)} of {len(res)} hosts: "
                       + ", ".join(r.name for r in failed))
    return EXIT_OK


async def _outsiders(inv: Inventory, client_ssl) -> list[str]:
    """Remote nodes of the inventory the running cluster does not have as members (none
    when no agent answers: a first deploy). Started by deploy, such a node would write the
    inventory's membership as its first entry, which the cluster's own entry 1 matches by
    index and term (docs/OPERATIONS.md, Membership)."""
    from console.cli import _running_members
    from console.client import ClusterClient

    async with ClusterClient({n.name: (n.host, n.port) for n in inv.nodes}, inv.cluster.name,
                             timeout=2.0, op_timeout=3.0, ssl=client_ssl) as client:
        members = await _running_members(client, inv.names)
    if not members:
        return []
    return [n.name for n in remote_nodes(inv) if n.name not in members]


async def deploy_joining(args, inv: Inventory, node: NodeConfig) -> HostResult:
    """`raftdeck add-node` for a node with ssh:, once the leader has added it: deploy it
    like `raftdeck deploy --hosts NODE` would, its agent started with --join. A host
    already deployed and running is left alone (``unchanged``). ``CliError`` on failure."""
    from console.cli import CliError

    progress = DeployProgress("deploy")
    if not args.json:
        ProgressPrinter(progress)
    wheel, wheelhouse = getattr(args, "wheel", None), getattr(args, "wheelhouse", None)
    try:
        res, _ = await run(inv, "deploy", progress, names=[node.name],
                           ssh=ssh_options_from(args), wheel=Path(wheel) if wheel else None,
                           wheelhouse=Path(wheelhouse) if wheelhouse else None,
                           client_ssl=_client_ssl(inv, args), join=True)
    except DeployError as e:
        raise CliError(str(e)) from None
    r = res[node.name]
    if not r.ok:
        raise CliError(f"{r.message} (it is a learner of the cluster now: fix that, then run "
                       f"`raftdeck add-node {node.name}` again)")
    return r


async def cmd_deploy(args, inv: Inventory) -> int:
    from console.cli import CliError

    outsiders = await _outsiders(inv, _client_ssl(inv, args))
    if outsiders:
        raise CliError(f"{', '.join(outsiders)}: not a member of the running cluster; deploy "
                       "would start it with the inventory's membership as its first log entry. "
                       f"Add it with `raftdeck add-node {outsiders[0]}` (which deploys it and "
                       "starts it with --join), or take it out of the inventory")
    res, d = await _run_action(args, inv, "deploy")
    extra: dict[str, Any] = {}
    if all(r.ok for r in res.values()):
        members = [n.name for n in inv.nodes]
        from console.client import ClusterClient

        async with ClusterClient({n.name: (n.host, n.port) for n in inv.nodes}, inv.cluster.name,
                                 timeout=2.0, op_timeout=5.0, ssl=d.client_ssl) as client:
            leader = await _leader(client, members, wait_s=args.wait_s)
            term = None
            if leader:
                try:
                    term = (await client.call(leader, "status")).get("term")
                except Exception:
                    pass
        extra = {"leader": leader, "term": term}
    rc = _finish(args, inv, "deploy", res, extra)
    if extra and not extra.get("leader"):
        raise CliError(f"every host is deployed but no leader within {args.wait_s:g}s; see "
                       "`raftdeck status` and `raftdeck logs NODE`")
    return rc


async def cmd_upgrade(args, inv: Inventory) -> int:
    res, _ = await _run_action(args, inv, "upgrade")
    return _finish(args, inv, "upgrade", res)


async def cmd_undeploy(args, inv: Inventory) -> int:
    res, _ = await _run_action(args, inv, "undeploy")
    return _finish(args, inv, "undeploy", res)


async def cmd_logs(args, inv: Inventory) -> int:
    """`raftdeck logs NODE`: the last lines of a node's agent log (and stderr file), local
    or over SSH."""
    from console.cli import EXIT_OK, CliError, _node, _print_json
    from console.procs import LocalProcesses, is_local

    node = _node(inv, args.node)
    if is_local(node):
        procs = LocalProcesses(inv)
        paths = {"log": procs.log_file(node), "stderr": procs.stderr_file(node)}
        out: dict[str, Any] = {"log_file": str(paths["log"]), "stderr_file": str(paths["stderr"])}
        for k, p in paths.items():
            try:
                out[k] = p.read_text(errors="replace").splitlines()[-args.lines:]
            except OSError:
                out[k] = []
    else:
        try:
            out = await Deployer(inv, ssh=ssh_options_from(args)).logs(node, args.lines)
        except HostError as e:
            raise CliError(str(e)) from None
    if args.json:
        _print_json({"node": node.name, **out})
        return EXIT_OK
    if out["stderr"] and getattr(args, "stderr", False):
        print(f"== {out['stderr_file']}")
        for ln in out["stderr"]:
            print(ln)
    print(f"== {out['log_file']}")
    for ln in out["log"]:
        print(ln)
    if not out["log"]:
        print("(empty or missing)")
    return EXIT_OK


async def remote_signal_command(args, inv: Inventory, node: NodeConfig) -> int:
    """`raftdeck kill|pause|resume|restart NODE` for a node on another host (over SSH)."""
    from console.cli import EXIT_OK, CliError, _print_json

    d = Deployer(inv, ssh=ssh_options_from(args), client_ssl=_client_ssl(inv, args))
    verb = args.command
    result: dict[str, Any] = {"name": node.name, "action": verb, "host": node.ssh.host}
    try:
        if verb == "restart":
            old, pid = await d.restart(node)
            st = await d._health(node, getattr(args, "wait_s", 30.0))
            result.update(old_pid=old, pid=pid, role=st.get("role"), term=st.get("term"))
            was = f"pid {old} -> " if old else "was not running; "
            text = f"{node.name} restarted on {node.ssh.host} ({was}pid {pid}), answering as {st.get('role')}"
        else:
            sig = {"kill": "KILL", "pause": "STOP", "resume": "CONT"}[verb]
            result["pid"] = await d.signal(node, sig)
            text = {"kill": f"{node.name} killed on {node.ssh.host} (pid {result['pid']})",
                    "pause": f"{node.name} paused on {node.ssh.host} (pid {result['pid']}); "
                             f"`raftdeck resume {node.name}` continues it",
                    "resume": f"{node.name} resumed on {node.ssh.host} (pid {result['pid']})"}[verb]
    except HostError as e:
        raise CliError(str(e)) from None
    if args.json:
        _print_json(result)
    else:
        print(text)
    return EXIT_OK
