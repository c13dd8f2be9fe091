"""`raftdeck` commands against real agents on 127.0.0.1: up/down with pid files, status,
KV, tasks, kill/restart/pause/resume, partitions, transfer, and one-line errors.

One three-node cluster (module fixture) serves most tests; every test leaves it healthy.
Some commands run as subprocesses (`python -m console.cli`), the rest in-process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from console.cli import main
from console.local import free_ports

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


# -- helpers --------------------------------------------------------------------------------


def write_inventory(folder: Path, n: int = 3, *, extra_nodes: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ports = free_ports(n)
    lines = ["cluster:", "  name: clitest", "  election_timeout_ms: 500",
             "  heartbeat_interval_ms: 50", "  fsync: false", "nodes:"]
    for i, p in enumerate(ports):
        lines.append(f"  - {{name: n{i + 1}, host: 127.0.0.1, port: {p}, capacity: 2, "
                     f"data_dir: data/n{i + 1}}}")
    path = folder / "inventory.yaml"
    path.write_text("\n".join(lines) + "\n" + extra_nodes)
    return path


def run(inv: Path | None, *args: str) -> tuple[int, str, str]:
    """main() in-process, with its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    argv = (["--inventory", str(inv)] if inv else []) + list(args)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def run_json(inv: Path, *args: str):
    rc, out, err = run(inv, *args, "--json")
    try:
        return rc, json.loads(out), err
    except ValueError:
        raise AssertionError(f"{args}: exit {rc}, no JSON on stdout; stderr: {err}") from None


