"""Growing and shrinking a running cluster from the command line: `raftdeck add-node` and
`raftdeck remove-node` against real agents started by `raftdeck up` (mutual TLS).

The node that joins must learn the membership from the leader's log (n4 below), or
from an installed snapshot once the leader's log is compacted (n5). If it wrote its
inventory's membership as entry 1 (what a node of the initial cluster does), that entry
would match the cluster's own entry 1 by index and term, and it would keep a membership
nobody else has: as a learner it would count itself a voter, and its digest would differ
from every other replica's at the same applied index.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from console.client import ClusterClient, tls_context
from nodeagent.config import load_inventory
from tests.console.test_cli import kill_leftovers, run, run_json, sub, wait_for, write_inventory
from console.local import free_ports

pytestmark = pytest.mark.integration


def client(inv_path) -> ClusterClient:
    inv = load_inventory(str(inv_path))
    return ClusterClient({n.name: (n.host, n.port) for n in inv.nodes}, inv.cluster.name,
                         timeout=3.0, ssl=tls_context(inv.cluster.tls))


def statuses(inv_path) -> dict[str, dict]:
    async def main():
        async with client(inv_path) as c:
            got = await c.statuses()
        return {n: s for n, s in got.items() if isinstance(s, dict)}

    return asyncio.run(main())


def put_many(inv_path, n: int) -> None:
    async def main():
        async with client(inv_path) as c:
            for i in range(n):
                await c.put(f"k{i}", b"v")

    asyncio.run(main())


def agree(inv_path, names: list[str]):
    """Every named node answers, at the same applied index with the same digest and the
    same membership; the statuses, or None."""
    st = statuses(inv_path)
    if set(names) - set(st):
        return None
    seen = {(st[n]["applied"], st[n]["digest"], tuple(st[n]["voters"]), tuple(st[n]["learners"]))
            for n in names}
    return st if len(seen) == 1 else None


def test_add_a_learner_then_a_voter_then_remove_nodes(tmp_path):
    folder = tmp_path / "grow"
    inv = write_inventory(folder)
    # Snapshots every 20 entries, so that once the log has grown past the 1,000 entries a
    # leader keeps behind its snapshot, a node that joins learns the membership from an
    # installed snapshot (n5) rather than from entry 1 of the log (n4).
    inv.write_text(inv.read_text().replace("cluster:\n", "cluster:\n  snapshot_interval: 20\n"
                                           "  snapshot_log_percent: 0\n", 1))
    pids: set[int] = set()
    try:
        p = sub(inv, "up", "--json")
        assert p.returncode == 0, p.stderr
        pids |= {r["pid"] for r in json.loads(p.stdout)["nodes"] if r["pid"]}
        put_many(inv, 30)
        p4, p5 = free_ports(2)
        with open(inv, "a") as f:
            for name, port in (("n4", p4), ("n5", p5)):
                f.write(f"  - {{name: {name}, host: 127.0.0.1, port: {port}, capacity: 2, "
                        f"data_dir: data/{name}}}\n")

        # `up` does not start them: the cluster runs and they are not members yet.
        rc, out, err = run_json(inv, "up")
        assert rc == 0, err
        row = next(r for r in out["nodes"] if r["name"] == "n4")
        assert row["action"] == "skipped" and "raftdeck add-node n4" in row["note"], row
        assert not (folder / "data" / "n4.pid").exists()

        # A learner: replicated to, the same state and membership as everyone.
        rc, out, err = run_json(inv, "add-node", "n4", "--learner")
        assert rc == 0, err
        assert out["role"] == "learner" and out["done"] == ["added as a learner", "started (--join)"]
        st = wait_for(lambda: agree(inv, ["n1", "n2", "n3", "n4"]), 30, "n4 to agree")
        assert st["n4"]["voters"] == ["n1", "n2", "n3"] and st["n4"]["learners"] == ["n4"]
        assert st["n4"]["keys"] == st["n1"]["keys"] >= 30
        assert st["n4"]["snapshots"]["installed"] == 0  # it read the log from entry 1
        text = run(inv, "status")[1]
        line = next(ln for ln in text.splitlines() if ln.startswith("n4 "))
        assert line.split()[2] == "learner", text
        assert run_json(inv, "status")[1]["nodes"][3]["voter"] is False

        # A learner that joins from a snapshot.
        put_many(inv, 1200)
        rc, out, err = run_json(inv, "add-node", "n5", "--learner")
        assert rc == 0, err
        st = wait_for(lambda: agree(inv, ["n1", "n2", "n3", "n4", "n5"]), 30, "n5 to agree")
        assert st["n5"]["learners"] == ["n4", "n5"] and st["n5"]["snapshots"]["installed"] >= 1

        # Again, without --learner: it is made a voter; nothing else is redone.
        rc, out, err = run_json(inv, "add-node", "n4")
        assert rc == 0, err
        assert out["role"] == "voter" and out["done"] == ["made a voter"], out
        st = wait_for(lambda: agree(inv, ["n1", "n2", "n3", "n4", "n5"]), 30, "a voter n4")
        assert st["n4"]["voters"] == ["n1", "n2", "n3", "n4"] and st["n4"]["learners"] == ["n5"]
        assert run(inv, "put", "after-add", "v")[0] == 0

        # Remove the leader: it hands leadership on, then leaves; its agent is stopped.
        leader = next(n for n, s in statuses(inv).items() if s["role"] == "leader")
        rc, out, err = run_json(inv, "remove-node", leader)
        assert rc == 0, err
        assert out["stopped"] is True
        rest = [n for n in ("n1", "n2", "n3", "n4", "n5") if n != leader]
        st = wait_for(lambda: agree(inv, rest), 30, "the rest to agree")
        assert leader not in st[rest[0]]["voters"] and len(st[rest[0]]["voters"]) == 3
        assert st[rest[0]]["learners"] == ["n5"]
        assert run(inv, "put", "after-remove", "v")[0] == 0
        assert run(inv, "get", "k3")[1].strip() == "v"

        # `up` leaves the members running and does not start the removed node again.
        rc, out, err = run_json(inv, "up")
        rows = {r["name"]: r for r in out["nodes"]}
        assert rc == 0 and all(rows[n]["action"] == "running" for n in rest), (rows, err)
        assert rows[leader]["action"] == "skipped" and "removed" in rows[leader]["note"], rows

        # Bad input: one line each.
        rc, _, err = run(inv, "add-node", "n9")
        assert rc == 2 and "n9" in err and "\n" not in err.strip(), err
        rc, _, err = run(inv, "remove-node", leader)
        assert rc != 0 and "not a member" in err, err
    finally:
        with contextlib.suppress(Exception):
            run(inv, "down", "--grace-s", "5")
        kill_leftovers(folder, pids)


def test_deploy_refuses_a_remote_node_the_running_cluster_does_not_have(make_cluster, capsys):
    """A node with ssh: added to the inventory of a running cluster: deploy would start
    it bootstrapping the inventory's membership. It is refused before any SSH connection
    (the host named here does not exist)."""
    from console.cli import main

    lc = make_cluster(3)

    async def leader():
        async with lc.client() as c:
            return await lc.wait_leader(c)

    asyncio.run(leader())  # the agents have read the inventory: now it grows
    with open(lc.inventory, "a") as f:
        f.write("  - {name: r4, host: 10.255.0.9, port: 7100, ssh: {user: nobody}}\n")
    rc = main(["--inventory", str(lc.inventory), "deploy"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err, err
    assert "r4: not a member of the running cluster" in err and "--join" in err, err


def test_a_joining_node_restarted_without_join_still_does_not_bootstrap(tmp_path):
    """`--join` is on the command line of the node's first start only; a restart before
    the leader's first entries arrive (the console's restart key, `raftdeck restart`)
    runs without it. The data directory remembers it: the node still writes no
    membership of its own. Here no other agent runs, so nothing ever arrives."""
    from console.procs import LocalProcesses

    inv_path = write_inventory(tmp_path / "join")
    inv = load_inventory(str(inv_path))
    procs = LocalProcesses(inv)
    node = inv.node("n3")
    pids: set[int] = set()

    def n3_status():
        return statuses(inv_path).get("n3")

    try:
        pids.add(procs.start(node, join=True).pid)
        st = wait_for(n3_status, 30, "n3 answering")
        marker = procs.data_dir(node) / "joining"
        assert marker.exists() and st["last_index"] == 0 and st["voters"] == []
        procs.kill("n3")
        pids.add(procs.start(node).pid)  # no --join
        st = wait_for(n3_status, 30, "n3 answering again")
        assert st["last_index"] == 0 and st["voters"] == [], st
        assert marker.exists()
    finally:
        with contextlib.suppress(Exception):
            procs.kill("n3")
        kill_leftovers(tmp_path / "join", pids)
