"""Inventory and node configuration -> frozen dataclasses.

Two file formats, both YAML (documented in docs/OPERATIONS.md, "The inventory"):

* the **inventory** (``inventory.yaml``): ``cluster:`` settings and the ``nodes:`` list.
  The console reads it; ``nodeagent run`` can read it and pick its own node by name.
* the **node config** (``nodeagent run --config``): ``cluster:``, this agent's ``node:`` and
  its ``peers:``. Deploy writes one per remote host.

Every problem is one ``ConfigError`` whose ``str()`` is one actionable line naming file, line
and field::

    inventory.yaml:12: nodes[2].port: duplicate port 7102 (also used by n2 at line 9); give each node on a host its own port

To keep every value's line, the YAML is *composed* (``yaml.compose`` with the safe loader)
and the values are built here from the node tree; nothing is ever constructed by PyYAML
beyond plain scalars.

Pure: the only I/O is reading the file ``load_*`` is given (and ``~`` in local paths is
expanded from the environment). No trio, no sockets, no clocks.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Iterable

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "ConfigError",
    "TLSConfig",
    "ClusterConfig",
    "SSHConfig",
    "NodeConfig",
    "PeerConfig",
    "Inventory",
    "AgentConfig",
    "load_inventory",
    "parse_inventory",
    "load_node_config",
    "parse_node_config",
    "DISPATCH_POLICIES",
    "ROLES",
    "MiB",
]

MiB = 1024 * 1024
DISPATCH_POLICIES = ("least_loaded", "round_robin", "weighted", "hash")
ROLES = ("voter", "learner")
INT_MAX = 2**31 - 1  # sanity cap for every integer setting (msgpack- and human-friendly)
FRAME_MIN, FRAME_MAX = 1024, 2**32 - 1  # the frame length prefix is 4 bytes

_CLUSTER_NAME = re.compile(r"[a-z0-9_-]{1,63}")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


# -- errors ------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration problem. ``str(err)`` is one line: ``file:line: field: problem; fix``.

    The parts are also attributes: ``path`` (as given by the caller), ``line`` (1-based or
    None), ``column`` (1-based, YAML syntax errors only), ``field`` (``nodes[2].port``,
    ``cluster.name``; "" for the whole file), ``problem`` and ``hint``.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        column: int | None = None,
        field: str = "",
        hint: str | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.column = column
        self.field = field
        self.problem = problem
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        text = where + (f"{self.field}: " if self.field else "") + self.problem
        if self.hint:
            text += f"; {self.hint}"
        return " ".join(text.split())  # always exactly one line


# -- the values --------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSConfig:
    """Mutual TLS material, local paths (absolute once loaded).

    Written as ``{ca, cert, key}`` (explicit files), or as ``{dir: D}`` / ``on`` (``dir:
    .raftdeck/tls``): the layout ``raftdeck init`` creates, where each agent uses
    ``D/nodes/<its name>.crt|.key`` and the console ``D/operators/<role>.crt|.key``. In an
    inventory's ``cluster`` the dir form has ``cert``/``key`` None; ``agent_config(name)``
    fills in the node's files."""

    ca: Path
    cert: Path | None
    key: Path | None
    dir: Path | None = None

    def for_node(self, name: str) -> "TLSConfig":
        if self.dir is None:
            return self
        return TLSConfig(self.dir / "ca.crt", self.dir / "nodes" / f"{name}.crt",
                         self.dir / "nodes" / f"{name}.key", self.dir)

    def for_role(self, role: str) -> "TLSConfig":
        if self.dir is None:
            return self
        return TLSConfig(self.dir / "ca.crt", self.dir / "operators" / f"{role}.crt",
                         self.dir / "operators" / f"{role}.key", self.dir)


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    # A killed leader is replaced within a tick or two (its followers see its connections
    # close); a paused or cut-off one within about a second (a follower waits 500-1,000
    # ms, randomized, then PreVote and the vote). Every tick wakes every agent (0.3 ms of
    # CPU each on the benchmark machine); at 25 ms the ticks put a tail on the write
    # latency (docs/BENCHMARKS.md, session 11: failover, the no-election soak, the tail).
    election_timeout_ms: int = 500
    heartbeat_interval_ms: int = 50
    # A snapshot is taken once both hold: this many log entries since the last one, and
    # those entries' commands add up to snapshot_log_percent % of its size (a big state
    # is snapshotted less often: serializing it costs O(state); docs/ARCHITECTURE.md).
    snapshot_interval: int = 5000
    snapshot_log_percent: int = 10
    dispatch_policy: str = "least_loaded"
    max_attempts: int = 3  # attempts per task, the first included
    task_lease_ms: int = 5000
    # Tasks queued on a node per slot beyond the running ones; the rest wait at the leader.
    task_queue_per_slot: int = 1
    # Finished tasks kept (oldest submitted forgotten first); the task table would grow
    # forever otherwise (docs/OPERATIONS.md, Tasks).
    task_retention: int = 10000
    fsync: bool = True  # False is for demos: a power loss may lose acknowledged writes
    tls: TLSConfig | None = None
    max_frame_bytes: int = 4 * MiB
    max_connections: int = 1000  # client connections per agent (peers are not counted)
    handshake_timeout_ms: int = 5000  # TLS handshake + hello
    idle_timeout_ms: int = 600_000  # a client connection with nothing in flight
    client_requests_per_s: int = 1000  # per client connection (token bucket, burst = this)