def sub(inv: Path | None, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "console.cli"] + (["--inventory", str(inv)] if inv else []) + list(args)
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def wait_for(cond, timeout: float = 20.0, what: str = "condition"):
    """Poll ``cond()`` until it returns a truthy value; that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")


def status(inv: Path) -> dict:
    _, data, _ = run_json(inv, "status")
    return data


def healthy(inv: Path, among=None) -> dict | None:
    """The status when a leader with quorum is followed by every reachable agent of
    ``among`` (default all) and all of them answer."""
    st = status(inv)
    nodes = {r["name"]: r for r in st["nodes"]}
    names = among or list(nodes)
    h = st["health"]
    if not h["quorum"]:
        return None
    if not all(nodes[n]["reachable"] and nodes[n]["leader"] == h["leader"] for n in names):
        return None
    return st


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def kill_leftovers(folder: Path, pids: set[int]) -> None:
    """Last resort after `down`: SIGKILL every agent a pid file or `up` named."""
    for pf in folder.rglob("*.pid"):
        with contextlib.suppress(Exception):
            pids.add(json.loads(pf.read_text())["pid"])
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"nodeagent" in f.read():
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raftdeck-cli")
    inv = write_inventory(folder)
    pids: set[int] = set()
    try:
        p = sub(inv, "up", "--json")
        assert p.returncode == 0, p.stderr
        up = json.loads(p.stdout)
        pids |= {r["pid"] for r in up["nodes"] if r["pid"]}
        yield inv, up
    finally:
        with contextlib.suppress(Exception):
            run(inv, "down", "--grace-s", "5")
        kill_leftovers(folder, pids)


@pytest.fixture
def inv(cluster):
    """The shared cluster, healthy at the start of the test."""
    path, _ = cluster
    wait_for(lambda: healthy(path), 30, "a healthy cluster")
    return path


# -- up / status ----------------------------------------------------------------------------


def test_up_starts_three_agents_and_a_second_up_is_a_no_op(cluster):
    inv, up = cluster
    assert [r["action"] for r in up["nodes"]] == ["started"] * 3
    assert up["started"] == 3 and up["leader"] in ("n1", "n2", "n3") and up["quorum"]
    for r in up["nodes"]:
        pf = inv.parent / "data" / f"{r['name']}.pid"
        info = json.loads(pf.read_text())
        assert info["pid"] == r["pid"] and info["node"] == r["name"] and info["start_ticks"]
        assert Path(r["log"]) == inv.parent / "data" / f"{r['name']}.log"

    p = sub(inv, "up")
    assert p.returncode == 0, p.stderr
    assert "nothing to start" in p.stdout and "leader: n" in p.stdout
    again = {r["name"]: r["pid"] for r in run_json(inv, "up")[1]["nodes"]}
    assert again == {r["name"]: r["pid"] for r in up["nodes"]}


def test_status_json_shows_one_leader(inv):
    p = sub(inv, "status", "--json")
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    leaders = [r["name"] for r in st["nodes"] if r["role"] == "leader"]
    assert len(leaders) == 1 and st["health"]["leader"] == leaders[0]
    assert st["health"]["quorum"] and st["health"]["reachable"] == 3
    for r in st["nodes"]:
        assert r["reachable"] and r["process"] == "running" and r["error"] is None
        assert r["load"]["capacity"] == 2 and r["faults"] == 0 and len(r["digest"]) >= 8
    text = sub(inv, "status").stdout
    assert text.splitlines()[0].startswith("NODE") and "health: leader" in text


# -- KV and tasks ---------------------------------------------------------------------------


def test_put_get_round_trip(inv):
    rc, out, err = run(inv, "put", "greeting", "hello world")
    assert rc == 0, err
    assert run(inv, "get", "greeting") == (0, "hello world\n", "")
    wait_for(lambda: run(inv, "get", "greeting", "--stale", "--node", "n3")[1] == "hello world\n",
             what="n3 to apply the put")
    rc, data, _ = run_json(inv, "get", "no-such-key")
    assert rc == 1 and data == {"key": "no-such-key", "found": False, "value": None}


def test_delete_cas_and_keys(inv):
    for k, v in (("ls/a", "1"), ("ls/b", "2"), ("other", "3")):
        assert run(inv, "put", k, v)[0] == 0
    assert run(inv, "keys", "--prefix", "ls/") == (0, "ls/a\nls/b\n", "")
    assert run(inv, "keys", "--prefix", "ls/", "--values") == (0, "ls/a = 1\nls/b = 2\n", "")
    # Pages: the agent filters and pages, so a prefix late in key order is reached however
    # many keys come before it.
    rc, out, err = run(inv, "keys", "--prefix", "ls/", "--limit", "1")
    assert (rc, out, err) == (0, "ls/a\n", "raftdeck: the listing stopped early (--limit 1, or "
                                          "about 3 MiB); the next page: --after ls/a\n")
    assert run(inv, "keys", "--prefix", "ls/", "--after", "ls/a") == (0, "ls/b\n", "")
    assert run(inv, "keys", "--prefix", "ls/", "--after", "ls/b") == (0, "", "")
    assert run(inv, "keys", "--prefix", "other", "--limit", "1")[1:] == ("other\n", "")
    rc, data, _ = run_json(inv, "keys", "--prefix", "ls/")
    assert rc == 0 and data["keys"] == ["ls/a", "ls/b"] and data["applied"] > 0, data
    wait_for(lambda: run(inv, "keys", "--node", "n3", "--prefix", "ls/")[1] == "ls/a\nls/b\n",
             what="n3 to apply the puts")

    assert run(inv, "cas", "ls/a", "10", "--expect", "1") == (0, "ls/a: swapped\n", "")
    assert run(inv, "get", "ls/a")[1] == "10\n"
    rc, out, err = run(inv, "cas", "ls/a", "11", "--expect", "1")
    assert (rc, out, err) == (1, "", "raftdeck: ls/a: not swapped; it holds '10'\n")
    rc, data, _ = run_json(inv, "cas", "ls/a", "11", "--expect", "1")
    assert rc == 1 and data == {"key": "ls/a", "swapped": False, "value": "10"}
    assert run(inv, "get", "ls/a")[1] == "10\n"

    rc, out, err = run(inv, "delete", "ls/b")
    assert rc == 0 and out.startswith("ls/b: deleted at index "), (out, err)
    assert run(inv, "get", "ls/b")[0] == 1
    assert run(inv, "delete", "ls/b")[0] == 0  # absent: not an error
    assert run(inv, "cas", "ls/b", "new", "--absent") == (0, "ls/b: swapped\n", "")
    assert run(inv, "cas", "ls/b", "newer", "--absent")[2] == "raftdeck: ls/b: not swapped; it holds 'new'\n"
    assert run(inv, "keys", "--prefix", "ls/", "--values")[1] == "ls/a = 10\nls/b = new\n"

    rc, _, err = run(inv, "cas", "ls/a", "v")  # neither --expect nor --absent
    assert rc == 2 and "--expect" in err
    rc, _, err = run(inv, "keys", "--limit", "0")
    assert rc == 2 and err == "raftdeck: --limit must be between 1 and 1000000\n"


def test_submit_count_wait_then_list_show_and_cancel(inv):
    rc, data, err = run_json(inv, "submit", "--kind", "echo", "--arg", "data=hi", "--count", "5",
                             "--id-prefix", "cli-", "--wait")
    assert rc == 0, err
    assert len(data["ids"]) == 5 and len(set(data["ids"])) == 5
    assert all(i.startswith("cli-") for i in data["ids"])
    assert [t["state"] for t in data["tasks"]] == ["succeeded"] * 5
    assert all(t["stdout"] == "hi" for t in data["tasks"])

    rc, listed, _ = run_json(inv, "tasks", "--state", "succeeded", "--limit", "1000")
    assert rc == 0 and set(data["ids"]) <= {t["id"] for t in listed}
    rc, one, _ = run_json(inv, "task", data["ids"][0])
    assert rc == 0 and one["id"] == data["ids"][0] and one["state"] == "succeeded"

    rc, data, err = run_json(inv, "submit", "--kind", "sleep", "--arg", "ms=60000")
    assert rc == 0, err
    (tid,) = data["ids"]
    rc, out, err = run(inv, "cancel", tid)
    assert rc == 0 and out == f"{tid}: cancelled\n", err
    rc, out, err = run(inv, "task", "no-such-task")
    assert rc == 1 and out == "" and err.count("\n") == 1 and "no-such-task" in err


# -- process control ------------------------------------------------------------------------


def test_kill_the_leader_then_restart_it(inv):
    leader = healthy(inv)["health"]["leader"]
    rc, out, err = run(inv, "kill", leader)
    assert rc == 0 and f"{leader} killed" in out, err
    assert not (inv.parent / "data" / f"{leader}.pid").exists()

    def new_leader():
        st = status(inv)
        me = next(r for r in st["nodes"] if r["name"] == leader)
        h = st["health"]
        return st if (not me["reachable"] and me["process"] == "stopped" and h["quorum"]
                      and h["leader"] not in (None, leader)) else None

    st = wait_for(new_leader, 20, "a new leader")
    assert st["health"]["reachable"] == 2

    rc, out, err = run(inv, "restart", leader)
    assert rc == 0 and f"{leader} restarted" in out, err
    wait_for(lambda: healthy(inv), 30, "the old leader to rejoin")


def test_restart_a_running_node_replaces_its_process(inv):
    old = json.loads((inv.parent / "data" / "n2.pid").read_text())["pid"]
    rc, data, err = run_json(inv, "restart", "n2")
    assert rc == 0, err
    assert data["old_pid"] == old and data["pid"] != old and not pid_alive(old)
    wait_for(lambda: healthy(inv), 30, "n2 to rejoin")


def test_status_says_why_an_agent_stopped_by_itself(inv):
    """An agent that exits on its own (here: it cannot use its data directory) is shown
    with the last line it wrote, not only as unreachable."""
    follower = next(r["name"] for r in status(inv)["nodes"] if r["role"] == "follower")
    wal = inv.parent / "data" / follower / "wal"
    rc, _, err = run(inv, "kill", follower)
    assert rc == 0, err
    wal.rename(wal.with_name("wal.aside"))
    wal.write_text("not a directory")
    try:
        run(inv, "restart", follower)  # starts it; it exits at once with code 3

        def said():
            me = next(r for r in status(inv)["nodes"] if r["name"] == follower)
            return me if me.get("last_words") else None

        me = wait_for(said, 30, "the agent's last words in status")
        assert not me["reachable"] and me["process"] in ("stale", "stopped")
        assert f"node {follower}" in me["last_words"] and "data directory" in me["last_words"]
        text = run(inv, "status")[1]
        line = next(ln for ln in text.splitlines() if ln.startswith(follower + " "))
        assert "UNREACHABLE" in line and "it said: nodeagent run:" in line, text
    finally:
        wal.unlink()
        wal.with_name("wal.aside").rename(wal)
        run(inv, "restart", follower)
    wait_for(lambda: healthy(inv), 30, "the node to rejoin")
    me = next(r for r in status(inv)["nodes"] if r["name"] == follower)
    assert "last_words" not in me or not me["last_words"]  # running again: nothing to say


def test_pause_and_resume(inv):
    follower = next(r["name"] for r in status(inv)["nodes"] if r["role"] == "follower")
    rc, _, err = run(inv, "pause", follower)
    assert rc == 0, err
    try:
        st = status(inv)  # answers in bounded time although one agent never will
        me = next(r for r in st["nodes"] if r["name"] == follower)
        assert not me["reachable"] and me["process"] == "paused"
        assert "process paused" in run(inv, "status")[1]
    finally:
        rc, out, err = run(inv, "resume", follower)
    assert rc == 0 and "resumed" in out, err
    wait_for(lambda: healthy(inv), 30, "the resumed node to answer")


# -- faults ---------------------------------------------------------------------------------


def test_partition_isolate_then_heal(inv):
    leader = healthy(inv)["health"]["leader"]
    rc, data, err = run_json(inv, "partition", "isolate", leader)
    try:
        assert rc == 0, err
        assert {(tuple(r["from"] or ()), tuple(r["to"] or ())) for r in data["rules"]} == \
            {((leader,), ()), ((), (leader,))}
        assert all(n["ok"] for n in data["nodes"])

        def others_elect():
            st = status(inv)
            h = st["health"]
            ok = h["quorum"] and h["leader"] != leader and \
                all(r["faults"] == 2 for r in st["nodes"])
            return st if ok else None

        wait_for(others_elect, 20, "a leader on the majority side")
    finally:
        rc, out, err = run(inv, "heal")
    assert rc == 0 and out.count("healed") == 3, err
    st = wait_for(lambda: healthy(inv), 30, "the healed cluster")
    assert all(r["faults"] == 0 for r in st["nodes"])


def test_split_and_one_way_partition_are_injected_everywhere(inv):
    try:
        rc, out, err = run(inv, "partition", "split", "n1", "n2,n3", "--duration-ms", "60000")
        assert rc == 0, err
        assert "partition n1 -> n2,n3 for 60000 ms" in out and "n2,n3 -> n1" in out
        rc, data, err = run_json(inv, "partition", "from", "n2", "to", "n3")
        assert rc == 0 and data["rules"] == [{"from": ["n2"], "to": ["n3"], "action": "partition"}]
        assert all(r["faults"] == 3 for r in status(inv)["nodes"])
    finally:
        assert run(inv, "heal")[0] == 0


def test_transfer_leadership(inv):
    target = next(r["name"] for r in status(inv)["nodes"] if r["role"] == "follower")
    rc, data, err = run_json(inv, "transfer", target)
    assert rc == 0 and data["leader"] == target, err


# -- down, pid files ------------------------------------------------------------------------


def test_down_stops_everything(tmp_path):
    inv = write_inventory(tmp_path)
    pids: set[int] = set()
    try:
        rc, up, err = run_json(inv, "up")
        assert rc == 0, err
        pids = {r["pid"] for r in up["nodes"]}
        assert all(pid_alive(p) for p in pids)
        assert run(inv, "pause", "n1")[0] == 0  # down must stop a paused agent too
        rc, out, err = run(inv, "down")
        assert rc == 0 and out.count("stopped") == 3, err
        assert not any(pid_alive(p) for p in pids)
        assert not list((tmp_path / "data").glob("*.pid"))
        rc, out, _ = run(inv, "down")
        assert rc == 0 and "nothing was running" in out
        rc, st, _ = run_json(inv, "status")
        assert rc == 1 and not any(r["reachable"] for r in st["nodes"])
        assert {r["process"] for r in st["nodes"]} == {"stopped"}
        rc, out, err = run(inv, "put", "k", "v")
        assert rc == 1 and "no agent of cluster 'clitest' is reachable" in err
    finally:
        kill_leftovers(tmp_path, pids)


def test_up_reports_an_agent_that_dies_at_start(tmp_path):
    inv = write_inventory(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "n3").write_text("not a directory\n")
    pids: set[int] = set()
    try:
        rc, up, err = run_json(inv, "up")
        pids = {r["pid"] for r in up["nodes"] if r["pid"]}
        assert rc == 1 and err.count("\n") == 1 and "n3 failed to start" in err, err
        rows = {r["name"]: r for r in up["nodes"]}
        assert rows["n3"]["action"] == "failed" and "File exists" in rows["n3"]["error"]
        assert up["leader"] in ("n1", "n2") and up["quorum"]
        assert not (tmp_path / "data" / "n3.pid").exists()
    finally:
        run(inv, "down")
        kill_leftovers(tmp_path, pids)


def test_stale_pid_files_are_detected_and_left_processes_untouched(tmp_path):
    inv = write_inventory(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        # a live process that is not an agent, and a pid of a process that is gone
        (data / "n1.pid").write_text(json.dumps({"pid": other.pid, "start_ticks": None}) + "\n")
        gone = subprocess.Popen(["true"])
        gone.wait()
        (data / "n2.pid").write_text(f"{gone.pid}\n")
        rc, st, _ = run_json(inv, "status")
        assert [r["process"] for r in st["nodes"]] == ["stale", "stale", "stopped"]
        rc, out, err = run(inv, "kill", "n1")
        assert rc == 1 and "n1 is not running" in err and "stale" in err
        assert other.poll() is None
        rc, res, _ = run_json(inv, "down")
        assert rc == 0 and [r["result"] for r in res["nodes"]] == ["not_running", "stale",
                                                                     "not_running"]
        assert other.poll() is None and not list(data.glob("*.pid"))
    finally:
        other.kill()
        other.wait()


# -- errors ---------------------------------------------------------------------------------


def test_bad_inventory_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "inventory.yaml"
    bad.write_text("cluster:\n  name: x\nnodes:\n  - {name: n1, host: 127.0.0.1, port: nope}\n")
    p = sub(bad, "status")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "nodes[0].port" in p.stderr and "Traceback" not in p.stderr
    p = sub(tmp_path / "missing.yaml", "up")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "missing.yaml" in p.stderr


def test_unknown_node_and_bad_usage_are_clear_errors(tmp_path):
    inv = write_inventory(tmp_path)
    for args in (["kill", "n9"], ["restart", "n9"], ["partition", "isolate", "n9"],
                 ["partition", "split", "n1", "n2,n9"], ["transfer", "n9"]):
        rc, out, err = run(inv, *args)
        assert rc == 2 and out == "", args
        assert err.count("\n") == 1 and "no node named 'n9'" in err, (args, err)
    rc, _, err = run(inv, "submit", "--kind", "nope")
    assert rc == 2 and err.count("\n") == 1 and "invalid choice" in err
    rc, _, err = run(inv, "submit", "--kind", "sleep", "--arg", "ms=abc")
    assert rc == 2 and "not an integer" in err
    rc, _, err = run(inv, "submit", "--kind", "shell")
    assert rc == 2 and "task.args.cmd: missing" in err
    rc, _, err = run(inv, "resume", "n1")
    assert rc == 1 and "n1 is not running" in err


def test_remote_node_is_controlled_over_ssh(tmp_path):
    # r1 lives on another host; its sshd is asked for on 127.0.0.1 at a closed port, so the
    # SSH path is taken and fails in one line without leaving this machine
    from console.local import free_ports

    port = free_ports(1)[0]
    inv = write_inventory(tmp_path, extra_nodes=(
        f"  - {{name: r1, host: 10.255.0.9, port: 7100, ssh: {{host: 127.0.0.1, port: {port}, "
        "user: deploy}}\n"))
    for verb in ("kill", "pause", "resume", "restart"):
        rc, out, err = run(inv, verb, "r1")
        assert rc == 1 and out == ""
        assert err == (f"raftdeck: r1 (deploy@127.0.0.1:{port}): cannot connect: connection "
                       "refused; check ssh.port and that sshd runs on the host\n")


def test_every_command_has_help():
    rc, out, _ = run(None, "--help")
    assert rc == 0
    cmds = ["up", "down", "status", "submit", "tasks", "task", "cancel", "kill", "pause",
            "resume", "restart", "partition", "heal", "transfer", "put", "get", "delete",
            "cas", "keys"]
    for c in cmds:
        assert c in out
        rc, text, _ = run(None, c, "--help")
        assert rc == 0 and "--json" in text and "--inventory" in text, c
    for shape in ("isolate", "split", "from"):
        rc, text, _ = run(None, "partition", shape, "--help")
        assert rc == 0 and "--duration-ms" in text
    assert "--no-console" in run(None, "up", "--help")[1]
    rc, _, err = run(None, "status", "--bogus")
    assert rc == 2 and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["bench", "--help"], ["bench", "--", "--help"]])
def test_bench_passes_every_argument_on(argv, capsys):
    """`raftdeck bench ARGS` is `python -m bench ARGS`, options first included (argparse's
    REMAINDER alone refused `raftdeck bench --quick`)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m bench")


