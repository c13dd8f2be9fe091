"""nodeagent.config: the inventory and node-config loaders, and `nodeagent check-inventory`.

Every error case checks the whole prefix of the message: file, line and field.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent import cli
from nodeagent.config import (
    AgentConfig,
    ClusterConfig,
    ConfigError,
    Inventory,
    NodeConfig,
    PeerConfig,
    SSHConfig,
    TLSConfig,
    load_inventory,
    load_node_config,
    parse_inventory,
    parse_node_config,
)

REPO = Path(__file__).resolve().parents[2]

# Line numbers are part of the tests: keep this text as it is.
BASE = """\
cluster:
  name: demo
  heartbeat_interval_ms: 100
  election_timeout_ms: 1000
nodes:
  - name: n1
    host: 127.0.0.1
    port: 7101
    priority: 3
  - name: n2
    host: 127.0.0.1
    port: 7102
  - name: n3
    host: 127.0.0.1
    port: 7103
"""


def edit(text: str, old: str, new: str, count: int = 1) -> str:
    """Replace the ``count``-th occurrence of ``old`` (it must exist)."""
    parts = text.split(old)
    assert len(parts) > count, f"{old!r} not found {count} times"
    return old.join(parts[:count]) + new + old.join(parts[count:])


def apply(text: str, old, new) -> str:
    """One edit (old, new), or several: old is then a list of (old, new) pairs."""
    for o, n in old if isinstance(old, list) else [(old, new)]:
        text = edit(text, o, n)
    return text


def write(tmp_path: Path, text: str | bytes, name: str = "inventory.yaml") -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def error_of(path: Path, loader=load_inventory) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loader(path)
    err = info.value
    assert "\n" not in str(err)
    return err


def assert_error(tmp_path, text, line, field, *fragments, loader=load_inventory, name="inventory.yaml"):
    path = write(tmp_path, text, name)
    err = error_of(path, loader)
    prefix = f"{path}:{line}: {field}: " if field else f"{path}:{line}: "
    assert str(err).startswith(prefix), f"{str(err)!r} does not start with {prefix!r}"
    for fragment in fragments:
        assert fragment in str(err), f"{fragment!r} not in {str(err)!r}"
    assert (err.path, err.line, err.field) == (str(path), line, field)
    return str(err)


# -- valid files -------------------------------------------------------------------------


def test_repo_inventory_loads():
    inv = load_inventory(REPO / "inventory.yaml")
    assert inv.path == REPO / "inventory.yaml"
    assert inv.cluster.name == "local"
    assert [(n.name, n.host, n.port, n.priority) for n in inv.nodes] == [
        ("n1", "127.0.0.1", 7101, 3),
        ("n2", "127.0.0.1", 7102, 2),
        ("n3", "127.0.0.1", 7103, 1),
        ("n4", "127.0.0.1", 7104, 1),
        ("n5", "127.0.0.1", 7105, 1),
    ]
    assert all(n.role == "voter" and n.data_dir == REPO / ".raftdeck" / n.name for n in inv.nodes)
    assert inv.warnings() == ()


def test_minimal_inventory_takes_every_default(tmp_path):
    path = write(tmp_path, "cluster: {name: c}\nnodes:\n  - {name: a, host: h, port: 1}\n")
    inv = load_inventory(path)
    assert inv == Inventory(
        path=path,
        cluster=ClusterConfig(name="c"),
        nodes=(NodeConfig(name="a", host="h", port=1, data_dir=tmp_path / ".raftdeck" / "a"),),
    )
    c = inv.cluster
    assert (c.election_timeout_ms, c.heartbeat_interval_ms, c.snapshot_interval) == (500, 50, 5000)
    assert c.snapshot_log_percent == 10
    assert (c.dispatch_policy, c.max_attempts, c.task_lease_ms, c.fsync, c.tls) == ("least_loaded", 3, 5000, True, None)
    assert c.max_frame_bytes == 4 * 1024 * 1024
    n = inv.nodes[0]
    assert (n.priority, n.capacity, n.role, n.allow_shell, n.metrics_port, n.log_file, n.ssh) == (
        1, 1, "voter", False, None, None, None
    )


FULL = """\
x-worker: &worker
  role: learner
  priority: 0
  capacity: 16
cluster:
  name: prod_1
  election_timeout_ms: 3000
  heartbeat_interval_ms: 300
  snapshot_interval: 1
  snapshot_log_percent: 0
  dispatch_policy: hash
  max_attempts: 7
  task_lease_ms: 20000
  fsync: false
  tls: {ca: certs/ca.pem, cert: /etc/raftdeck/node.pem, key: ~/node.key}
  max_frame_bytes: 1024
