"""`raftdeck chaos` on the command line: bad usage is one line and exit 2; a tiny real run
prints the history path and exits 0."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from console.cli import main


def test_bad_nemesis_is_one_line_and_exit_2(capsys):
    assert main(["chaos", "--nemesis", "kill,flood"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown nemesis 'flood'" in err and "kill, pause, partition, latency" in err


@pytest.mark.integration
def test_a_short_run_prints_where_the_history_is_and_passes(tmp_path, capsys):
    rc = main(["chaos", "--nodes", "3", "--duration", "2", "--nemesis", "none", "--seed", "3",
               "--clients", "2", "--out", str(tmp_path / "o"), "--json"])
    out = capsys.readouterr().out
    report = json.loads(out)
    assert rc == 0, report["checks"]
    assert report["history"] == str(tmp_path / "o" / "history.jsonl")
    lines = (tmp_path / "o" / "history.jsonl").read_text().splitlines()
    assert len(lines) == report["ops"]["total"] > 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["verdict"] == "pass"


def test_no_tls_with_attach_is_a_usage_error(tmp_path, capsys):
    inv = tmp_path / "inventory.yaml"
    inv.write_text("cluster: {name: c}\nnodes:\n  - {name: n1, host: 127.0.0.1, port: 7001}\n")
    assert main(["chaos", "--attach", "--no-tls", "--inventory", str(inv)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--no-tls" in err and "--attach" in err


@pytest.mark.integration
def test_a_short_run_over_plain_tcp_passes(tmp_path, capsys, monkeypatch):
    """--no-tls: the agents talk plain TCP, where they write frames without a writer task.
    --out is relative (the agents run in another folder: it once left them no inventory)."""
    monkeypatch.chdir(tmp_path)
    rc = main(["chaos", "--nodes", "3", "--duration", "2", "--nemesis", "pause", "--seed", "4",
               "--clients", "2", "--no-tls", "--out", "o", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report["checks"]
    assert report["tls"] is False and report["ops"]["total"] > 0
    assert "tls: off" in (tmp_path / "o" / "cluster" / "inventory.yaml").read_text()


def test_the_ca_nemesis_needs_a_started_tls_cluster(tmp_path, capsys):
    assert main(["chaos", "--nemesis", "kill,ca", "--no-tls"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the ca nemesis" in err and "--no-tls" in err


@pytest.mark.integration
def test_a_short_run_with_the_ca_nemesis_replaces_the_ca_and_passes(tmp_path, capsys):
    """The opt-in `ca` kind between kills: each round takes the next step of replacing the
    CA (SIGHUP to every agent), and the history still checks."""
    rc = main(["chaos", "--nodes", "3", "--duration", "12", "--nemesis", "ca,kill", "--seed", "6",
               "--clients", "3", "--out", str(tmp_path / "o"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report["checks"]
    # How many rounds fit in 12 s depends on the machine; the first step always runs (the
    # whole cycle runs in the CA scenario of test_scenarios.py and in long runs).
    steps = [f["step"] for f in report["faults"] if f["kind"] == "ca" and f["event"] == "start"]
    assert steps and steps == [("trust", "issue", "finish")[i % 3] for i in range(len(steps))], \
        report["faults"]


def test_the_disk_nemesis_needs_a_started_cluster(tmp_path, capsys):
    inv = tmp_path / "inventory.yaml"
    inv.write_text("cluster: {name: c}\nnodes:\n  - {name: n1, host: 127.0.0.1, port: 7001}\n")
    assert main(["chaos", "--nemesis", "disk", "--attach", "--inventory", str(inv)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the disk nemesis" in err and "--attach" in err


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="the disk nemesis mounts tmpfs: root only")
def test_a_short_run_with_the_disk_nemesis_stops_agents_cleanly_and_passes(tmp_path, capsys):
    """The opt-in `disk` kind: a node's tmpfs is filled until its agent stops itself (exit
    3, the disk named), then freed and the agent started; the history still checks, and
    every mount is gone afterwards."""
    out = tmp_path / "o"
    rc = main(["chaos", "--nodes", "3", "--duration", "8", "--nemesis", "disk", "--seed", "7",
               "--clients", "3", "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, (report["checks"], report["disk_stops"])
    stops = report["disk_stops"]
    assert stops and all(d["exit_code"] == 3 and d["clean"] for d in stops), stops
    assert report["checks"]["disk_stops"] is True
    mounts = subprocess.run(["mount"], capture_output=True, text=True).stdout
    assert str(out) not in mounts


@pytest.mark.integration
def test_a_short_run_with_the_member_nemesis_takes_nodes_out_and_back(tmp_path, capsys):
    """The opt-in `member` kind between leader kills: a follower is removed and stopped,
    then added back (a learner started with its log, then a voter); the history checks,
    the replicas converge, and every node taken out is a voter again."""
    rc = main(["chaos", "--nodes", "3", "--duration", "8", "--nemesis", "member,kill",
               "--seed", "8", "--clients", "3", "--out", str(tmp_path / "o"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, (report["checks"], report["member_changes"])
    changes = report["member_changes"]
    assert changes and all(m["readded"] and m["voter"] for m in changes), changes
    assert report["checks"]["members_back"] is True


@pytest.mark.integration
def test_attach_runs_against_the_running_agents_of_a_tls_inventory(tmp_path):
    """`--attach` on an inventory with `tls: on` (the default): its clients present the
    admin certificate of the init directory (they once spoke plain TCP to TLS agents, and
    the run ended with no leader found)."""
    from tests.security.test_cli_up_and_roles import down, run, tls_inventory

    inv, _ = tls_inventory(tmp_path, "att")
    try:
        rc, out, err = run(inv, "up", "--no-console", "--json")
        assert rc == 0, err
        rc, out, err = run(inv, "chaos", "--attach", "--duration", "3", "--nemesis", "pause",
                           "--seed", "7", "--clients", "2", "--out", str(tmp_path / "o"), "--json",
                           timeout=300)
        report = json.loads(out)
        assert rc == 0, (report.get("checks"), err[-2000:])
        assert report["ops"]["ok"] > 0 and report["nodes"] == 3
    finally:
        down(inv)


@pytest.mark.integration
def test_a_short_run_with_the_oneway_nemesis_replaces_a_leader_cut_one_way(tmp_path, capsys):
    """The opt-in `oneway` kind: one node's links cut in one direction. A leader that
    hears nobody keeps reaching the others with heartbeats, so only its own quorum check
    can make it give way; the run holds the cut until another node leads, and the
    `oneway_leaders` check requires that to happen."""
    rc = main(["chaos", "--nodes", "3", "--duration", "6", "--nemesis", "oneway",
               "--seed", "5", "--clients", "3", "--out", str(tmp_path / "o"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, (report["checks"], report["oneway_leaders"])
    cut = report["oneway_leaders"]
    assert cut and all(o["replaced_by"] not in (None, o["node"]) for o in cut), cut
    assert any(o["way"] == "deaf" for o in cut), cut
    assert report["checks"]["oneway_leaders"] is True


@pytest.mark.integration
def test_a_short_run_with_the_wipe_nemesis_refuses_the_emptied_voter(tmp_path, capsys):
    """The opt-in `wipe` kind: a voter killed, its data directory emptied, started again.
    Every agent that counts it a voter refuses it (it lost its log and votes); then it is
    removed, emptied, added back with --join and made a voter. The history still checks."""
    rc = main(["chaos", "--nodes", "3", "--duration", "6", "--nemesis", "wipe",
               "--seed", "3", "--clients", "3", "--out", str(tmp_path / "o"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, (report["checks"], report["wipes"])
    wipes = report["wipes"]
    assert wipes and all(len(w["refused_by"]) == 2 and w["voter"] for w in wipes), wipes
    assert report["checks"]["wiped_refused"] is True
