"""The whole life of a deployed cluster on three real hosts (network namespaces with their
own sshd, or loopback addresses; see conftest.py): deploy, an idempotent second deploy,
a fourth host added and removed (add-node, remove-node), kill / pause / resume / restart
over SSH, logs, a rolling upgrade to a changed wheel, a restore from a backup after every
data directory is lost, and undeploy. One test, because the steps build on each other and share one deployment."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import ssl
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from console.client import ClusterClient, tls_context
from console.deploy import build_artifacts, content_digest
from nodeagent.config import load_inventory, load_node_config
from tests.console.test_cli import wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def wheels(tmp_path_factory):
    """The project wheel, the dependency wheelhouse, and an upgrade wheel whose version and
    contents differ; built once per session."""
    work = tmp_path_factory.mktemp("wheels")
    t0 = time.monotonic()
    art = build_artifacts(work)
    house = work / "house"
    house.mkdir()
    for w in (*art.deps, art.pip):
        os.link(w.path, house / w.name)
    upgrade = rewrite_wheel(art.project.path, work / "upgrade", "0.1.0+up2")
    print(f"wheels built in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return art.project.path, house, upgrade


def rewrite_wheel(src: Path, out_dir: Path, version: str) -> Path:
    """A copy of a wheel with another version (METADATA and dist-info name) and a changed
    module, its RECORD rewritten, as a rebuilt release would be."""
    out_dir.mkdir()
    old_info = next(n for n in zipfile.ZipFile(src).namelist() if n.endswith(".dist-info/METADATA"))
    old_dir = old_info.split("/")[0]
    new_dir = f"raftdeck-{version}.dist-info"
    dest = out_dir / src.name.replace(old_dir[len("raftdeck-"):-len(".dist-info")], version)
    record = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            if name.endswith(".dist-info/RECORD"):
                continue
            data = zin.read(name)
            if name == f"{old_dir}/METADATA":
                data = re.sub(rb"(?m)^Version: .*$", f"Version: {version}".encode(), data)
            if name == "nodeagent/__init__.py":
                data += f"\n# upgraded build {version}\n".encode()
            arc = name.replace(old_dir + "/", new_dir + "/")
            zout.writestr(arc, data)
            h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{arc},sha256={h},{len(data)}")
        record.append(f"{new_dir}/RECORD,,")
        zout.writestr(f"{new_dir}/RECORD", "\n".join(record) + "\n")
    return dest


def raftdeck(*args: str, env_extra: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-m", "console.cli", *args], capture_output=True,
                       text=True, env=env, timeout=timeout)
    print(f"$ raftdeck {' '.join(args)}  -> {r.returncode}\n{r.stdout}{r.stderr}", file=sys.stderr)
    return r


def statuses(inv) -> dict[str, dict | None]:
    async def go():
        async with ClusterClient({n.name: (n.host, n.port) for n in inv.nodes}, inv.cluster.name,
                                 timeout=1.5, op_timeout=3.0, ssl=tls_context(inv.cluster.tls)) as c:
            async def one(n):
                try:
                    return n, await asyncio.wait_for(c.call(n, "status"), 3)
                except Exception:
                    return n, None

            return dict(await asyncio.gather(*(one(n) for n in inv.names)))

    return asyncio.run(go())


def wait_leader(inv, exclude=(), timeout=40.0) -> str:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = statuses(inv)
        leaders = [n for n, s in last.items() if s and s.get("role") == "leader" and n not in exclude]
        if leaders:
            return leaders[0]
        time.sleep(0.2)
    raise AssertionError(f"no leader within {timeout}s: {last}")


def kv(inv, op: str, key: str, value: bytes | None = None):
    async def go():
        async with ClusterClient({n.name: (n.host, n.port) for n in inv.nodes}, inv.cluster.name,
                                 timeout=2.0, op_timeout=20.0, ssl=tls_context(inv.cluster.tls)) as c:
            return await (c.put(key, value) if op == "put" else c.get(key))

    return asyncio.run(go())


def pid_of(install_dir: Path, name: str) -> int:
    return json.loads((install_dir / ".raftdeck" / f"{name}.pid").read_text())["pid"]


def proc_state(pid: int) -> str | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rfind(")") + 2]


def console_kill_and_restart(inv, known_hosts: Path) -> None:
    """The console's fault keys on remote nodes: k (kill, confirmed) the leader over SSH,
    see another leader, x (restart) it over SSH, see it back."""
    from console.app import RaftdeckApp
    from console.cluster import node_infos
    from console.deploy import SSHOptions
    from console.procs import Processes
    from console.testing import until, until_asked
    from console.widgets.node_table import NodeTable

    async def main():
        app = RaftdeckApp(node_infos(inv), inv.cluster.name,
                          {n.name: (n.host, n.port) for n in inv.nodes},
                          procs=Processes(inv, ssh=SSHOptions(known_hosts=known_hosts)),
                          ssl=tls_context(inv.cluster.tls))
        async with app.run_test(size=(160, 40)) as pilot:
            def leader():
                h = app.model.health(time.monotonic())
                return h.leader if h.leader and all(
                    app.model.row(n).reachable for n in inv.names) else None

            old = await until(pilot, leader, 40, "a leader, every node up")
            app.query_one(NodeTable).select(old)
            await pilot.press("k")
            await until_asked(pilot)
            await pilot.press("y")
            await until(pilot, lambda: app.model.row(old).reachable is False, 30, "killed node down")
            await until(pilot, lambda: (app.model.health(time.monotonic()).leader or old) != old,
                        30, "another leader")
            app.query_one(NodeTable).select(old)
            await pilot.press("x")
            await until(pilot, lambda: app.model.row(old).reachable, 40, "restarted node up")
            await pilot.press("q")

    asyncio.run(main())


@pytest.mark.long(95)  # seconds, roughly: the longest start first
def test_deploy_kill_upgrade_undeploy(ssh_hosts, wheels, ssh_mode_name):
    t_start = time.monotonic()
    project, house, upgrade = wheels
    hs = ssh_hosts(4)  # the fourth joins the running cluster later (add-node)
    from tests.ssh.conftest import free_port_on

    ports = [7101 if hs.mode == "netns" else free_port_on(h.addr) for h in hs.hosts]
    nodes = "".join(hs.node_yaml(f"n{i + 1}", h, ports[i]) for i, h in enumerate(hs.hosts[:3]))
    inv_path = hs.tmp / "inventory.yaml"
    # TLS on, as in the default inventory: `raftdeck init` makes the certificates, deploy
    # ships each host its node's files, every client below presents the admin certificate.
    inv_path.write_text("cluster:\n  name: deploytest\n  election_timeout_ms: 1000\n"
                        "  heartbeat_interval_ms: 100\n  tls: on\nnodes:\n" + nodes)
    r = raftdeck("init", "--inventory", str(inv_path))
    assert r.returncode == 0, r.stderr
    inv = load_inventory(inv_path)
    assert inv.cluster.tls is not None
    base = ["--inventory", str(inv_path), "--known-hosts", str(hs.known_hosts)]
    wheel_args = ["--wheel", str(project), "--wheelhouse", str(house)]
    env = {"RAFTDECK_KNOWN_HOSTS": str(hs.known_hosts)}
    inst = {n.name: hs.hosts[i].root / "raftdeck" for i, n in enumerate(inv.nodes)}
    assert len(inst) == 3
    timings = {}

    # -- deploy: host keys learnt, three agents installed and started, a leader --
    t = time.monotonic()
    r = raftdeck("deploy", *base, *wheel_args, "--accept-new-host-keys")
    timings["deploy"] = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    for n in inv.nodes:
        assert re.search(rf"(?m)^{n.name}  \S+  deployed, agent pid \d+ answers as \w+", r.stdout), r.stdout
    assert re.search(r"(?m)^deploy: 3 hosts: 3 deployed$", r.stdout)
    assert re.search(r"(?m)^leader: n\d \(term \d+\)$", r.stdout)
    assert len(hs.known_hosts.read_text().splitlines()) == 3
    for name, d in inst.items():
        cfg = d / "node.yaml"
        assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
        agent_cfg = load_node_config(cfg)  # what the agent reads is a valid node config
        assert agent_cfg.node.name == name and len(agent_cfg.peers) == 2
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["project"] == content_digest(project)
        assert (d / "venv" / "bin" / "python").exists()
        assert os.listdir(d / "releases") == [Path(manifest["release"]).name]
    pids = {n: pid_of(d, n) for n, d in inst.items()}
    leader = wait_leader(inv)
    assert kv(inv, "put", "before", b"1") > 0

    # -- a second deploy changes nothing, says so, and restarts nobody --
    t = time.monotonic()
    r = raftdeck("deploy", *base, *wheel_args)
    timings["deploy_again"] = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    assert re.search(r"(?m)^deploy: 3 hosts: 3 unchanged$", r.stdout), r.stdout
    for n in inv.nodes:
        assert re.search(rf"(?m)^{n.name}  \S+  unchanged \(agent pid {pids[n.name]} answers\)", r.stdout)
    assert {n: pid_of(d, n) for n, d in inst.items()} == pids

    add_and_remove_a_fourth_host(hs, inv_path, ports[3], base, wheel_args, env)

    # -- a renewed certificate: deploy ships it and the agent rereads it (SIGHUP), no restart --
    tls_dir = inv_path.parent / ".raftdeck" / "tls"
    for suffix in (".crt", ".key"):
        (tls_dir / "nodes" / f"n1{suffix}").unlink()
    r = raftdeck("init", "--inventory", str(inv_path))
    assert r.returncode == 0, r.stderr
    new_sha = hashlib.sha256(ssl.PEM_cert_to_DER_cert(
        (tls_dir / "nodes" / "n1.crt").read_text())).hexdigest()
    r = raftdeck("deploy", *base, *wheel_args)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"(?m)^n1  \S+  TLS files updated; agent pid {pids['n1']} reloaded them "
                     rf"without a restart \(certificate sha256 {new_sha[:16]}\)", r.stdout), r.stdout
    assert re.search(r"(?m)^deploy: 3 hosts: 1 reloaded, 2 unchanged$", r.stdout), r.stdout
    assert {n: pid_of(d, n) for n, d in inst.items()} == pids
    st = statuses(inv)["n1"]
    assert st["security"]["cert"]["sha256"] == new_sha and st["security"]["cert"]["reloads"] == 1
    assert kv(inv, "put", "after-rotation", b"1") > 0
    # A key that does not match the certificate: refused, and the agent runs on with the
    # certificate it has. Once the key is right again, the next deploy writes it again.
    n1_key = tls_dir / "nodes" / "n1.key"
    good_key = n1_key.read_bytes()
    n1_key.write_bytes((tls_dir / "nodes" / "n2.key").read_bytes())
    r = raftdeck("deploy", *base, *wheel_args)
    assert r.returncode != 0
    assert re.search(r"n1 .*the agent refused the new TLS files \(cannot load the TLS files",
                     r.stdout + r.stderr), r.stdout + r.stderr
    assert {n: pid_of(d, n) for n, d in inst.items()} == pids
    st = statuses(inv)["n1"]
    assert st["security"]["cert"]["sha256"] == new_sha and st["security"]["cert"]["reload_error"]
    n1_key.write_bytes(good_key)
    r = raftdeck("deploy", *base, *wheel_args)
    assert r.returncode == 0, r.stderr
    assert re.search(r"(?m)^deploy: 3 hosts: 1 reloaded, 2 unchanged$", r.stdout), r.stdout
    assert (inst["n1"] / "tls" / "node.key").read_bytes() == good_key
    assert statuses(inv)["n1"]["security"]["cert"]["reload_error"] is None
    # `raftdeck reload` over SSH: SIGHUP by the host's pid file, then the check
    r = raftdeck("reload", "n2", "--inventory", str(inv_path), env_extra=env)
    assert r.returncode == 0, r.stderr
    assert re.match(rf"n2 reloaded its TLS files \(pid {pids['n2']}\): .*\(the same certificate as "
                    r"before\)$", r.stdout.strip()), r.stdout

    # -- a new CA, in its three steps, each shipped by deploy: reloads only, no restart --
    for k, step in enumerate(("trust", "issue", "finish"), 1):
        r = raftdeck("init", "--rotate-ca", "--inventory", str(inv_path))
        assert r.returncode == 0, r.stderr
        assert f"step {k} of 3 ({step}) done" in r.stdout, r.stdout
        r = raftdeck("deploy", *base, *wheel_args)
        assert r.returncode == 0, r.stderr
        assert re.search(r"(?m)^deploy: 3 hosts: 3 reloaded$", r.stdout), r.stdout
        assert {n: pid_of(d, n) for n, d in inst.items()} == pids
        assert kv(inv, "put", f"ca-{step}", b"1") > 0
    new_ca = (tls_dir / "ca.crt").read_text()
    for name, st in statuses(inv).items():
        assert len(st["security"]["ca"]) == 1, (name, st["security"])
        assert (inst[name] / "tls" / "ca.crt").read_text() == new_ca
        assert st["security"]["cert"]["issuer"].startswith("O=raftdeck cluster deploytest, OU=ca, "
                                                           "CN=raftdeck deploytest CA 20"), st["security"]

    # -- kill the leader over SSH: it is gone, the others elect a leader and take writes --
    r = raftdeck("kill", leader, "--inventory", str(inv_path), env_extra=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{leader} killed on {inv.node(leader).host} (pid {pids[leader]})"
    assert proc_state(pids[leader]) in (None, "Z")
    assert not (inst[leader] / ".raftdeck" / f"{leader}.pid").exists()
    new_leader = wait_leader(inv, exclude={leader})
    assert new_leader != leader
    assert kv(inv, "put", "after-kill", b"2") > 0
    r = raftdeck("kill", leader, "--inventory", str(inv_path), env_extra=env)
    assert r.returncode == 1 and "is not running" in r.stderr

    # -- restart it over SSH; pause and resume a follower --
    r = raftdeck("restart", leader, "--inventory", str(inv_path), env_extra=env)
    assert r.returncode == 0, r.stderr
    assert f"{leader} restarted on " in r.stdout and "was not running" in r.stdout
    console_kill_and_restart(inv, hs.known_hosts)
    follower = next(n for n in inv.names if n not in (leader, new_leader))
    r = raftdeck("pause", follower, "--inventory", str(inv_path), env_extra=env)
    assert r.returncode == 0, r.stderr
    assert proc_state(pids[follower]) == "T"
    r = raftdeck("resume", follower, "--inventory", str(inv_path), env_extra=env)
    assert r.returncode == 0, r.stderr
    assert proc_state(pids[follower]) in ("S", "R")
    r = raftdeck("logs", follower, "-n", "5", "--inventory", str(inv_path), env_extra=env)
    assert r.returncode == 0, r.stderr
    assert any(ln.startswith("{") and json.loads(ln)["node"] == follower
               for ln in r.stdout.splitlines())

    # -- rolling upgrade to a changed wheel: leader last, each caught up, data kept --
    wait_leader(inv)
    t = time.monotonic()
    r = raftdeck("upgrade", *base, "--wheel", str(upgrade), "--wheelhouse", str(house))
    timings["upgrade"] = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    done = re.findall(r"(?m)^(n\d)  \S+  updated \(project\).*caught up \(applied (\d+) >= "
                      r"leader commit (\d+)\)", r.stdout)
    assert sorted(n for n, _, _ in done) == ["n1", "n2", "n3"], r.stdout
    assert all(int(a) >= int(c) for _, a, c in done)
    for name, d in inst.items():
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["project"] == content_digest(upgrade)
        release = manifest["release"]
        v = subprocess.run([str(d / "venv" / "bin" / "python"), "-c",
                            "import importlib.metadata as m; print(m.version('raftdeck'))"],
                           capture_output=True, text=True, cwd=d,
                           env={"PATH": os.environ["PATH"], "PYTHONPATH": release})
        assert v.stdout.strip() == "0.1.0+up2"
        pid = pid_of(d, name)
        assert pid != pids[name]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"PYTHONPATH={release}".encode() in environ  # the agent runs the new release
        assert len(os.listdir(d / "releases")) == 2  # and the previous one is kept
    wait_leader(inv)
    assert kv(inv, "get", "before") == b"1" and kv(inv, "get", "after-kill") == b"2"
    # the same upgrade again: nothing to do, nobody restarted, leadership not moved
    upids = {n: pid_of(d, n) for n, d in inst.items()}
    lead = wait_leader(inv)
    r = raftdeck("upgrade", *base, "--wheel", str(upgrade), "--wheelhouse", str(house))
    assert r.returncode == 0, r.stderr
    assert re.search(r"(?m)^upgrade: 3 hosts: 3 unchanged$", r.stdout), r.stdout
    assert {n: pid_of(d, n) for n, d in inst.items()} == upids
    assert wait_leader(inv) == lead

    # -- every data directory lost: restore from a backup over SSH, deploy starts them --
    t = time.monotonic()
    restore_from_a_backup(inv, inv_path, inst, base,
                          ["--wheel", str(upgrade), "--wheelhouse", str(house)], env)
    timings["restore"] = time.monotonic() - t
    upids = {n: pid_of(d, n) for n, d in inst.items()}

    # -- undeploy: agents stopped, installed files gone, data kept --
    r = raftdeck("undeploy", *base)
    assert r.returncode == 0, r.stderr
    assert re.search(r"(?m)^undeploy: 3 hosts: 3 removed$", r.stdout)
    for name, d in inst.items():
        assert proc_state(upids[name]) in (None, "Z")
        assert not (d / "venv").exists() and not (d / "node.yaml").exists()
        assert not (d / "releases").exists()
        assert not (d / "manifest.json").exists() and not (d / "wheels").exists()
        assert (d / ".raftdeck" / name).is_dir()  # the data stays
    timings["total"] = time.monotonic() - t_start
    print(f"ssh deploy flow ({ssh_mode_name} mode): " + json.dumps(
        {k: round(v, 1) for k, v in timings.items()}), file=sys.stderr)


def add_and_remove_a_fourth_host(hs, inv_path: Path, port: int, base, wheel_args, env) -> None:
    """A host with ssh: added to the inventory of the running cluster: deploy refuses it
    (it would bootstrap the inventory's membership), `raftdeck add-node` deploys it with
    --join and makes it a voter with the others' state and membership; a restart over SSH
    (no --join on its command line now) keeps that; `raftdeck remove-node` stops its agent
    over SSH. The inventory is as before at the end."""
    three = inv_path.read_text()
    h4 = hs.hosts[3]
    inv_path.write_text(three + hs.node_yaml("n4", h4, port))
    r = raftdeck("deploy", *base, *wheel_args)
    assert r.returncode == 1, r.stdout
    assert "n4: not a member of the running cluster" in r.stderr, r.stderr
    assert "`raftdeck add-node n4`" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (h4.root / "raftdeck").exists()  # refused before touching any host

    # A learner first: a node that wrote its own membership would take itself for a voter
    # and its digest would differ (a promotion would hide that).
    r = raftdeck("add-node", "n4", "--learner", *base, *wheel_args, "--accept-new-host-keys",
                 "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["role"] == "learner" and out["learners"] == ["n4"], out
    assert out["done"][0] == "added as a learner" and len(out["done"]) == 2, out
    assert re.fullmatch(r"deployed on \S+ \(--join\)", out["done"][1]), out
    inst4 = h4.root / "raftdeck"
    info = json.loads((inst4 / ".raftdeck" / "n4.pid").read_text())
    assert "--join" in info["argv"], info
    inv4 = load_inventory(inv_path)

    def agree():
        st = statuses(inv4)
        if not all(st.values()):
            return None
        seen = {(s["applied"], s["digest"], tuple(s["voters"]), tuple(s["learners"]))
                for s in st.values()}
        return st if len(seen) == 1 else None

    def wait(cond, what):
        return wait_for(cond, 40.0, what)

    st = wait(agree, "four replicas agreeing, n4 a learner")
    assert st["n4"]["voters"] == ["n1", "n2", "n3"] and st["n4"]["learners"] == ["n4"]
    r = raftdeck("add-node", "n4", *base, *wheel_args, "--json")  # again: only the promotion
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["role"] == "voter" and out["done"] == ["made a voter"], out
    assert kv(inv4, "put", "with-n4", b"4") > 0
    r = raftdeck("restart", "n4", "--inventory", str(inv_path), env_extra=env)
    assert r.returncode == 0, r.stderr
    pid4 = pid_of(inst4, "n4")
    assert "--join" not in json.loads((inst4 / ".raftdeck" / "n4.pid").read_text())["argv"]
    st = wait(agree, "four replicas agreeing after n4's restart")
    assert st["n4"]["voters"] == ["n1", "n2", "n3", "n4"] and st["n4"]["keys"] == st["n1"]["keys"]

    r = raftdeck("remove-node", "n4", *base, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stopped"] is True
    assert proc_state(pid4) in (None, "Z")
    inv_path.write_text(three)
    wait(lambda: (lambda st: st if all(st.values()) and all(
        s["voters"] == ["n1", "n2", "n3"] for s in st.values()) else None)(
        statuses(load_inventory(inv_path))), "three voters again")


def restore_from_a_backup(inv, inv_path: Path, inst: dict[str, Path], base, wheel_args,
                          env) -> None:
    """`raftdeck backup`, then all three agents killed and their data directories lost: a
    restore is refused while an agent runs or a directory holds anything, then writes each
    host's directory over SSH; `raftdeck deploy` starts the agents on it, and the cluster
    serves what the backup held and takes new writes."""
    wait_leader(inv)
    assert kv(inv, "put", "in-backup", b"b") > 0
    file = inv_path.parent / "cluster.backup"
    r = raftdeck("backup", str(file), "--inventory", str(inv_path))
    assert r.returncode == 0, r.stderr
    r = raftdeck("restore", str(file), *base)
    assert r.returncode == 1 and "agent is running on" in r.stderr, r.stderr
    assert len(re.findall(r"`raftdeck kill n\d` first", r.stderr)) == 3, r.stderr
    for name in inst:
        r = raftdeck("kill", name, "--inventory", str(inv_path), env_extra=env)
        assert r.returncode == 0, r.stderr
    r = raftdeck("restore", str(file), *base)
    assert r.returncode == 1, r.stderr
    assert re.search(r"n1's data directory \S+:\S+/n1 is not empty: move it aside on the host",
                     r.stderr), r.stderr
    lost = {}
    for name, d in inst.items():  # the disks are lost: what was there is moved away
        lost[name] = d / ".raftdeck" / f"{name}.lost"
        (d / ".raftdeck" / name).rename(lost[name])
    r = raftdeck("restore", str(file), *base, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["nodes"] == ["n1", "n2", "n3"] and out["failed"] == {}, out
    ids = set()
    for name, d in inst.items():
        data = d / ".raftdeck" / name
        assert not (d / ".raftdeck" / f"{name}.restoring").exists()
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        ids.add((data / "data_id").read_text())
        assert (data / "data_id").read_text() != (lost[name] / "data_id").read_text()
    assert len(ids) == 3  # a new cluster: each directory its own id
    r = raftdeck("deploy", *base, *wheel_args)  # the installed wheel: only starts them
    assert r.returncode == 0, r.stderr
    assert re.search(r"(?m)^deploy: 3 hosts: 3 started$", r.stdout), r.stdout
    assert re.search(r"(?m)^leader: n\d \(term \d+\)$", r.stdout), r.stdout
    wait_leader(inv)
    assert kv(inv, "get", "in-backup") == b"b" and kv(inv, "get", "before") == b"1"
    assert kv(inv, "put", "after-restore", b"r") > 0
    assert kv(inv, "get", "after-restore") == b"r"


def broken_wheel(src: Path, out_dir: Path) -> Path:
    """A wheel whose agent cannot start (a syntax error in nodeagent/cli.py)."""
    out_dir.mkdir()
    dest = out_dir / src.name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == "nodeagent/cli.py":
                data += b"\ndef broken(:\n"
            zout.writestr(name, data)
    return dest


@pytest.mark.slow
def test_a_failing_upgrade_stops_at_the_first_node_and_the_cluster_keeps_going(
        ssh_hosts, wheels, tmp_path):
    """Rolling means one at a time: an upgrade to a wheel that does not import fails on the
    first follower before its agent is stopped, touches no other node, and the cluster
    keeps its leader and takes writes; a good upgrade then goes through."""
    project, house, upgrade = wheels
    hs = ssh_hosts(4)  # the fourth joins the running cluster later (add-node)
    from tests.ssh.conftest import free_port_on

    ports = [7101 if hs.mode == "netns" else free_port_on(h.addr) for h in hs.hosts]
    nodes = "".join(hs.node_yaml(f"n{i + 1}", h, ports[i]) for i, h in enumerate(hs.hosts[:3]))
    inv_path = hs.tmp / "inventory.yaml"
    inv_path.write_text("cluster:\n  name: rolltest\nnodes:\n" + nodes)
    inv = load_inventory(inv_path)
    base = ["--inventory", str(inv_path), "--known-hosts", str(hs.known_hosts)]
    inst = {n.name: hs.hosts[i].root / "raftdeck" for i, n in enumerate(inv.nodes)}
    assert len(inst) == 3
    r = raftdeck("deploy", *base, "--wheel", str(project), "--wheelhouse", str(house),
                 "--accept-new-host-keys")
    assert r.returncode == 0, r.stderr
    leader = wait_leader(inv)
    pids = {n: pid_of(d, n) for n, d in inst.items()}
    bad = broken_wheel(project, tmp_path / "bad")
    r = raftdeck("upgrade", *base, "--wheel", str(bad), "--wheelhouse", str(house))
    assert r.returncode == 1
    first = sorted(n for n in inv.names if n != leader)[0]
    lines = {m.group(1): m.group(0) for m in re.finditer(r"(?m)^FAILED (n\d) .*$", r.stdout)}
    assert set(lines) == set(inv.names), r.stdout
    assert lines[first] == (
        f"FAILED {first} ({hs.user}@{inv.node(first).host}:"
        f"{hs.hosts[inv.names.index(first)].ssh_port}): install "
        "failed: the new version does not import on the host (SyntaxError: invalid syntax); a "
        "running agent was not restarted and still runs the previous version; fix the wheel "
        "and run again")
    for n in inv.names:
        if n != first:
            assert lines[n].endswith("not upgraded: an earlier node failed; fix it and run again")
    assert {n: pid_of(d, n) for n, d in inst.items()} == pids  # nobody was restarted
    assert r.stderr.strip() == "raftdeck: upgrade failed on 3 of 3 hosts: " + ", ".join(
        sorted(inv.names, key=lambda n: (n == leader, n)))
    wait_leader(inv)
    assert kv(inv, "put", "during", b"x") > 0
    r = raftdeck("upgrade", *base, "--wheel", str(upgrade), "--wheelhouse", str(house))
    assert r.returncode == 0, r.stderr
    assert re.search(r"(?m)^upgrade: 3 hosts: 3 upgraded$", r.stdout), r.stdout
    wait_leader(inv)
    assert kv(inv, "get", "during") == b"x"