@dataclass(frozen=True)
class SSHConfig:
    """How the console reaches a remote node's host. ``key`` is a local path; ``install_dir``
    is a path on the remote host, relative to the SSH login (home) directory unless absolute."""

    host: str
    port: int = 22
    user: str | None = None  # None: ssh's default (the local user name, ~/.ssh/config)
    key: Path | None = None
    python: str = "python3"
    install_dir: PurePosixPath = PurePosixPath("raftdeck")


@dataclass(frozen=True)
class NodeConfig:
    """One agent. ``data_dir`` and ``log_file`` are local absolute ``Path``s, except for a node
    with ``ssh:``, where they are ``PurePosixPath``s on the remote host (a relative one was
    placed under ``ssh.install_dir``)."""

    name: str
    host: str
    port: int
    priority: int = 1  # 0: leads only as a caretaker (docs/ARCHITECTURE.md, "Leader priority")
    capacity: int = 1
    data_dir: PurePath = None  # type: ignore[assignment]  # default: .raftdeck/<name>
    role: str = "voter"
    allow_shell: bool = False
    metrics_port: int | None = None
    log_file: PurePath | None = None
    ssh: SSHConfig | None = None

    def __post_init__(self) -> None:
        if self.data_dir is None:
            object.__setattr__(self, "data_dir", Path(".raftdeck") / self.name)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def is_voter(self) -> bool:
        return self.role == "voter"

    @property
    def is_remote(self) -> bool:
        """True when the console manages this node over SSH."""
        return self.ssh is not None

    def as_peer(self) -> "PeerConfig":
        return PeerConfig(self.name, self.host, self.port, self.priority, self.role)


@dataclass(frozen=True)
class PeerConfig:
    """What an agent knows about another member (the node config's ``peers:`` entries)."""

    name: str
    host: str
    port: int
    priority: int = 1
    role: str = "voter"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def is_voter(self) -> bool:
        return self.role == "voter"


@dataclass(frozen=True)
class AgentConfig:
    """Everything one agent needs: from ``load_node_config`` or ``Inventory.agent_config``."""

    path: Path
    cluster: ClusterConfig
    node: NodeConfig
    peers: tuple[PeerConfig, ...]

    @property
    def members(self) -> tuple[PeerConfig, ...]:
        """This node and its peers, this node first."""
        return (self.node.as_peer(), *self.peers)

    @property
    def voters(self) -> tuple[PeerConfig, ...]:
        return tuple(m for m in self.members if m.is_voter)

    @property
    def learners(self) -> tuple[PeerConfig, ...]:
        return tuple(m for m in self.members if not m.is_voter)

    def peer(self, name: str) -> PeerConfig:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(_unknown_name_message(name, [m.name for m in self.members]))