def test_bench_reports_a_bad_argument_as_the_benchmark_does(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--no-such-flag"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_status_names_the_first_certificate_to_expire_and_warns_before_it_does():
    from console.cli import cert_lines

    now = 1_800_000_000
    day = 86400

    def cert(days, error=None):
        return {"sha256": "ab" * 32, "not_after_unix": now + days * day + 60,
                "not_after": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now + days * day + 60)),
                "reloads": 0, "reload_error": error}

    nodes = [{"name": "n1", "cert": cert(400)}, {"name": "n2", "cert": cert(200)},
             {"name": "n3", "cert": None}]
    [line] = cert_lines(nodes, now)
    assert line.startswith("certificates: the first to expire is n2's, on ") and "(in 200 days)" in line
    assert "WARNING" not in line
    nodes[0]["cert"] = cert(12, error="cannot load the TLS files (/x/node.crt, ...): bad")
    first, refused = cert_lines(nodes, now)
    assert "n1's" in first and "(in 12 days)" in first and "WARNING: renew it" in first
    assert refused.startswith("n1: the last TLS reload was refused") and "/x/node.crt" in refused
    assert cert_lines([{"name": "n1", "cert": None}], now) == []  # TLS off: nothing to say


def test_status_says_a_ca_replacement_is_under_way_until_every_agent_trusts_one_ca():
    from console.cli import cert_lines

    def nodes(*counts):
        return [{"name": f"n{i + 1}", "cert": None, "ca": ["ab" * 32] * k} for i, k in enumerate(counts)]

    assert cert_lines(nodes(1, 1, 1), 0) == []
    [line] = cert_lines(nodes(2, 1, 1), 0)  # one agent reloaded the first step
    assert line.startswith("CA: a replacement is under way (CAs trusted: n1 2, n2 1, n3 1)")
    assert "raftdeck init --rotate-ca" in line
    assert cert_lines(nodes(2, 2, 2), 0)  # between steps
    assert cert_lines(nodes(0, 0, 0), 0) == []  # TLS off, or agents without the field