nodes:
  - name: s1
    host: 10.0.0.1
    port: 7100
    priority: 5
    capacity: 2
    data_dir: data/s1
    role: voter
    allow_shell: true
    metrics_port: 9100
    log_file: logs/s1.log
  - {name: s2.b, host: "::1", port: 7100}
  - name: w1
    <<: *worker
    host: 10.0.1.1
    port: 7100
    capacity: 32
    data_dir: /var/lib/raftdeck
    log_file: agent.log
    ssh: {host: w1.example.com, port: 2222, user: deploy, key: keys/id, python: /usr/bin/python3.11, install_dir: ~/rd}
  - {name: w2, host: 10.0.1.2, port: 7100, <<: *worker, ssh: {}}
"""


def test_full_inventory_round_trips_to_dataclasses(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/op")
    path = write(tmp_path, FULL)
    inv = load_inventory(path)
    assert inv == Inventory(
        path=path,
        cluster=ClusterConfig(
            name="prod_1",
            election_timeout_ms=3000,
            heartbeat_interval_ms=300,
            snapshot_interval=1,
            snapshot_log_percent=0,
            dispatch_policy="hash",
            max_attempts=7,
            task_lease_ms=20000,
            fsync=False,
            tls=TLSConfig(
                ca=tmp_path / "certs/ca.pem", cert=Path("/etc/raftdeck/node.pem"), key=Path("/home/op/node.key")
            ),
            max_frame_bytes=1024,
        ),
        nodes=(
            NodeConfig(
                name="s1",
                host="10.0.0.1",
                port=7100,
                priority=5,
                capacity=2,
                data_dir=tmp_path / "data/s1",
                role="voter",
                allow_shell=True,
                metrics_port=9100,
                log_file=tmp_path / "logs/s1.log",
            ),
            NodeConfig(name="s2.b", host="::1", port=7100, data_dir=tmp_path / ".raftdeck/s2.b"),
            NodeConfig(
                name="w1",
                host="10.0.1.1",
                port=7100,
                priority=0,
                capacity=32,  # explicit keys win over the merged block
                data_dir=PurePosixPath("/var/lib/raftdeck"),  # remote: absolute stays
                role="learner",
                log_file=PurePosixPath("rd/agent.log"),  # remote: under install_dir
                ssh=SSHConfig(
                    host="w1.example.com",
                    port=2222,
                    user="deploy",
                    key=tmp_path / "keys/id",  # local: next to the inventory
                    python="/usr/bin/python3.11",
                    install_dir=PurePosixPath("rd"),  # ~/rd: relative to the login's home
                ),
            ),
            NodeConfig(
                name="w2",
                host="10.0.1.2",
                port=7100,
                priority=0,
                capacity=16,
                role="learner",
                data_dir=PurePosixPath("raftdeck/.raftdeck/w2"),
                ssh=SSHConfig(host="10.0.1.2"),
            ),
        ),
    )
    assert [n.name for n in inv.voters] == ["s1", "s2.b"]
    assert [n.name for n in inv.learners] == ["w1", "w2"]
    assert inv.address("s2.b") == ("::1", 7100)
    assert inv.node("w1").is_remote and not inv.node("s1").is_remote
    assert "s1" in inv and "zz" not in inv
    assert inv.names == ("s1", "s2.b", "w1", "w2")
    assert inv.warnings() == (
        "2 voters tolerate no more failures than 1; use an odd number",
        "cluster.fsync is false: a power loss can lose acknowledged writes (demo setting)",
    )


def test_unknown_node_name_suggests_the_closest():
    inv = parse_inventory(BASE, "inventory.yaml")
    with pytest.raises(KeyError, match="no node named 'n10'; did you mean 'n1'"):
        inv.node("n10")
    with pytest.raises(KeyError, match="known nodes: n1, n2, n3"):
        inv.address("zzz")


def test_agent_config_from_inventory():
    inv = parse_inventory(BASE, "inventory.yaml")
    ac = inv.agent_config("n2")
    assert ac.node == inv.node("n2")
    assert ac.cluster == inv.cluster
    assert ac.peers == (PeerConfig("n1", "127.0.0.1", 7101, 3), PeerConfig("n3", "127.0.0.1", 7103, 1))
    assert [m.name for m in ac.members] == ["n2", "n1", "n3"]
    assert ac.peer("n1").address == ("127.0.0.1", 7101)


def test_relative_paths_follow_the_file_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "elsewhere").mkdir()
    write(tmp_path / "conf", edit(BASE, "    port: 7101\n", "    port: 7101\n    data_dir: ../state/n1\n"))
    monkeypatch.chdir(tmp_path / "elsewhere")
    inv = load_inventory("../conf/inventory.yaml")
    assert inv.path == tmp_path / "conf/inventory.yaml"
    assert inv.node("n1").data_dir == tmp_path / "state/n1"
    assert inv.node("n2").data_dir == tmp_path / "conf/.raftdeck/n2"


def test_yaml_conveniences(tmp_path):
    # optional fields left empty are unset; x- keys are ignored; a BOM is fine
    text = "x-note: anything\n" + edit(BASE, "    port: 7101\n", "    port: 7101\n    metrics_port:\n    log_file:\n")
    inv = load_inventory(write(tmp_path, "\ufeff" + text))
    assert inv.node("n1").metrics_port is None and inv.node("n1").log_file is None
    # the same port on different hosts is fine; hex and underscores are YAML integers
    text = edit(edit(BASE, "port: 7102", "port: 7101"), "host: 127.0.0.1", "host: 127.0.0.2", 2)
    text = edit(text, "election_timeout_ms: 1000", "election_timeout_ms: 1_000")
    assert load_inventory(write(tmp_path, text)).node("n2").address == ("127.0.0.2", 7101)


# -- the node config ---------------------------------------------------------------------

NODE = """\
cluster:
  name: demo