@dataclass(frozen=True)
class Inventory:
    path: Path  # absolute
    cluster: ClusterConfig
    nodes: tuple[NodeConfig, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def node(self, name: str) -> NodeConfig:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(_unknown_name_message(name, self.names))

    def __contains__(self, name: object) -> bool:
        return any(n.name == name for n in self.nodes)

    @property
    def voters(self) -> tuple[NodeConfig, ...]:
        return tuple(n for n in self.nodes if n.role == "voter")

    @property
    def learners(self) -> tuple[NodeConfig, ...]:
        return tuple(n for n in self.nodes if n.role == "learner")

    def address(self, name: str) -> tuple[str, int]:
        return self.node(name).address

    def agent_config(self, name: str) -> AgentConfig:
        """The view of the cluster one agent runs with (``nodeagent run`` with an inventory)."""
        me = self.node(name)
        peers = tuple(n.as_peer() for n in self.nodes if n.name != name)
        cluster = self.cluster
        if cluster.tls is not None and cluster.tls.dir is not None:
            from dataclasses import replace

            cluster = replace(cluster, tls=cluster.tls.for_node(name))
        return AgentConfig(self.path, cluster, me, peers)

    def warnings(self) -> tuple[str, ...]:
        """Legal but questionable settings, one line each (``check-inventory`` prints them)."""
        out = []
        v = len(self.voters)
        if v > 7:
            out.append(
                f"{v} voters: every write waits for {v // 2 + 1} of them; "
                "keep 3 to 7 voters and make the other nodes learners"
            )
        elif v > 1 and v % 2 == 0:
            out.append(f"{v} voters tolerate no more failures than {v - 1}; use an odd number")
        if not self.cluster.fsync:
            out.append("cluster.fsync is false: a power loss can lose acknowledged writes (demo setting)")
        if self.cluster.tls is None:
            out.append("cluster.tls is off: anyone who reaches an agent's port may run any command; "
                       "set tls: on and run raftdeck init")
        return tuple(out)


def _unknown_name_message(name: str, names: Iterable[str]) -> str:
    import difflib  # only on this error path: a running agent does not load it

    names = list(names)
    close = difflib.get_close_matches(name, names, n=1)
    msg = f"no node named {name!r}"
    if close:
        return msg + f"; did you mean {close[0]!r}?"
    return msg + f"; known nodes: {', '.join(names) or '(none)'}"


# -- public entry points -----------------------------------------------------------------


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    """Read and validate an inventory file. Raises ``ConfigError``."""
    return parse_inventory(_read(path), path)


def parse_inventory(text: str | bytes, path: str | os.PathLike[str] = "<inventory>") -> Inventory:
    """Validate inventory text. ``path`` names the file in errors and anchors relative paths."""
    ctx = _Ctx(path)
    root = ctx.compose(text, "a mapping with cluster: and nodes:")
    top = _Map(ctx, root, "", ("cluster", "nodes"), what="the inventory", extensions=True)
    cluster = _parse_cluster(ctx, top)
    nodes_node = top.require("nodes", "add a nodes: list with at least one node")
    if _scalar(nodes_node)[0] == "tag:yaml.org,2002:null":
        raise ctx.error(top.key_line("nodes"), "nodes", "no nodes", "list at least one node under nodes:")
    if not isinstance(nodes_node, SequenceNode):
        raise ctx.error(nodes_node, "nodes", _wrong_type("a list of nodes", nodes_node))
    if not nodes_node.value:
        raise ctx.error(top.key_line("nodes"), "nodes", "no nodes", "list at least one node under nodes:")
    nodes, members = [], []
    for i, item in enumerate(nodes_node.value):
        node, member = _parse_node(ctx, item, f"nodes[{i}]")
        nodes.append(node)
        members.append(member)
    _check_members(ctx, members, top.key_line("nodes"), "nodes", "nodes")
    return Inventory(ctx.abspath, cluster, tuple(nodes))


def load_node_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate a single-node file (``nodeagent run --config``). Raises ``ConfigError``."""
    return parse_node_config(_read(path), path)


def parse_node_config(text: str | bytes, path: str | os.PathLike[str] = "<node config>") -> AgentConfig:
    ctx = _Ctx(path)
    root = ctx.compose(text, "a mapping with cluster:, node: and peers:")
    top = _Map(ctx, root, "", ("cluster", "node", "peers"), what="the node config", extensions=True)
    cluster = _parse_cluster(ctx, top)
    node_node = top.require("node", "add a node: mapping describing this agent")
    node, me = _parse_node(ctx, node_node, "node", agent_side=True)
    peers_node = top.require("peers", "list the other members under peers: (peers: [] for a one-node cluster)")
    if not isinstance(peers_node, SequenceNode):
        raise ctx.error(peers_node, "peers", _wrong_type("a list of peers", peers_node))
    peers, members = [], [me]
    for i, item in enumerate(peers_node.value):
        peer, member = _parse_peer(ctx, item, f"peers[{i}]")
        peers.append(peer)
        members.append(member)
    _check_members(ctx, members, top.key_line("peers"), "peers", "node and peers")
    if cluster.tls is not None and cluster.tls.dir is not None:
        from dataclasses import replace

        cluster = replace(cluster, tls=cluster.tls.for_node(node.name))
    return AgentConfig(ctx.abspath, cluster, node, tuple(peers))


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the file: {e.strerror or e}", path=path) from None


# -- the field table ---------------------------------------------------------------------
# Each field: (kind, default, extra). REQUIRED marks a field without a default.

REQUIRED = object()

_CLUSTER_FIELDS: dict[str, tuple[str, Any, Any]] = {
    "name": ("cluster_name", REQUIRED, None),
    "election_timeout_ms": ("int", 500, (1, INT_MAX)),
    "heartbeat_interval_ms": ("int", 50, (1, INT_MAX)),
    "snapshot_interval": ("int", 5000, (1, INT_MAX)),
    "snapshot_log_percent": ("int", 10, (0, 100_000)),
    "dispatch_policy": ("choice", "least_loaded", DISPATCH_POLICIES),
    "max_attempts": ("int", 3, (1, 1000)),
    "task_lease_ms": ("int", 5000, (1, INT_MAX)),
    "task_queue_per_slot": ("int", 1, (0, 100_000)),
    "task_retention": ("int", 10000, (1, INT_MAX)),
    "fsync": ("bool", True, None),
    "tls": ("tls", None, None),
    "max_frame_bytes": ("int", 4 * MiB, (FRAME_MIN, FRAME_MAX)),
    "max_connections": ("int", 1000, (1, 1_000_000)),
    "handshake_timeout_ms": ("int", 5000, (100, INT_MAX)),
    "idle_timeout_ms": ("int", 600_000, (100, INT_MAX)),
    "client_requests_per_s": ("int", 1000, (1, INT_MAX)),
}

_NODE_FIELDS: dict[str, tuple[str, Any, Any]] = {
    "name": ("node_name", REQUIRED, None),
    "host": ("host", REQUIRED, None),
    "port": ("int", REQUIRED, (1, 65535)),
    "priority": ("int", 1, (0, INT_MAX)),
    "capacity": ("int", 1, (1, INT_MAX)),
    "data_dir": ("node_path", None, None),
    "role": ("choice", "voter", ROLES),
    "allow_shell": ("bool", False, None),
    "metrics_port": ("int", None, (1, 65535)),
    "log_file": ("node_path", None, None),
    "ssh": ("ssh", None, None),
}

_PEER_FIELDS = {k: _NODE_FIELDS[k] for k in ("name", "host", "port", "priority", "role")}

_TLS_FIELDS: dict[str, tuple[str, Any, Any]] = {
    "ca": ("local_path", REQUIRED, None),
    "cert": ("local_path", REQUIRED, None),
    "key": ("local_path", REQUIRED, None),
}
_TLS_DIR_FIELDS: dict[str, tuple[str, Any, Any]] = {"dir": ("local_path", REQUIRED, None)}
DEFAULT_TLS_DIR = ".raftdeck/tls"

_SSH_FIELDS: dict[str, tuple[str, Any, Any]] = {
    "host": ("host", None, None),  # default: the node's host
    "port": ("int", 22, (1, 65535)),
    "user": ("str", None, None),
    "key": ("local_path", None, None),
    "python": ("str", "python3", None),
    "install_dir": ("remote_path", PurePosixPath("raftdeck"), None),
}

_PLACEHOLDER = {
    "cluster_name": "a name such as prod",
    "node_name": "a name such as n1",
    "host": "a host name or IP address",
    "local_path": "a path",
}


# -- YAML plumbing -----------------------------------------------------------------------

_CONSTRUCTOR = SafeConstructor()
_STR = "tag:yaml.org,2002:str"
_TAG_NAMES = {
    "tag:yaml.org,2002:str": "a string",
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:null": "nothing (null)",
    "tag:yaml.org,2002:timestamp": "a date",
    "tag:yaml.org,2002:binary": "binary data",
}
_CONSTRUCT = {
    "tag:yaml.org,2002:str": lambda n: n.value,
    "tag:yaml.org,2002:int": _CONSTRUCTOR.construct_yaml_int,
    "tag:yaml.org,2002:bool": _CONSTRUCTOR.construct_yaml_bool,
    "tag:yaml.org,2002:float": _CONSTRUCTOR.construct_yaml_float,
    "tag:yaml.org,2002:null": lambda n: None,
}


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _describe(node: Node) -> str:
    """What a YAML node is, for 'expected X, got Y' messages."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    kind = _TAG_NAMES.get(node.tag, f"a value tagged {node.tag}")
    if node.tag == "tag:yaml.org,2002:null":
        return kind
    text = node.value if len(node.value) <= 40 else node.value[:37] + "..."
    if node.tag == _STR:
        return f"{kind} ({text!r})"
    return f"{kind} ({text})"


def _wrong_type(expected: str, node: Node) -> str:
    return f"expected {expected}, got {_describe(node)}"


def _scalar(node: Node) -> tuple[str | None, Any]:
    """(tag, value) of a plain YAML scalar; (None, None) for anything else."""
    if not isinstance(node, ScalarNode) or node.tag not in _CONSTRUCT:
        return None, None
    try:
        return node.tag, _CONSTRUCT[node.tag](node)
    except Exception:  # e.g. an explicit !!int tag on text that is no integer
        return None, None


class _Ctx:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.display = str(path)
        self.abspath = Path(os.path.abspath(path))
        self.base = self.abspath.parent

    def error(self, where: Node | int | None, field: str, problem: str, hint: str | None = None) -> ConfigError:
        line = where if isinstance(where, int) or where is None else _line(where)
        return ConfigError(problem, path=self.display, line=line, field=field, hint=hint)

    def compose(self, text: str | bytes, expected: str) -> Node:
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"not UTF-8 text (byte {e.start})", path=self.display, hint="save the file as UTF-8"
                ) from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            problem = e.problem or e.context or "invalid YAML"
            if e.context and e.problem:
                problem = f"{problem} ({e.context}"
                if e.context_mark is not None and e.context_mark.line != mark.line:
                    problem += f" at line {e.context_mark.line + 1}"
                problem += ")"
            raise ConfigError(
                f"invalid YAML: {problem}",
                path=self.display,
                line=None if mark is None else mark.line + 1,
                column=None if mark is None else mark.column + 1,
            ) from None
        except yaml.reader.ReaderError as e:  # a control character, or bad bytes
            line = column = None
            if isinstance(e.position, int) and 0 <= e.position <= len(text):
                line = text.count("\n", 0, e.position) + 1
                column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
            char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
            raise ConfigError(
                f"invalid YAML: character {char} is not allowed ({e.reason})",
                path=self.display,
                line=line,
                column=column,
                hint="remove it or quote the value",
            ) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML: {' '.join(str(e).split())}", path=self.display) from None
        if root is None:
            raise ConfigError(f"the file is empty; expected {expected}", path=self.display, line=1)
        return root

    def local_path(self, text: str) -> Path:
        p = os.path.expanduser(text)
        return Path(os.path.normpath(os.path.join(self.base, p)))


class _Map:
    """A YAML mapping as {key: (key node, value node)}, with unknown-field checks."""

    def __init__(
        self,
        ctx: _Ctx,
        node: Node,
        prefix: str,
        known: Iterable[str],
        *,
        what: str,
        extensions: bool = False,
        elsewhere: dict[str, str] | None = None,
    ) -> None:
        self.ctx, self.node, self.prefix = ctx, node, prefix
        if not isinstance(node, MappingNode):
            raise ctx.error(node, prefix, _wrong_type(f"{what} as a mapping (key: value lines)", node))
        self.items: dict[str, tuple[Node, Node]] = {}
        self._merge_into(node, explicit=True, seen=set())
        known = tuple(known)
        for key, (knode, _) in self.items.items():
            if key in known or (extensions and key.startswith("x-")):
                continue
            raise ctx.error(knode, self.field(key), "unknown field", _suggest(key, known, elsewhere))

    def _merge_into(self, node: MappingNode, *, explicit: bool, seen: set[int]) -> None:
        # YAML merge keys (<<: *defaults): explicit keys win, earlier merges win over later ones.
        if id(node) in seen:
            return
        seen.add(id(node))
        merges: list[Node] = []
        own: dict[str, tuple[Node, Node]] = {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                merges.extend(vnode.value if isinstance(vnode, SequenceNode) else [vnode])
                continue
            if not isinstance(knode, ScalarNode) or knode.tag != _STR:
                raise self.ctx.error(knode, self.prefix, f"field names must be plain words, got {_describe(knode)}")
            key = knode.value
            if key in own:
                raise self.ctx.error(
                    knode,
                    self.field(key),
                    f"duplicate key (first at line {_line(own[key][0])})",
                    "keep only one",
                )
            own[key] = (knode, vnode)
        for key, pair in own.items():
            if explicit or key not in self.items:
                self.items[key] = pair
        for m in merges:
            if not isinstance(m, MappingNode):
                raise self.ctx.error(m, self.prefix, _wrong_type("a mapping to merge (<<:)", m))
            self._merge_into(m, explicit=False, seen=seen)

    def field(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def value(self, key: str) -> Node | None:
        pair = self.items.get(key)
        return None if pair is None else pair[1]

    def key_line(self, key: str) -> int:
        return _line(self.items[key][0])

    def require(self, key: str, hint: str) -> Node:
        v = self.value(key)
        if v is None:
            raise self.ctx.error(self.node, self.field(key), "missing required field", hint)
        return v

    def read(self, spec: dict[str, tuple[str, Any, Any]], **overrides: Any) -> dict[str, Any]:
        """Every field of ``spec``: checked values, or defaults for absent ones."""
        out = {}
        for key, (kind, default, extra) in spec.items():
            out[key] = self._read_one(key, kind, default, extra)
            if out[key] is None and key in overrides:
                out[key] = overrides[key]
        return out

    def _read_one(self, key: str, kind: str, default: Any, extra: Any) -> Any:
        ctx, fname = self.ctx, self.field(key)
        vnode = self.value(key)
        if vnode is None:
            if default is REQUIRED:
                raise ctx.error(self.node, fname, "missing required field", f"add {key}: <{_expected(kind, extra)}>")
            return default
        tag, value = _scalar(vnode)
        if tag == "tag:yaml.org,2002:null":
            if default is None:
                return None  # an optional field left empty
            if default is REQUIRED:
                raise ctx.error(vnode, fname, "missing value", f"give {key} {_expected(kind, extra)}")
            raise ctx.error(
                vnode,
                fname,
                f"expected {_expected(kind, extra)}, got nothing (null)",
                f"remove the line to use the default ({_show(default)})",
            )
        if kind == "int":
            if tag != "tag:yaml.org,2002:int":
                hint = None
                if tag == _STR and re.fullmatch(r"\s*[0-9]+\s*", vnode.value):
                    hint = "remove the quotes"
                elif tag == "tag:yaml.org,2002:float" and float(value).is_integer():
                    hint = f"write {int(value)}"
                raise ctx.error(vnode, fname, _wrong_type("an integer", vnode), hint)
            lo, hi = extra
            if not lo <= value <= hi:
                rng = f"{lo}..{hi}" if hi != INT_MAX else f"at least {lo}"
                what = "a port number " if hi == 65535 and lo == 1 else ""
                raise ctx.error(vnode, fname, f"{value} is out of range", f"use {what}{rng}")
            return value
        if kind == "bool":
            if tag != "tag:yaml.org,2002:bool":
                raise ctx.error(vnode, fname, _wrong_type("true or false", vnode))
            return value
        # everything else is text
        if tag != _STR:
            hint = None
            if tag is not None and isinstance(vnode, ScalarNode):
                hint = f'quote it: {key}: "{vnode.value}"'
            raise ctx.error(vnode, fname, _wrong_type(_expected(kind, extra), vnode), hint)
        return _check_text(ctx, vnode, fname, key, kind, extra, value)


def _expected(kind: str, extra: Any) -> str:
    if kind == "int":
        lo, hi = extra
        return f"an integer {lo}..{hi}" if hi != INT_MAX else f"an integer >= {lo}"
    if kind == "bool":
        return "true or false"
    if kind == "choice":
        return "one of " + ", ".join(extra)
    if kind in ("tls", "ssh"):
        return "a mapping"
    return _PLACEHOLDER.get(kind, "a string")


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _suggest(key: str, known: Iterable[str], elsewhere: dict[str, str] | None) -> str:
    import difflib  # only on this error path: a running agent does not load it

    known = list(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    if elsewhere and key in elsewhere:
        return elsewhere[key]
    lowered = {k.lower().replace("-", "_"): k for k in known}
    if key.lower().replace("-", "_") in lowered:
        return f"did you mean {lowered[key.lower().replace('-', '_')]}?"
    return "known fields: " + ", ".join(known)


def _check_text(ctx: _Ctx, vnode: Node, fname: str, key: str, kind: str, extra: Any, value: str) -> Any:
    if kind == "choice":
        if value not in extra:
            import difflib  # only on this error path: a running agent does not load it

            close = difflib.get_close_matches(value.lower().replace("-", "_"), extra, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else "use one of " + ", ".join(extra)
            if key == "role" and value.lower() == "leader":
                hint = "the leader is elected: use role: voter and a higher priority"
            raise ctx.error(vnode, fname, f"{value!r} is not one of {', '.join(extra)}", hint)
        return value
    if value.strip() == "":
        raise ctx.error(vnode, fname, "is empty", f"give {key} {_expected(kind, extra)}")
    if kind == "cluster_name":
        if not _CLUSTER_NAME.fullmatch(value):
            raise ctx.error(
                vnode,
                fname,
                f"{value!r} is not a valid cluster name",
                "use 1 to 63 lowercase letters, digits, - and _",
            )
        return value
    if kind == "node_name":
        if not _NODE_NAME.fullmatch(value):
            raise ctx.error(
                vnode,
                fname,
                f"{value!r} is not a valid node name",
                "use 1 to 63 letters, digits, ., - and _, starting with a letter or digit",
            )
        return value
    if kind == "host":
        return _check_host(ctx, vnode, fname, value)
    if kind == "str":
        return value
    if kind == "local_path":
        return ctx.local_path(value)
    if kind == "remote_path":
        return _remote_path(ctx, vnode, fname, value)
    if kind == "node_path":
        return value  # resolved by _parse_node: where depends on ssh:
    raise AssertionError(kind)


def _check_host(ctx: _Ctx, vnode: Node, fname: str, value: str) -> str:
    if any(c.isspace() for c in value) or "/" in value:
        raise ctx.error(vnode, fname, f"{value!r} is not a host name or IP address", "write just the host, e.g. 10.0.0.5")
    if ":" in value:
        try:
            ipaddress.IPv6Address(value.strip("[]"))
        except ValueError:
            host, _, port = value.rpartition(":")
            hint = f"write host: {host} and port: {port}" if port.isdigit() else "write just the host, e.g. 10.0.0.5"
            raise ctx.error(vnode, fname, f"{value!r} is not a host name or IP address", hint) from None
        return value.strip("[]")
    return value


def _remote_path(ctx: _Ctx, vnode: Node, fname: str, value: str) -> PurePosixPath:
    if value == "~" or value.startswith("~/"):
        value = value[2:] or "."  # relative paths are relative to the login directory already
    elif value.startswith("~"):
        raise ctx.error(vnode, fname, f"{value!r}: ~user paths are not supported", "use an absolute path")
    return PurePosixPath(os.path.normpath(value))


# -- sections ----------------------------------------------------------------------------


def _parse_cluster(ctx: _Ctx, top: _Map) -> ClusterConfig:
    cnode = top.require("cluster", "add a cluster: mapping with at least name:")
    cmap = _Map(
        ctx,
        cnode,
        "cluster",
        _CLUSTER_FIELDS,
        what="cluster settings",
        elsewhere={k: f"{k} is a node field; set it on each node" for k in _NODE_FIELDS},
    )
    values = cmap.read({k: v for k, v in _CLUSTER_FIELDS.items() if k != "tls"})
    values["tls"] = None
    tls_node = cmap.value("tls")
    tag, flag = _scalar(tls_node) if tls_node is not None else (None, None)
    if tls_node is None or tag == "tag:yaml.org,2002:null" or (tag == "tag:yaml.org,2002:bool" and not flag):
        pass  # off
    elif tag == "tag:yaml.org,2002:bool":  # tls: on
        d = ctx.local_path(DEFAULT_TLS_DIR)
        values["tls"] = TLSConfig(d / "ca.crt", None, None, d)
    elif isinstance(tls_node, MappingNode) and any(
            isinstance(k, ScalarNode) and k.value == "dir" for k, _ in tls_node.value):
        tmap = _Map(ctx, tls_node, "cluster.tls", _TLS_DIR_FIELDS,
                    what="the TLS directory (dir: made by raftdeck init)",
                    elsewhere={k: "give either dir: or ca:, cert: and key:, not both"
                               for k in _TLS_FIELDS})
        d = tmap.read(_TLS_DIR_FIELDS)["dir"]
        values["tls"] = TLSConfig(d / "ca.crt", None, None, d)
    else:
        if not isinstance(tls_node, MappingNode):
            raise ctx.error(tls_node, "cluster.tls", _wrong_type(
                "on, off, {dir: DIR} or a mapping of ca, cert and key", tls_node))
        tmap = _Map(ctx, tls_node, "cluster.tls", _TLS_FIELDS, what="the TLS files (ca, cert, key)")
        values["tls"] = TLSConfig(**tmap.read(_TLS_FIELDS))
    cluster = ClusterConfig(**values)
    _check_timing(ctx, cluster, cmap)
    return cluster


@dataclass
class _Member:
    """A node or peer, with where its fields are, for the cross-checks."""

    prefix: str
    name: str
    host: str
    role: str
    priority: int
    ports: list[tuple[str, int, int]] = field(default_factory=list)  # (field, port, line)
    name_line: int = 0


def _node_map(ctx: _Ctx, node: Node, prefix: str, spec: dict[str, Any]) -> _Map:
    return _Map(
        ctx,
        node,
        prefix,
        spec,
        what="a node",
        elsewhere={k: f"{k} is a cluster setting; put it under cluster:" for k in _CLUSTER_FIELDS},
    )


def _member(m: _Map, values: dict[str, Any]) -> _Member:
    member = _Member(
        m.prefix,
        values["name"],
        values["host"],
        values["role"],
        values["priority"],
        name_line=_line(m.value("name")),
    )
    for key in ("port", "metrics_port"):
        v = m.value(key)
        if values.get(key) is not None and v is not None:
            member.ports.append((m.field(key), values[key], _line(v)))
    return member


def _parse_node(ctx: _Ctx, node: Node, prefix: str, *, agent_side: bool = False) -> tuple[NodeConfig, _Member]:
    """An inventory node, or (``agent_side``) a node config's own node, whose paths are always
    local: that file is read on the node's host."""
    m = _node_map(ctx, node, prefix, _NODE_FIELDS)
    values = m.read({k: v for k, v in _NODE_FIELDS.items() if k not in ("ssh", "data_dir", "log_file")})
    ssh = None
    ssh_node = m.value("ssh")
    if ssh_node is not None and _scalar(ssh_node)[0] != "tag:yaml.org,2002:null":
        smap = _Map(ctx, ssh_node, m.field("ssh"), _SSH_FIELDS, what="SSH settings")
        ssh = SSHConfig(**smap.read(_SSH_FIELDS, host=values["host"]))
    for key in ("data_dir", "log_file"):
        text = m._read_one(key, "node_path", None, None)
        if key == "data_dir" and text is None:
            text = os.path.join(".raftdeck", values["name"])
        if text is None:
            values[key] = None
        elif ssh is None or agent_side:
            values[key] = ctx.local_path(text)
        else:
            p = _remote_path(ctx, m.value(key) or m.node, m.field(key), text)
            values[key] = p if p.is_absolute() else PurePosixPath(os.path.normpath(ssh.install_dir / p))
    values["ssh"] = ssh
    return NodeConfig(**values), _member(m, values)


def _parse_peer(ctx: _Ctx, node: Node, prefix: str) -> tuple[PeerConfig, _Member]:
    m = _node_map(ctx, node, prefix, _PEER_FIELDS)
    values = m.read(_PEER_FIELDS)
    return PeerConfig(**values), _member(m, values)


# -- cross-checks ------------------------------------------------------------------------


def _check_members(ctx: _Ctx, members: list[_Member], list_line: int, list_field: str, what: str) -> None:
    names: dict[str, _Member] = {}
    for mem in members:
        first = names.get(mem.name)
        if first is not None:
            raise ctx.error(
                mem.name_line,
                f"{mem.prefix}.name",
                f"duplicate node name {mem.name!r} (also {first.prefix} at line {first.name_line})",
                "give every node a unique name",
            )
        names[mem.name] = mem
    used: dict[tuple[str, int], tuple[_Member, str, int]] = {}
    for mem in members:
        for fname, port, line in mem.ports:
            key = (mem.host.lower(), port)
            if key in used:
                other, ofield, oline = used[key]
                owner = other.name
                if not ofield.endswith(".port"):
                    owner += "'s " + ofield.rsplit(".", 1)[1]
                if other is mem:
                    owner = "this node's " + ofield.rsplit(".", 1)[1]
                raise ctx.error(
                    line,
                    fname,
                    f"duplicate port {port} (also used by {owner} at line {oline})",
                    "give each node on a host its own port",
                )
            used[key] = (mem, fname, line)
    if not any(m.role == "voter" and m.priority > 0 for m in members):
        voters = [m for m in members if m.role == "voter"]
        problem = (
            f"no voter has priority > 0 among the {what}, so the cluster could never elect a leader"
            if voters
            else f"no voter among the {what}, so the cluster could never elect a leader"
        )
        raise ctx.error(list_line, list_field, problem, "make at least one node a voter with priority >= 1")


def _check_timing(ctx: _Ctx, cluster: ClusterConfig, cmap: _Map) -> None:
    et, hb = cluster.election_timeout_ms, cluster.heartbeat_interval_ms
    if et >= 10 * hb:
        return
    et_node, hb_node = cmap.value("election_timeout_ms"), cmap.value("heartbeat_interval_ms")
    if et_node is not None:
        hb_where = f"at line {_line(hb_node)}" if hb_node is not None else "by default"
        raise ctx.error(
            et_node,
            "cluster.election_timeout_ms",
            f"{et} ms is less than 10 x heartbeat_interval_ms ({hb} ms {hb_where})",
            f"use at least {10 * hb} or a shorter heartbeat",
        )
    raise ctx.error(
        hb_node,
        "cluster.heartbeat_interval_ms",
        f"{hb} ms is more than a tenth of election_timeout_ms ({et} ms by default)",
        f"use at most {et // 10} or set election_timeout_ms to at least {10 * hb}",
    )