node:
  name: n2
  host: 127.0.0.1
  port: 7102
  priority: 2
  capacity: 4
  data_dir: data
peers:
  - {name: n1, host: 127.0.0.1, port: 7101, priority: 3}
  - {name: n3, host: 127.0.0.1, port: 7103, role: learner, priority: 0}
"""


def test_node_config_round_trips(tmp_path):
    path = write(tmp_path, NODE, "node.yaml")
    ac = load_node_config(path)
    assert ac == AgentConfig(
        path=path,
        cluster=ClusterConfig(name="demo"),
        node=NodeConfig("n2", "127.0.0.1", 7102, priority=2, capacity=4, data_dir=tmp_path / "data"),
        peers=(
            PeerConfig("n1", "127.0.0.1", 7101, priority=3),
            PeerConfig("n3", "127.0.0.1", 7103, priority=0, role="learner"),
        ),
    )
    assert [p.name for p in ac.voters] == ["n2", "n1"] and [p.name for p in ac.learners] == ["n3"]


def test_node_config_paths_stay_local_even_with_ssh(tmp_path):
    text = edit(NODE, "  data_dir: data\n", "  data_dir: data\n  ssh: {user: deploy}\n")
    ac = load_node_config(write(tmp_path, text, "node.yaml"))
    assert ac.node.data_dir == tmp_path / "data"
    assert ac.node.ssh == SSHConfig(host="127.0.0.1", user="deploy")


def test_single_node_cluster_needs_an_explicit_empty_peer_list(tmp_path):
    text = NODE.split("peers:")[0] + "peers: []\n"
    assert load_node_config(write(tmp_path, text, "node.yaml")).peers == ()


NODE_ERRORS = [
    # id, old, new, line, field, fragments
    ("missing peers", "peers:\n  - {name: n1, host: 127.0.0.1, port: 7101, priority: 3}\n  - {name: n3, host: 127.0.0.1, port: 7103, role: learner, priority: 0}\n",
     "", 1, "peers", ["missing required field", "peers: []"]),
    ("peers not a list", "peers:\n  - {name: n1, host: 127.0.0.1, port: 7101, priority: 3}\n  - {name: n3, host: 127.0.0.1, port: 7103, role: learner, priority: 0}\n",
     "peers: n1\n", 10, "peers", ["expected a list of peers, got a string ('n1')"]),
    ("missing node", "node:\n", "nod:\n", 3, "nod", ["unknown field; did you mean node?"]),
    ("peer field that only nodes have", "port: 7101, priority: 3}", "port: 7101, capacity: 3}", 11, "peers[0].capacity",
     ["unknown field", "name, host, port, priority, role"]),
    ("peer named like the node", "{name: n1,", "{name: n2,", 11, "peers[0].name",
     ["duplicate node name 'n2' (also node at line 4)"]),
    ("peer on the node's address", "port: 7103,", "port: 7102,", 12, "peers[1].port",
     ["duplicate port 7102 (also used by n2 at line 6); give each node on a host its own port"]),
    ("peer missing port", "port: 7101, ", "", 11, "peers[0].port", ["missing required field"]),
    ("nobody can lead", [("  priority: 2\n", "  role: learner\n"), ("priority: 3}", "priority: 0}")], None, 10, "peers",
     ["no voter has priority > 0 among the node and peers, so the cluster could never elect a leader"]),
]


@pytest.mark.parametrize("old,new,line,field,fragments", [c[1:] for c in NODE_ERRORS], ids=[c[0] for c in NODE_ERRORS])
def test_node_config_errors(tmp_path, old, new, line, field, fragments):
    assert_error(tmp_path, apply(NODE, old, new), line, field, *fragments, loader=load_node_config, name="node.yaml")


# -- inventory errors --------------------------------------------------------------------

ERRORS = [
    # id, old, new, line, field, fragments
    # structure
    ("not a mapping", BASE, "- n1\n- n2\n", 1, "", ["expected the inventory as a mapping (key: value lines), got a list"]),
    ("a scalar", BASE, "just text\n", 1, "", ["got a string ('just text')"]),
    ("cluster not a mapping", "cluster:\n  name: demo\n  heartbeat_interval_ms: 100\n  election_timeout_ms: 1000\n",
     "cluster: demo\n", 1, "cluster", ["expected cluster settings as a mapping", "got a string ('demo')"]),
    ("nodes not a list", "nodes:" + BASE.split("nodes:")[1], "nodes:\n  name: n1\n  host: h\n", 6, "nodes",
     ["expected a list of nodes, got a mapping"]),
    ("node not a mapping", "  - name: n2\n    host: 127.0.0.1\n    port: 7102\n", "  - n2\n", 10, "nodes[1]",
     ["expected a node as a mapping", "got a string ('n2')"]),
    ("duplicate key", "    port: 7102\n", "    port: 7102\n    port: 7104\n", 13, "nodes[1].port",
     ["duplicate key (first at line 12)"]),
    # unknown fields
    ("unknown cluster field", "  heartbeat_interval_ms: 100", "  heartbeat_ms: 100", 3, "cluster.heartbeat_ms",
     ["unknown field; did you mean heartbeat_interval_ms?"]),
    ("unknown node field", "    priority: 3", "    prio: 3", 9, "nodes[0].prio", ["unknown field; did you mean priority?"]),
    ("cluster field on a node", "    priority: 3", "    fsync: false", 9, "nodes[0].fsync",
     ["unknown field; fsync is a cluster setting; put it under cluster:"]),
    ("node field in cluster", "  name: demo\n", "  name: demo\n  capacity: 4\n", 3, "cluster.capacity",
     ["unknown field; capacity is a node field"]),
    ("unknown top-level field", "nodes:", "node:", 5, "node", ["unknown field; did you mean nodes?"]),
    ("unknown field, nothing close", "    priority: 3", "    zzzz: 3", 9, "nodes[0].zzzz",
     ["unknown field; known fields: name, host, port, priority, capacity, data_dir"]),
    ("unknown tls field", "  name: demo\n", "  name: demo\n  tls: {ca: a, cert: b, key: c, kye: d}\n", 3, "cluster.tls.kye",
     ["unknown field; did you mean key?"]),
    ("unknown ssh field", "    priority: 3", "    ssh: {usr: me}", 9, "nodes[0].ssh.usr", ["did you mean user?"]),
    # missing
    ("missing cluster", "cluster:\n  name: demo\n  heartbeat_interval_ms: 100\n  election_timeout_ms: 1000\n", "", 1,
     "cluster", ["missing required field; add a cluster: mapping"]),
    ("missing nodes", "nodes:" + BASE.split("nodes:")[1], "", 1, "nodes", ["missing required field"]),
    ("missing cluster name", "  name: demo\n", "", 2, "cluster.name", ["missing required field; add name:"]),
    ("missing port", "    port: 7102\n", "", 10, "nodes[1].port", ["missing required field; add port: <an integer 1..65535>"]),
    ("missing host", "    host: 127.0.0.1\n    port: 7103", "    port: 7103", 13, "nodes[2].host", ["missing required field"]),
    ("missing name", "  - name: n3\n    host", "  - host", 13, "nodes[2].name", ["missing required field"]),
    ("empty required value", "  name: demo", "  name:", 2, "cluster.name", ["missing value"]),
    ("null for a defaulted field", "    priority: 3", "    priority:", 9, "nodes[0].priority",
     ["expected an integer >= 0, got nothing (null); remove the line to use the default (1)"]),
    # wrong types
    ("bool is not an int", "port: 7102", "port: true", 12, "nodes[1].port", ["expected an integer, got a boolean (true)"]),
    ("yes is a bool, not an int", "priority: 3", "priority: yes", 9, "nodes[0].priority", ["got a boolean (yes)"]),
    ("quoted number", "port: 7102", "port: '7102'", 12, "nodes[1].port",
     ["expected an integer, got a string ('7102'); remove the quotes"]),
    ("float", "  heartbeat_interval_ms: 100", "  heartbeat_interval_ms: 100.0", 3, "cluster.heartbeat_interval_ms",
     ["expected an integer, got a number (100.0); write 100"]),
    ("int is not a bool", "    priority: 3", "    allow_shell: 1", 9, "nodes[0].allow_shell",
     ["expected true or false, got an integer (1)"]),
    ("quoted bool", "  name: demo\n", "  name: demo\n  fsync: 'false'\n", 3, "cluster.fsync",
     ["expected true or false, got a string ('false')"]),
    ("name read as a boolean", "name: n2", "name: no", 10, "nodes[1].name",
     ['expected a name such as n1, got a boolean (no); quote it: name: "no"']),
    ("host read as a number", "    host: 127.0.0.1\n    port: 7103", "    host: 12\n    port: 7103", 14, "nodes[2].host",
     ['got an integer (12); quote it: host: "12"']),
    ("list for an int", "priority: 3", "priority: [3]", 9, "nodes[0].priority", ["expected an integer, got a list"]),
    ("tls not a mapping", "  name: demo\n", "  name: demo\n  tls: 5\n", 3, "cluster.tls",
     ["expected on, off, {dir: DIR} or a mapping of ca, cert and key, got an integer (5)"]),
    ("tls dir and files", "  name: demo\n", "  name: demo\n  tls: {dir: t, ca: a}\n", 3, "cluster.tls.ca",
     ["give either dir: or ca:, cert: and key:, not both"]),
    ("tls incomplete", "  name: demo\n", "  name: demo\n  tls:\n    ca: ca.pem\n    cert: c.pem\n", 4, "cluster.tls.key",
     ["missing required field"]),
    ("date", "  name: demo\n", "  name: 2024-01-01\n", 2, "cluster.name", ["got a date (2024-01-01)"]),
    ("custom tag", "  name: demo\n", "  name: !secret demo\n", 2, "cluster.name", ["got a value tagged !secret"]),
    # out of range and bad values
    ("port 0", "port: 7102", "port: 0", 12, "nodes[1].port", ["0 is out of range; use a port number 1..65535"]),
    ("port too big", "port: 7102", "port: 65536", 12, "nodes[1].port", ["65536 is out of range"]),
    ("negative priority", "priority: 3", "priority: -1", 9, "nodes[0].priority", ["-1 is out of range; use at least 0"]),
    ("capacity 0", "    priority: 3", "    capacity: 0", 9, "nodes[0].capacity", ["0 is out of range; use at least 1"]),
    ("heartbeat 0", "heartbeat_interval_ms: 100", "heartbeat_interval_ms: 0", 3, "cluster.heartbeat_interval_ms",
     ["0 is out of range; use at least 1"]),
    ("snapshot_interval 0", "  name: demo\n", "  name: demo\n  snapshot_interval: 0\n", 3, "cluster.snapshot_interval",
     ["out of range"]),
    ("snapshot_log_percent -1", "  name: demo\n", "  name: demo\n  snapshot_log_percent: -1\n", 3,
     "cluster.snapshot_log_percent", ["-1 is out of range; use 0..100000"]),
    ("max_attempts 0", "  name: demo\n", "  name: demo\n  max_attempts: 0\n", 3, "cluster.max_attempts", ["use 1..1000"]),
    ("tiny frames", "  name: demo\n", "  name: demo\n  max_frame_bytes: 10\n", 3, "cluster.max_frame_bytes",
     ["10 is out of range; use 1024..4294967295"]),
    ("metrics port", "    priority: 3", "    metrics_port: 70000", 9, "nodes[0].metrics_port", ["out of range"]),
    ("ssh port", "    priority: 3", "    ssh: {port: 0}", 9, "nodes[0].ssh.port", ["out of range"]),
    ("huge int", "priority: 3", "priority: 99999999999999999999", 9, "nodes[0].priority", ["out of range"]),
    ("role", "    priority: 3", "    role: leader", 9, "nodes[0].role",
     ["'leader' is not one of voter, learner; the leader is elected: use role: voter and a higher priority"]),
    ("role typo", "    priority: 3", "    role: voters", 9, "nodes[0].role", ["did you mean voter?"]),
    ("dispatch policy", "  name: demo\n", "  name: demo\n  dispatch_policy: least-loaded\n", 3, "cluster.dispatch_policy",
     ["did you mean least_loaded?"]),
    ("cluster name", "name: demo", "name: Demo", 2, "cluster.name",
     ["'Demo' is not a valid cluster name; use 1 to 63 lowercase letters, digits, - and _"]),
    ("node name", "name: n2", "name: n/2", 10, "nodes[1].name", ["'n/2' is not a valid node name"]),
    ("empty host", "    host: 127.0.0.1\n    port: 7103", "    host: ''\n    port: 7103", 14, "nodes[2].host", ["is empty"]),
    ("host:port as host", "    host: 127.0.0.1\n    port: 7103", "    host: '127.0.0.1:7103'\n    port: 7103", 14,
     "nodes[2].host", ["write host: 127.0.0.1 and port: 7103"]),
    ("~user remote path", "    priority: 3", "    ssh: {install_dir: ~bob/rd}", 9, "nodes[0].ssh.install_dir",
     ["~user paths are not supported"]),
    # across nodes
    ("duplicate name", "name: n3", "name: n1", 13, "nodes[2].name",
     ["duplicate node name 'n1' (also nodes[0] at line 6); give every node a unique name"]),
    ("duplicate metrics port", "    priority: 3", "    metrics_port: 7103", 15, "nodes[2].port",
     ["duplicate port 7103 (also used by n1's metrics_port at line 9)"]),
    ("port equals own metrics port", "    port: 7102\n", "    port: 7102\n    metrics_port: 7102\n", 13,
     "nodes[1].metrics_port", ["duplicate port 7102 (also used by this node's port at line 12)"]),
    ("no nodes", "nodes:" + BASE.split("nodes:")[1], "nodes: []\n", 5, "nodes",
     ["no nodes; list at least one node under nodes:"]),
    ("empty nodes", "nodes:" + BASE.split("nodes:")[1], "nodes:\n", 5, "nodes", ["no nodes"]),
    ("all learners", "nodes:" + BASE.split("nodes:")[1],
     "nodes:\n  - {name: a, host: h, port: 1, role: learner}\n  - {name: b, host: h, port: 2, role: learner}\n", 5, "nodes",
     ["no voter among the nodes, so the cluster could never elect a leader"]),
    # timing
    ("election timeout below 10 heartbeats", "election_timeout_ms: 1000", "election_timeout_ms: 999", 4,
     "cluster.election_timeout_ms",
     ["999 ms is less than 10 x heartbeat_interval_ms (100 ms at line 3); use at least 1000 or a shorter heartbeat"]),
    ("heartbeat too slow for the default timeout",
     [("  election_timeout_ms: 1000\n", ""), ("heartbeat_interval_ms: 100", "heartbeat_interval_ms: 101")], None,
     3, "cluster.heartbeat_interval_ms",
     ["101 ms is more than a tenth of election_timeout_ms (500 ms by default); use at most 50 or set"]),
]


@pytest.mark.parametrize("old,new,line,field,fragments", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_inventory_errors(tmp_path, old, new, line, field, fragments):
    assert_error(tmp_path, apply(BASE, old, new), line, field, *fragments)


def test_duplicate_port_message_is_exact(tmp_path):
    path = write(tmp_path, edit(BASE, "port: 7103", "port: 7102"))
    assert str(error_of(path)) == (
        f"{path}:15: nodes[2].port: duplicate port 7102 (also used by n2 at line 12); "
        "give each node on a host its own port"
    )


def test_host_names_compare_without_case(tmp_path):
    text = edit(BASE, "host: 127.0.0.1", "host: localhost")
    text = edit(text, "    host: 127.0.0.1\n    port: 7103", "    host: LocalHost\n    port: 7101")
    assert_error(tmp_path, text, 15, "nodes[2].port", "duplicate port 7101 (also used by n1 at line 8)")


def test_errors_come_in_file_order(tmp_path):
    # the timing problem in cluster: is reported before the duplicate port further down
    text = edit(edit(BASE, "port: 7103", "port: 7102"), "election_timeout_ms: 1000", "election_timeout_ms: 10")
    assert_error(tmp_path, text, 4, "cluster.election_timeout_ms", "10 ms is less than 10 x")


def test_no_voter_that_can_lead(tmp_path):
    text = edit(BASE, "    priority: 3\n", "    priority: 0\n")
    for i in (2, 3):
        text = edit(text, f"    port: 710{i}\n", f"    port: 710{i}\n    priority: 0\n")
    assert_error(tmp_path, text, 5, "nodes", "no voter has priority > 0 among the nodes")


@pytest.mark.parametrize(
    "text,line,column,fragment",
    [
        ("cluster:\n  name: [demo\nnodes: []\n", 3, 6, "expected ',' or ']', but got ':' (while parsing a flow sequence at line 2)"),
        ("cluster:\n\tname: demo\n", 2, 1, "found character '\\t' that cannot start any token"),
        ("cluster: {name: demo}\nnodes: [\n  {name: a, host: h, port: 1}}\n", 3, 30, "expected ',' or ']'"),
        ("cluster:\n  name: 'demo\n", 3, 1, "found unexpected end of stream"),
        ("a: 1\n---\nb: 2\n", 2, 1, "but found another document"),
        ("cluster:\n  name: d\x01emo\n", 2, 10, "character #x0001 is not allowed"),
    ],
    ids=["unclosed list", "tab", "extra brace", "unclosed quote", "two documents", "control character"],
)
def test_yaml_syntax_errors_name_line_and_column(tmp_path, text, line, column, fragment):
    path = write(tmp_path, text)
    err = error_of(path)
    assert str(err).startswith(f"{path}:{line}:{column}: invalid YAML: "), str(err)
    assert fragment in str(err)
    assert (err.line, err.column) == (line, column)


def test_file_level_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(error_of(missing)) == f"{missing}: cannot read the file: No such file or directory"
    assert str(error_of(write(tmp_path, ""))).endswith(": the file is empty; expected a mapping with cluster: and nodes:")
    assert str(error_of(write(tmp_path, "# only a comment\n"))).startswith(f"{tmp_path / 'inventory.yaml'}:1: the file is empty")
    err = error_of(write(tmp_path, b"cluster: {name: \xff}\n"))
    assert str(err) == f"{tmp_path / 'inventory.yaml'}: not UTF-8 text (byte 16); save the file as UTF-8"


def test_parse_functions_name_the_given_path():
    with pytest.raises(ConfigError, match=r"^conf/inv\.yaml:2: cluster\.name: 'X'"):
        parse_inventory("cluster:\n  name: X\nnodes: []\n", "conf/inv.yaml")
    with pytest.raises(ConfigError, match=r"^<node config>:1: node: missing required field"):
        parse_node_config("cluster: {name: x}\npeers: []\n")


def test_docs_examples_are_valid():
    doc = (REPO / "docs/OPERATIONS.md").read_text()
    section = doc.split("## The inventory", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    inv = parse_inventory(blocks[0], "/srv/raftdeck/inventory.yaml")
    assert len(inv.voters) == 3 and len(inv.learners) == 2
    ac = parse_node_config(blocks[1], "/opt/raftdeck/node.yaml")
    assert ac.node.data_dir == Path("/opt/raftdeck/data")
    # the node config's cluster matches the inventory example's, as the doc says it must
    assert replace(ac.cluster, tls=None) == replace(inv.cluster, tls=None)
    assert ac.cluster.tls.ca == Path("/opt/raftdeck/certs/ca.pem")
    # every field of every dataclass is documented
    for cls in (ClusterConfig, NodeConfig, SSHConfig, TLSConfig):
        for name in cls.__dataclass_fields__:
            assert f"`{name}`" in section, f"{cls.__name__}.{name} is not documented"


# -- properties --------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
node_st = st.fixed_dictionaries(
    {},
    optional={
        "priority": st.integers(0, 10),
        "capacity": st.integers(1, 64),
        "role": st.sampled_from(["voter", "learner"]),
        "allow_shell": st.booleans(),
        "data_dir": st.sampled_from(["d", "/abs/d", "a/../b"]),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cluster_name=names,
    heartbeat=st.integers(1, 500),
    factor=st.integers(10, 30),
    policy=st.sampled_from(["least_loaded", "round_robin", "weighted", "hash"]),
    node_names=st.lists(names, min_size=1, max_size=8, unique=True),
    extras=st.lists(node_st, min_size=8, max_size=8),
    flow=st.booleans(),
)
def test_generated_inventories_round_trip(cluster_name, heartbeat, factor, policy, node_names, extras, flow):
    nodes = []
    for i, name in enumerate(node_names):
        nodes.append({"name": name, "host": f"10.0.0.{i % 3}", "port": 7000 + i, **extras[i]})
    nodes[0].update(role="voter", priority=1)
    doc = {
        "cluster": {"name": cluster_name, "heartbeat_interval_ms": heartbeat,
                    "election_timeout_ms": heartbeat * factor, "dispatch_policy": policy},
        "nodes": nodes,
    }
    inv = parse_inventory(yaml.safe_dump(doc, default_flow_style=flow), "/inv/inventory.yaml")
    assert inv.cluster == ClusterConfig(cluster_name, heartbeat * factor, heartbeat, dispatch_policy=policy)
    expected = []
    for n in nodes:
        d = dict(n)
        d["data_dir"] = Path(os.path.normpath(os.path.join("/inv", d.get("data_dir", f".raftdeck/{n['name']}"))))
        expected.append(NodeConfig(**d))
    assert inv.nodes == tuple(expected)


VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=False), st.text(max_size=6),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FIELDS = ["name", "host", "port", "priority", "capacity", "role", "data_dir", "allow_shell", "metrics_port",
          "ssh", "tls", "fsync", "heartbeat_interval_ms", "election_timeout_ms", "dispatch_policy", "nme", "x"]


@settings(max_examples=150, deadline=None)
@given(
    edits=st.lists(
        st.tuples(st.integers(-1, 3), st.sampled_from(FIELDS), st.one_of(st.just("DELETE"), VALUES)),
        min_size=1, max_size=3,
    )
)
def test_any_broken_inventory_gives_one_line_with_a_real_line_number(edits):
    doc = yaml.safe_load(BASE)
    for where, key, value in edits:
        target = doc["cluster"] if where < 0 else doc["nodes"][where % 3]
        if value == "DELETE":
            target.pop(key, None)
        else:
            target[key] = value
    text = yaml.safe_dump(doc)
    try:
        parse_inventory(text, "inv.yaml")
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith("inv.yaml:")
        assert e.line is not None and 1 <= e.line <= text.count("\n") + 1, msg


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=":-[]{}#&*!|>'\"%@`,?\n\t ab1", max_size=40))
def test_arbitrary_text_only_ever_raises_config_error(text):
    try:
        parse_inventory(text, "inv.yaml")
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("inv.yaml")


# -- the command line --------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "nodeagent.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
    )


def test_cli_rejects_a_bad_file_with_one_line_and_exit_2(tmp_path):
    write(tmp_path, edit(BASE, "port: 7103", "port: 7102"))
    r = run_cli("check-inventory", "inventory.yaml", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr == (
        "inventory.yaml:15: nodes[2].port: duplicate port 7102 (also used by n2 at line 12); "
        "give each node on a host its own port\n"
    )


def test_cli_summarises_the_repo_inventory_without_importing_trio(tmp_path):
    r = run_cli("check-inventory", str(REPO / "inventory.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{REPO / 'inventory.yaml'}: cluster local: 5 nodes (5 voters, 0 learners)")
    assert [line.split()[:3] for line in lines[1:]] == [
        [f"n{i}", f"127.0.0.1:710{i}", "voter"] for i in range(1, 6)
    ]
    assert "priority=3" in lines[1] and f"data_dir={REPO / '.raftdeck/n1'}" in lines[1]
    r = subprocess.run(
        [sys.executable, "-c",
         "import sys; from nodeagent import cli; cli.main(['check-inventory', sys.argv[1]]); "
         "assert 'trio' not in sys.modules and 'textual' not in sys.modules",
         str(REPO / "inventory.yaml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert r.returncode == 0, r.stderr


def test_cli_in_process(tmp_path, capsys):
    path = write(tmp_path, FULL)
    assert cli.main(["check-inventory", str(path)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 5
    assert "ssh=deploy@w1.example.com:2222" in out and "shell" in out.splitlines()[1]
    assert err.splitlines() == [
        "nodeagent: warning: 2 voters tolerate no more failures than 1; use an odd number",
        "nodeagent: warning: cluster.fsync is false: a power loss can lose acknowledged writes (demo setting)",
    ]
    assert cli.main(["check-inventory", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == f"{tmp_path / 'missing.yaml'}: cannot read the file: No such file or directory\n"
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2


def test_tls_forms_on_off_and_dir(tmp_path):
    base = "cluster:\n  name: demo\n{tls}nodes:\n  - {{name: n1, host: 127.0.0.1, port: 7101}}\n"
    for text in ("", "  tls: off\n", "  tls: false\n", "  tls:\n"):
        assert parse_inventory(base.format(tls=text), tmp_path / "i.yaml").cluster.tls is None
    on = parse_inventory(base.format(tls="  tls: on\n"), tmp_path / "i.yaml")
    assert on.cluster.tls.dir == tmp_path / ".raftdeck" / "tls" and on.cluster.tls.cert is None
    d = parse_inventory(base.format(tls="  tls: {dir: certs}\n"), tmp_path / "i.yaml")
    assert d.cluster.tls.ca == tmp_path / "certs" / "ca.crt"
    ac = d.agent_config("n1")
    assert (ac.cluster.tls.cert, ac.cluster.tls.key) == (tmp_path / "certs/nodes/n1.crt",
                                                          tmp_path / "certs/nodes/n1.key")
    assert d.cluster.tls.for_role("viewer").cert == tmp_path / "certs/operators/viewer.crt"
    assert any("tls is off" in w for w in parse_inventory(base.format(tls=""), tmp_path / "i.yaml").warnings())
