"""`raftdeck` command line: start, stop, watch and poke a cluster described by an inventory.

One sub-command per verb, each a ``_cmd_<verb>(args, inv) -> int`` (async for those that
talk to agents). Output is text for people, or one JSON document with ``--json``. Errors
are one line on stderr, ``raftdeck: ...``; exit codes: 0 success, 1 the operation failed
(an agent refused, nothing reachable, no leader in time, a task did not succeed), 2 bad
usage, a bad inventory, an unknown node, or a node this machine cannot control.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from console.argtypes import int_range, positive_float
from console.certs import cert_lines
from console.disk import disk_lines, refused_lines, refused_voters

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

STATUS_TIMEOUT = 2.0  # seconds each agent has to answer `status` (a paused one never does)
FINAL_STATES = ("succeeded", "failed", "timed_out", "cancelled")
DEFAULT_ARGS = {"sleep": {"ms": "100"}, "cpu": {"ms": "100"}, "echo": {"data": ""}}


class CliError(Exception):
    """Ends the command: ``str()`` goes to stderr as one line, ``code`` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(" ".join(str(message).split()))
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        raise CliError(f"{message} (see `{self.prog} --help`)", EXIT_USAGE)


# == the parser ==================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="raftdeck",
        description="Operate a raftdeck cluster: start its local agents, watch it, submit "
        "tasks, inject faults. Every command but bench, and chaos without --attach, reads "
        "the inventory (--inventory, default inventory.yaml) to find the agents.",
        epilog="Exit codes: 0 success; 1 the operation failed (an agent refused, none "
        "reachable, no leader in time); 2 bad usage, a bad inventory, an unknown node, or a "
        "node this machine cannot control. Errors are one line on stderr.",
    )
    parser.add_argument("--version", action="version", version="raftdeck 0.1.0")
    _common(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _Parser(add_help=False)
    _common(common, argparse.SUPPRESS)

    def cmd(name: str, func, help: str, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help, parents=[common])
        p.set_defaults(func=func)
        return p

    p = cmd("init", _cmd_init, "create the cluster CA and the node and operator certificates",
            "Create, under DIR (default: the inventory's cluster.tls dir, else "
            "<inventory dir>/.raftdeck/tls): ca.crt/ca.key (the cluster CA), nodes/<name>.crt|.key "
            "for every inventory node (SAN: its host), operators/viewer|operator|admin.crt|.key. "
            "Key files are 0600, directories 0700. Existing files are kept (a node whose host "
            "changed gets a new certificate), so it is safe to run again after adding nodes. "
            "`raftdeck up` runs it when the inventory has tls: on or tls: {dir: ...}.")
    p.add_argument("--dir", metavar="DIR", help="where to write the files")
    p.add_argument("--rotate-ca", action="store_true",
                   help="take the next of the three steps that replace the CA while the cluster "
                        "runs (trust a new CA, issue every certificate from it, stop trusting "
                        "the old one); each step first checks that every agent loaded the files "
                        "of the step before (docs/OPERATIONS.md, Security)")
    p.add_argument("--force", action="store_true",
                   help="with --rotate-ca: take the step even if an agent did not answer or "
                        "still uses older files")

    p = cmd("up", _cmd_up, "start the inventory's local agents and wait for a leader",
            "Start every inventory node that lives on this machine (no ssh:, or host "
            "127.0.0.1/localhost/::1) and is not already running, as detached background "
            "processes: pid file <data_dir>.pid, JSON log in the node's log_file or "
            "<data_dir>/../<name>.log, stdout/stderr in <data_dir>.stderr. Then wait until a "
            "majority of the voters follow one leader and print one line per node and the leader. Running it again "
            "starts nothing new. Then the console opens (unless --no-console, or when "
            "stdout is not a terminal); leaving it (q) leaves the cluster running unless "
            "--ephemeral.")
    p.add_argument("--no-console", action="store_true",
                   help="do not open the console after starting")
    p.add_argument("--ephemeral", action="store_true",
                   help="stop the local agents when the console exits")
    p.add_argument("--readonly", action="store_true",
                   help="open the console read-only: every action key is refused")
    p.add_argument("--wait-s", type=positive_float, default=30.0, metavar="S",
                   help="how long to wait for a leader with a quorum (default 30)")

    p = sub.add_parser("bench", help="benchmarks: raftdeck side by side with PySyncObj",
                       description="Run `python -m bench` (needs the bench extra: pip "
                       "install 'raftdeck[bench]'); every argument after `bench` goes to it, "
                       "e.g. `raftdeck bench --quick` or `raftdeck bench --help`. No "
                       "inventory is read: it starts its own clusters on 127.0.0.1.",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=None)

    p = cmd("console", _cmd_console, "open the console on a running cluster",
            "Attach the console to every agent of the inventory (what plain `raftdeck` does "
            "in a terminal). Keys: ? help, arrows select, space marks, k kill, x restart, p "
            "pause/resume, i isolate, h heal all, t make leader, w worst first, / filter, q quit.")
    p.add_argument("--readonly", action="store_true", help="refuse every action key")

    p = cmd("down", _cmd_down, "stop the local agents that `up` started",
            "Stop every local agent that has a pid file: SIGTERM, then SIGKILL after --grace-s. "
            "Removes the pid files. Agents started by other means are left alone.")
    p.add_argument("--grace-s", type=positive_float, default=10.0, metavar="S",
                   help="seconds between SIGTERM and SIGKILL (default 10)")

    cmd("status", _cmd_status, "one line per agent and a health line",
        "Ask every agent for its status (each has %g s to answer, so a dead or paused agent "
        "shows as unreachable instead of stalling) and print one line per node: address, "
        "role, term, leader, commit, applied, lag (the leader's commit minus this node's "
        "applied), digest, load running/queued/capacity, active fault rules, and whether it "
        "answered. The health line says leader or none, quorum or not, and the term. "
        "Exits 0 when a leader has a quorum, 1 otherwise." % STATUS_TIMEOUT)

    p = cmd("submit", _cmd_submit, "submit tasks (and optionally wait for them)",
            "Submit COUNT tasks of one kind, with ids PREFIX + a random uuid. Arguments per "
            "kind: sleep ms=N (default 100), cpu ms=N (default 100), echo data=TEXT (default "
            "empty), shell cmd=TEXT (required; the node must allow shell). With --wait, wait "
            "until every task is final and print each result; exit 1 unless all succeeded.")
    p.add_argument("--kind", required=True, choices=("sleep", "cpu", "echo", "shell"))
    p.add_argument("--arg", action="append", default=[], metavar="K=V",
                   help="a task argument (repeatable)")
    p.add_argument("--count", type=int_range(1, 100000), default=1, metavar="N",
                   help="how many tasks (default 1)")
    p.add_argument("--timeout-ms", type=int_range(1, 86_400_000), default=60_000, metavar="T",
                   help="per-attempt time limit (default 60000)")
    p.add_argument("--max-attempts", type=int_range(1, 100), default=None, metavar="N",
                   help="attempts per task (default: the cluster's max_attempts)")
    p.add_argument("--policy", choices=("least_loaded", "round_robin", "weighted", "hash"),
                   help="placement policy (default: the cluster's)")
    p.add_argument("--key", help="placement key for the hash policy")
    p.add_argument("--id-prefix", default="t-", metavar="X", help="task id prefix (default t-)")
    p.add_argument("--wait", action="store_true", help="wait for the results")
    p.add_argument("--wait-s", type=positive_float, default=120.0, metavar="S",
                   help="with --wait: give up after this long (default 120)")

    p = cmd("tasks", _cmd_tasks, "list tasks", "List tasks in submission order.")
    p.add_argument("--state", choices=("submitted", "assigned", "running", "succeeded",
                                       "failed", "timed_out", "cancelled"))
    p.add_argument("--node", help="only tasks placed on this node")
    p.add_argument("--limit", type=int_range(1, 10000), default=100, metavar="L",
                   help="at most this many (default 100)")
    p.add_argument("--after", metavar="ID", help="start after this task id (paging)")

    p = cmd("task", _cmd_task, "show one task", "Show one task's record: state, attempts, output.")
    p.add_argument("id", metavar="ID")

    p = cmd("cancel", _cmd_cancel, "cancel a task", "Cancel a task that is not final yet.")
    p.add_argument("id", metavar="ID")

    for verb, what in (("kill", "SIGKILL an agent (by its pid file) and remove the pid file"),
                       ("pause", "SIGSTOP an agent: it stays up but answers nothing"),
                       ("resume", "SIGCONT a paused agent"),
                       ("restart", "SIGKILL an agent, start it again, wait until it answers"),
                       ("reload", "SIGHUP an agent: it rereads its TLS files (a renewed "
                                  "certificate) without a restart; then check that it took them")):
        p = cmd(verb, _cmd_signal, what,
                what + ". A local node directly; a node with ssh: on another host over SSH "
                "(deployed with `raftdeck deploy`; known_hosts from $RAFTDECK_KNOWN_HOSTS or "
                "~/.ssh/known_hosts). With TLS, only for the admin role (the role of the "
                "certificate in use); another role exits 1."
                + (" Several nodes, or --all, are reloaded one after the other; the exit "
                   "code is 1 if any of them did not take its files." if verb == "reload" else ""))
        if verb == "reload":
            p.add_argument("node", metavar="NODE", nargs="*")
            p.add_argument("--all", action="store_true", help="every node of the inventory")
        else:
            p.add_argument("node", metavar="NODE")
        if verb == "restart":
            p.add_argument("--wait-s", type=positive_float, default=30.0, metavar="S",
                           help="how long to wait for it to answer (default 30)")

    p = cmd("partition", None, "cut Raft traffic between nodes",
            "Inject partition rules on every reachable agent (partitions are enforced by "
            "sender and receiver). `isolate N`: N can neither send to nor hear from anyone. "
            "`split A,B C,D`: the two groups cannot talk (both directions). `from A,B to C,D`: "
            "one direction only. Client traffic is not affected. Undo with `raftdeck heal`.")
    psub = p.add_subparsers(dest="shape", metavar="SHAPE", parser_class=_Parser, required=True)
    fault = _Parser(add_help=False)
    fault.add_argument("--duration-ms", type=int_range(1, 2**31 - 1), metavar="T",
                       help="heal by itself after T ms (default: until `raftdeck heal`)")
    _common(fault, argparse.SUPPRESS)
    q = psub.add_parser("isolate", parents=[fault], help="cut one node off from all others",
                        description="Cut NODE off from every other node, both directions.")
    q.add_argument("node", metavar="NODE")
    q.set_defaults(func=_cmd_partition)
    q = psub.add_parser("split", parents=[fault], help="split the nodes into two groups",
                        description="No Raft traffic between the two comma-separated groups, "
                        "in either direction.")
    q.add_argument("a", metavar="A,B")
    q.add_argument("b", metavar="C,D")
    q.set_defaults(func=_cmd_partition)
    q = psub.add_parser("from", parents=[fault], help="drop traffic in one direction",
                        description="Drop Raft traffic from the first group to the second "
                        "(one direction): `raftdeck partition from A,B to C,D`.")
    q.add_argument("a", metavar="A,B")
    q.add_argument("to", choices=("to",), metavar="to")
    q.add_argument("b", metavar="C,D")
    q.set_defaults(func=_cmd_partition)

    cmd("heal", _cmd_heal, "remove every fault rule on every agent",
        "Send `heal` to every agent: all partition, latency and loss rules are removed.")

    p = cmd("transfer", _cmd_transfer, "move leadership to a node",
            "Ask the leader to hand leadership to NODE, and wait (up to 10 s) to see it lead. "
            "Note: a leader hands leadership on to a caught-up node of higher priority.")
    p.add_argument("node", metavar="NODE")

    p = cmd("add-node", _cmd_add_node, "add an inventory node to the running cluster",
            "Grow the running cluster by NODE, which must already be in the inventory (add "
            "its entry first). With TLS, its certificate is issued if missing. The leader "
            "adds it as a learner; its agent is started with `nodeagent run --join` (an empty "
            "data directory then learns the membership from the leader instead of writing "
            "the inventory's); once it has caught up, a node whose inventory role is voter "
            "is made a voter (not with --learner). A node with ssh: is deployed to its host "
            "as `raftdeck deploy` would (the SSH and wheel options below), its agent started "
            "with --join. Safe to run again: a step already done is skipped.")
    p.add_argument("node", metavar="NODE")
    p.add_argument("--learner", action="store_true",
                   help="leave it a learner (replicated to, never voting) whatever its role")
    p.add_argument("--wait-s", type=positive_float, default=60.0, metavar="S",
                   help="how long to wait for it to catch up (default 60)")
    _ssh_options(p)
    _wheel_options(p)

    p = cmd("remove-node", _cmd_remove_node, "remove a node from the running cluster",
            "Ask the leader to remove NODE from the membership, wait until every remaining "
            "member has applied it, then stop its agent (a local one by its pid file; one "
            "with ssh: over SSH, SIGTERM then SIGKILL). Its data directory is kept. Removing "
            "the leader hands leadership on first. Take it out of the inventory afterwards, "
            "or bring it back with `raftdeck add-node NODE` after emptying its data directory "
            "(the way back for a voter that lost its data: docs/OPERATIONS.md).")
    p.add_argument("node", metavar="NODE")
    _ssh_options(p)

    p = cmd("chaos", _cmd_chaos, "a Jepsen-style run: workload, faults, linearizability check",
            "Start a fresh cluster of --nodes local agents (or, with --attach, use the "
            "inventory's running local agents), run concurrent clients (get/put/cas/delete on a "
            "few keys, echo tasks) for --duration seconds while a seeded nemesis kills, pauses, "
            "partitions and slows nodes, then heal, read every key and check: linearizability "
            "of the history, every acknowledged task has one final result, replicas converge, "
            "a leader is elected in time. Writes history.jsonl and report.json to --out and "
            "prints their paths. Exits 0 only if every check passed. See docs/OPERATIONS.md, Chaos.")
    from console import chaos as _chaos
    _chaos.add_arguments(p)
    p.set_defaults(needs_inventory=False)

    p = cmd("backup", _cmd_backup, "save the cluster's whole state to a file",
            "Take a backup of the leader's state (or --node's) at its applied index: every key, "
            "task and client session. The node first confirms with a quorum that it has "
            "applied every write acknowledged so far, so the backup holds all of them. It is "
            "fetched in chunks, checked against its sha256 and written to FILE durably. Admin "
            "role. Restore it with `raftdeck restore FILE`.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--node", help="take it on this node instead of the leader (it serializes "
                   "the state; the backup is as complete)")
    p.add_argument("--stale", action="store_true", help="with --node: save what that replica "
                   "has applied without asking a quorum (the way to salvage state when a "
                   "majority is gone; it may lack the last acknowledged writes)")

    p = cmd("restore", _cmd_restore, "start the inventory's nodes from a backup (offline)",
            "Write the backup in FILE into the data directory of every inventory node, as a "
            "snapshot the log starts from, with the inventory's membership; then `raftdeck up` "
            "starts a new cluster holding the backup's keys and tasks (`raftdeck deploy` for "
            "nodes with ssh:, whose directories are uploaded over SSH, checked file by file "
            "and fsynced on the host). Every agent must be stopped and every data directory "
            "empty or absent (move the old ones aside); nothing is written until every node "
            "has been checked. --check writes nothing: it shows what the backup holds and "
            "whether every node is ready.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--check", action="store_true", help="write nothing: show what FILE holds "
                   "(keys, tasks, sessions, index, membership) and whether the restore would go "
                   "ahead (exit 1 if not)")
    _ssh_options(p)

    p = cmd("put", _cmd_put, "write a key", "Write KEY = VALUE (UTF-8) through the leader.")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE")

    p = cmd("get", _cmd_get, "read a key",
            "Read KEY: linearizable through the leader, or --stale from one replica "
            "(--node, default any). Exits 1 if the key is absent.")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--stale", action="store_true", help="read a replica's local state (may lag)")
    p.add_argument("--node", help="with --stale: the replica to read")

    p = cmd("delete", _cmd_delete, "delete a key",
            "Delete KEY through the leader. Deleting a key that is absent is not an error.")
    p.add_argument("key", metavar="KEY")

    p = cmd("cas", _cmd_cas, "compare-and-swap a key",
            "Write KEY = VALUE only if KEY now holds EXPECTED (--expect) or is absent "
            "(--absent), in one replicated step. Exits 1 if it did not swap, printing "
            "what KEY holds.")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--expect", metavar="EXPECTED", help="the value KEY must hold now")
    g.add_argument("--absent", action="store_true", help="swap only if KEY is absent")

    p = cmd("keys", _cmd_keys, "list keys (and values) of one replica",
            "List the keys of the leader's replica (or --node's), in key order: what it has "
            "applied, which may lag the latest acknowledged write by a moment. With --json, "
            "also the node and its applied index.")
    p.add_argument("--prefix", default="", help="only keys that start with this")
    p.add_argument("--values", action="store_true", help="print KEY = VALUE")
    p.add_argument("--node", help="the replica to list (default: the leader)")
    p.add_argument("--after", metavar="KEY", help="only keys after KEY (the next page)")
    p.add_argument("--limit", type=int, default=20000,
                   help="at most this many keys are fetched (default 20000)")
    _deploy_parsers(cmd)
    return parser


def _ssh_options(p) -> None:
    """How to reach hosts over SSH (deploy and its kin; add-node and remove-node)."""
    p.add_argument("--known-hosts", metavar="PATH", help="known_hosts file (default "
                   "$RAFTDECK_KNOWN_HOSTS, else ~/.ssh/known_hosts)")
    p.add_argument("--accept-new-host-keys", action="store_true",
                   help="learn the key of a host not in known_hosts (a changed key is never accepted)")
    p.add_argument("--connect-timeout", type=positive_float, default=10.0, metavar="S",
                   help="seconds to wait for a host's SSH connection (default 10)")


def _wheel_options(p) -> None:
    p.add_argument("--wheel", metavar="PATH", help="install this raftdeck wheel (default: "
                   "build one from this source tree)")
    p.add_argument("--wheelhouse", metavar="DIR", help="the agent's dependency wheels "
                   "(default: rebuilt from this machine's installed packages)")


def _deploy_parsers(cmd) -> None:
    """deploy / upgrade / undeploy / logs (their code is console/deploy.py)."""
    ssh = _Parser(add_help=False)
    ssh.add_argument("--hosts", metavar="A,B", help="only these nodes (default: every node with ssh:)")
    ssh.add_argument("--parallel", type=int_range(1, 256), default=4, metavar="N",
                     help="hosts worked on at once by deploy and undeploy (default 4; "
                          "upgrade goes one node at a time)")
    _ssh_options(ssh)
    wheels = _Parser(add_help=False)
    _wheel_options(wheels)
    p = cmd("deploy", _cmd_deploy, "install and start the agents of the nodes with ssh:",
            "For every inventory node with ssh: (or --hosts): connect over SSH (host keys "
            "checked against known_hosts), check Python >= 3.11, upload this project's wheel "
            "and the agent's dependency wheels (the hosts need no internet), install them in a "
            "venv under ssh.install_dir, write the node config and TLS files (0600), start the "
            "agent (pid file <data_dir>.pid) and check it answers on its client port. A host whose "
            "inputs did not change and whose agent answers is left alone; one whose TLS files "
            "alone changed gets them and a SIGHUP (the agent rereads them, no restart). One "
            "line per host; "
            "a failing host does not stop the others; exit 1 if any failed.")
    p._add_container_actions(ssh)
    p._add_container_actions(wheels)
    p.add_argument("--wait-s", type=positive_float, default=30.0, metavar="S",
                   help="how long to wait for a leader after deploying (default 30)")
    p = cmd("upgrade", _cmd_upgrade, "rolling upgrade of the deployed agents",
            "Deploy the new wheel one node at a time: followers first, the leader last after "
            "handing leadership to an upgraded node; each node is restarted and waited on until "
            "it has applied the leader's commit index of the time it came back. Stops at the "
            "first failure.")
    p._add_container_actions(ssh)
    p._add_container_actions(wheels)
    p.add_argument("--catch-up-s", type=positive_float, default=60.0, metavar="S",
                   help="how long each node may take to catch up (default 60)")
    p = cmd("undeploy", _cmd_undeploy, "stop the deployed agents and remove their files",
            "Stop each deployed agent (SIGTERM, SIGKILL after --grace-s) and remove what deploy "
            "installed (venv, wheels, node config, TLS files, manifest). The data directory and "
            "logs are kept unless --purge-data.")
    p._add_container_actions(ssh)
    p.add_argument("--purge-data", action="store_true", help="also delete the data directory and logs")
    p.add_argument("--grace-s", type=positive_float, default=10.0, metavar="S",
                   help="seconds between SIGTERM and SIGKILL (default 10)")
    p = cmd("logs", _cmd_logs, "the last lines of a node's agent log (local or over SSH)",
            "Print the last lines of a node's JSON log; for a remote node they are read over SSH.")
    p.add_argument("node", metavar="NODE")
    p.add_argument("--lines", "-n", type=int_range(1, 100000), default=50, metavar="N",
                   help="how many lines (default 50)")
    p.add_argument("--stderr", action="store_true",
                   help="also the agent's stdout/stderr file (--json always includes it)")


async def _cmd_deploy(args, inv) -> int:
    from console.deploy import cmd_deploy

    return await cmd_deploy(args, inv)


async def _cmd_upgrade(args, inv) -> int:
    from console.deploy import cmd_upgrade

    return await cmd_upgrade(args, inv)


async def _cmd_undeploy(args, inv) -> int:
    from console.deploy import cmd_undeploy

    return await cmd_undeploy(args, inv)


async def _cmd_logs(args, inv) -> int:
    from console.deploy import cmd_logs

    return await cmd_logs(args, inv)


def _common(p: argparse.ArgumentParser, default) -> None:
    """Options every command takes, before or after its name. On the sub-parsers they
    default to SUPPRESS so a value given before the command name is kept."""
    sup = default is argparse.SUPPRESS
    p.add_argument("--inventory", metavar="PATH", default=default if sup else "inventory.yaml",
                   help="the inventory file (default inventory.yaml)")
    p.add_argument("--json", action="store_true", default=default if sup else False,
                   help="print one JSON document instead of text")
    p.add_argument("--timeout", type=positive_float, metavar="S",
                   default=default if sup else 10.0,
                   help="how long one cluster operation may take, retries included (default 10)")
    p.add_argument("--role", choices=("viewer", "operator", "admin"),
                   default=default if sup else "admin",
                   help="with TLS: connect with this operator certificate from the init "
                   "directory (default admin)")
    p.add_argument("--tls-cert", metavar="PATH", default=default if sup else None,
                   help="with TLS: present this certificate instead (with --tls-key)")
    p.add_argument("--tls-key", metavar="PATH", default=default if sup else None,
                   help="with TLS: the private key of --tls-cert")


# == main ========================================================================================


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # Everything after `bench` is the benchmark's: argparse would take `--quick` or
        # `--help` for options of its own (REMAINDER does not start at an option).
        from bench.__main__ import main as bench_main

        rest = argv[1:]
        return bench_main(rest[1:] if rest[:1] == ["--"] else rest)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "bench":  # its own clusters, no inventory
            from bench.__main__ import main as bench_main

            rest = list(args.bench_args)
            return bench_main(rest[1:] if rest[:1] == ["--"] else rest)
        if getattr(args, "func", None) is None:
            if not sys.stdout.isatty():
                parser.print_help()
                return EXIT_OK
            args.func, args.readonly = _cmd_console, False  # plain `raftdeck`: attach
        inv = _load_inventory(args.inventory) if getattr(args, "needs_inventory", True) or \
            getattr(args, "attach", False) else None
        result = args.func(args, inv)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        if getattr(args, "func", None) is _cmd_up and result == EXIT_OK and not args.no_console \
                and not args.json and sys.stdout.isatty():
            try:
                _cmd_console(args, inv)
            finally:
                if args.ephemeral:
                    _cmd_down(argparse.Namespace(**{**vars(args), "grace_s": 10.0}), inv)
        return result
    except CliError as e:
        _err(str(e))
        return e.code
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_FAIL
    except Exception as e:  # never a traceback for an operator; RAFTDECK_DEBUG=1 shows it
        if os.environ.get("RAFTDECK_DEBUG"):
            raise
        from console.client import ConnectionFailed, OutcomeUnknown, RequestError
        from console.procs import ProcError
        from nodeagent.security import TLSError

        if isinstance(e, TLSError):
            _err(str(e))
            return EXIT_USAGE
        if isinstance(e, RequestError):
            _err(f"{e.code}: {e.message}" + (f" (from {e.node})" if e.node else ""))
        elif isinstance(e, OutcomeUnknown):
            _err(f"outcome unknown: {e}")
        elif isinstance(e, ConnectionFailed):
            _err(f"cannot reach the cluster: {_clean(str(e))}")
        elif isinstance(e, ProcError):
            _err(str(e))
            return e.exit_code
        elif isinstance(e, TimeoutError):
            _err(f"timed out: {e}")
        else:
            _err(f"internal error: {type(e).__name__}: {e} (RAFTDECK_DEBUG=1 shows the traceback)")
        return EXIT_FAIL


def _err(msg: str) -> None:
    print("raftdeck: " + " ".join(msg.split()), file=sys.stderr)


def _load_inventory(path: str):
    from nodeagent.config import ConfigError, load_inventory

    try:
        return load_inventory(path)
    except ConfigError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def _node(inv, name: str):
    try:
        return inv.node(name)
    except KeyError as e:
        raise CliError(f"{inv.path.name}: {e.args[0]}", EXIT_USAGE) from None


def _names(inv, text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise CliError(f"empty node list {text!r}", EXIT_USAGE)
    for n in names:
        _node(inv, n)
    return names


def _ssl(inv, args):
    """The operator certificate's SSL context (None: the inventory has TLS off)."""
    from console.client import tls_context
    from nodeagent.security import TLSError

    try:
        return tls_context(inv.cluster.tls, getattr(args, "role", "admin"),
                           getattr(args, "tls_cert", None), getattr(args, "tls_key", None))
    except TLSError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def _my_role(inv, args) -> str | None:
    """The role this command's certificate carries (None: TLS off)."""
    from nodeagent.security import TLSError, cert_file_identity

    if inv.cluster.tls is None:
        return None
    cert = getattr(args, "tls_cert", None) or inv.cluster.tls.for_role(getattr(args, "role", "admin")).cert
    try:
        return cert_file_identity(cert).role
    except TLSError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def _client(inv, args, *, timeout: float | None = None):
    from console.client import ClusterClient

    return ClusterClient({n.name: (n.host, n.port) for n in inv.nodes}, inv.cluster.name,
                         timeout=timeout or min(args.timeout, 5.0), op_timeout=args.timeout,
                         ssl=_ssl(inv, args))


class _Cluster:
    """``async with _Cluster(inv, args) as client``: a ClusterClient that first checks that
    at least one agent accepts a connection, so a command against a stopped cluster fails
    at once instead of retrying for --timeout seconds."""

    def __init__(self, inv, args):
        self.inv = inv
        self.client = _client(inv, args)

    async def __aenter__(self):
        from console.client import ConnectionFailed

        async def one(n: str):
            try:
                await asyncio.wait_for(self.client.connection(n), STATUS_TIMEOUT + 0.5)
                return None
            except (ConnectionFailed, asyncio.TimeoutError, OSError) as e:
                return _short_error(n, e) if str(e) else "timed out"

        errors = await asyncio.gather(*(one(n) for n in self.inv.names))
        if all(e is not None for e in errors):
            await self.client.close()
            raise CliError(f"no agent of cluster {self.inv.cluster.name!r} is reachable "
                           f"({self.inv.names[0]}: {errors[0]}); is it up? (`raftdeck up`, "
                           "`raftdeck status`)")
        return self.client

    async def __aexit__(self, *exc):
        await self.client.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", errors="replace")
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_jsonable(x) for x in v]
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v


def _print_json(data: Any) -> None:
    print(json.dumps(_jsonable(data), indent=2))


def _table(rows: list[list[Any]], header: list[str] | None = None) -> list[str]:
    rows = [[("-" if c is None else str(c)) for c in r] for r in rows]
    if header:
        rows.insert(0, header)
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    return ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _clean(msg: str) -> str:
    """Friendlier socket errors: asyncio's "Connect call failed ('h', p)" and an empty
    timeout text."""
    msg = re.sub(r"Connect call failed \([^)]*\)", "connection refused", msg)
    msg = re.sub(r"Multiple exceptions: .*", "connection refused", msg)
    return msg.replace("()", "(timed out)")


def _short_error(name: str, e: BaseException) -> str:
    msg = _clean(str(e) or type(e).__name__)
    for prefix in (f"{name}: ",):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if msg.startswith(f"{name} (") and "): " in msg:
        msg = msg.split("): ", 1)[1]
    return " ".join(msg.split())


# == cluster views ===============================================================================


async def _statuses(client, names, per_agent: float = STATUS_TIMEOUT) -> dict[str, dict | str]:
    """name -> status map, or the reason it did not answer; never waits much past
    2 x ``per_agent`` (connect, then the request)."""
    from console.client import ConnectionFailed, OutcomeUnknown, RequestError

    async def one(n: str):
        try:
            return n, await asyncio.wait_for(client.call(n, "status"), per_agent * 2 + 0.5)
        except asyncio.TimeoutError:
            return n, f"no answer within {per_agent * 2 + 0.5:g}s"
        except (ConnectionFailed, OutcomeUnknown, RequestError, OSError) as e:
            return n, _short_error(n, e)

    return dict(await asyncio.gather(*(one(n) for n in names)))


def _health(inv, sts: dict[str, dict | str]) -> dict:
    """Leader (the leader-role node of the highest term), its term, and whether a majority
    of the voters answered and follow it."""
    up = {n: s for n, s in sts.items() if isinstance(s, dict)}
    leaders = sorted((s["term"], n) for n, s in up.items() if s.get("role") == "leader")
    leader, term = (leaders[-1][1], leaders[-1][0]) if leaders else (None, None)
    if leader is not None:
        voters = list(up[leader].get("voters") or [n.name for n in inv.voters])
    else:
        voters = [n.name for n in inv.voters]
    agreeing = sorted(n for n in voters if n in up and up[n].get("leader") == leader
                      and up[n].get("term") == term) if leader else []
    need = len(voters) // 2 + 1
    if term is None and up:
        term = max(s.get("term", 0) for s in up.values())
    return {"leader": leader, "term": term, "quorum": leader is not None and len(agreeing) >= need,
            "voters": len(voters), "following": len(agreeing), "needed": need,
            "reachable": len(up), "nodes": len(sts)}


def _health_line(h: dict) -> str:
    term = "-" if h["term"] is None else h["term"]
    reach = f"{h['reachable']} of {h['nodes']} agents reachable"
    if h["leader"] is None:
        return (f"health: NO LEADER (highest term seen {term}), no quorum "
                f"({h['needed']} of {h['voters']} voters needed), {reach}")
    q = "yes" if h["quorum"] else "NO"
    return (f"health: leader {h['leader']}, term {term}, quorum {q} ({h['following']} of "
            f"{h['voters']} voters follow it, {h['needed']} needed), {reach}")


def _process_states(inv) -> dict[str, str]:
    from console.procs import LocalProcesses, is_local

    procs = LocalProcesses(inv)
    out = {}
    for n in inv.nodes:
        out[n.name] = procs.process(n).state if is_local(n) else "remote"
    return out


def _last_words(inv, names) -> dict[str, str]:
    """For local agents that are not running: the last line each wrote to its stderr file
    since it was started (why it stopped by itself; "" when killed)."""
    from console.procs import LocalProcesses

    procs = LocalProcesses(inv)
    return {n: procs.last_words(procs.node(n)) for n in names}


# == up / down ===================================================================================


def _tls_dir(inv, given: str | None = None):
    if given:
        return Path(given)
    if inv.cluster.tls is not None and inv.cluster.tls.dir is not None:
        return inv.cluster.tls.dir
    return inv.path.parent / ".raftdeck" / "tls"


def _init(inv, tls_dir):
    from nodeagent.security import TLSError, init_tls

    try:
        return init_tls(tls_dir, inv.cluster.name, [(n.name, n.host) for n in inv.nodes])
    except TLSError as e:
        raise CliError(str(e), EXIT_FAIL) from None


def _cmd_init(args, inv):
    d = _tls_dir(inv, args.dir)
    if args.rotate_ca:
        return _rotate_ca(args, inv, d)
    if args.force:
        raise CliError("--force goes with --rotate-ca", EXIT_USAGE)
    done = _init(inv, d)
    uses = inv.cluster.tls is not None and inv.cluster.tls.dir is not None and \
        inv.cluster.tls.dir.resolve() == d.resolve()
    if args.json:
        _print_json({"dir": str(d), "files": [{"cert": c, "result": r} for c, r in done],
                     "inventory_uses_it": uses})
        return EXIT_OK
    for ln in _table([[c, r] for c, r in done]):
        print(ln)
    created = sum(1 for _, r in done if r != "kept")
    print(f"{d}: {created} certificate(s) issued, {len(done) - created} kept "
          "(keys are 0600; never copy ca.key to the nodes)")
    if not uses:
        print(f"to use them, set in {inv.path.name}: cluster: tls: {{dir: {d}}}")
    return EXIT_OK


_ROTATE_NEXT = {
    "trust": "get ca.crt to every agent: `raftdeck deploy` (it sends each running agent "
             "SIGHUP), or `raftdeck reload --all` where the files are already in place; then "
             "run `raftdeck init --rotate-ca` again, to issue every certificate from the new CA",
    "issue": "get the new certificates to every agent the same way (deploy, or reload --all); "
             "the console uses the new operator certificates from now on, and the old CA's key "
             "is gone; then run `raftdeck init --rotate-ca` again, to stop trusting the old CA",
    "finish": "get ca.crt to every agent the same way (deploy, or reload --all); each then ends "
              "the connections still made with a certificate of the old CA, and they reconnect "
              "with the new ones. The CA is replaced.",
}


async def _rotation_lag(inv, args, d) -> list[str]:
    """What keeps the next CA step from being safe: each node that did not answer, or
    whose agent trusts other CAs than ca.crt lists, or presents another certificate than
    nodes/<name>.crt. Empty when every agent runs with the files in ``d``."""
    from nodeagent.security import TLSError, cert_file_facts, pem_fingerprints

    try:
        want_ca = set(pem_fingerprints(d / "ca.crt"))
        want_cert = {n.name: cert_file_facts(d / "nodes" / f"{n.name}.crt")["sha256"]
                     for n in inv.nodes}
    except TLSError as e:
        raise CliError(str(e)) from None
    from console.certs import node_rows

    async with _client(inv, args, timeout=STATUS_TIMEOUT) as client:
        sts = await _statuses(client, inv.names)
    rows = {r["name"]: r for r in node_rows(sts)}
    lag = []
    for n in inv.nodes:
        if n.name not in rows:
            lag.append(f"{n.name} did not answer ({sts[n.name]})")
            continue
        has_ca = set(rows[n.name]["ca"])
        has_cert = (rows[n.name]["cert"] or {}).get("sha256")
        if has_ca != want_ca:
            lag.append(f"{n.name} trusts {len(has_ca)} CA(s), not the {len(want_ca)} of ca.crt")
        elif has_cert != want_cert[n.name]:
            lag.append(f"{n.name} presents a certificate other than nodes/{n.name}.crt")
    return lag


async def _rotate_ca(args, inv, d) -> int:
    from nodeagent.security import ROTATE_STEPS, TLSError, ca_rotation_state, rotate_ca

    try:
        state = ca_rotation_state(d)
    except TLSError as e:
        raise CliError(str(e)) from None
    step = ROTATE_STEPS[(ROTATE_STEPS.index(state) + 1) if state in ROTATE_STEPS else 0]
    if inv.cluster.tls is None and not args.force:
        raise CliError(f"{inv.path.name}: TLS is off, so no agent uses a CA; to replace the "
                       "files anyway, pass --force")
    if not args.force:
        lag = await _rotation_lag(inv, args, d)
        if lag:
            raise CliError(f"not taking the CA step {step!r} yet: " + "; ".join(lag) +
                           ". Every agent must run with the files of the step before: deploy "
                           "them, or `raftdeck reload --all`; or pass --force (an agent that "
                           "misses a step cannot talk to the others after the last one)")
    try:
        step, done = rotate_ca(d, inv.cluster.name, [(n.name, n.host) for n in inv.nodes])
    except TLSError as e:
        raise CliError(str(e)) from None
    number = ROTATE_STEPS.index(step) + 1
    if args.json:
        _print_json({"dir": str(d), "step": step, "of": len(ROTATE_STEPS),
                     "files": [{"cert": c, "result": r} for c, r in done], "next": _ROTATE_NEXT[step]})
        return EXIT_OK
    for ln in _table([[c, r] for c, r in done]):
        print(ln)
    print(f"CA replacement: step {number} of {len(ROTATE_STEPS)} ({step}) done in {d}")
    print(f"next: {_ROTATE_NEXT[step]}")
    return EXIT_OK


def _members_of(statuses) -> set[str]:
    """Voters and learners, as the given statuses (anything else: no answer) report them."""
    out: set[str] = set()
    for st in statuses:
        if isinstance(st, dict):
            out |= set(st.get("voters") or ()) | set(st.get("learners") or ())
    return out


async def _running_members(client, names) -> set[str]:
    """The membership the answering agents among ``names`` report (empty: none answers)."""
    return _members_of((await _statuses(client, names, per_agent=1.0)).values())


async def _not_members(inv, args, procs) -> set[str]:
    """Local nodes of the inventory that `up` must not start: the cluster already runs
    and they are not in its membership. A new one (no log yet) would write the
    inventory's membership as its first entry, which the cluster's own entry 1 matches by
    index and term (`add-node` starts it with --join instead); a removed one has no part
    to play."""
    from console.procs import is_local

    running = [n.name for n in inv.nodes if is_local(n) and procs.process(n).alive]
    if not running:
        return set()
    async with _client(inv, args, timeout=1.0) as client:
        members = await _running_members(client, running)
    if not members:
        return set()  # nobody answers: cannot tell
    return {n.name for n in inv.nodes if is_local(n) and n.name not in members
            and not procs.process(n).alive}


def _has_log(data_dir) -> bool:
    wal, snap = data_dir / "wal", data_dir / "snap"
    return any(f.stat().st_size > 0 for d in (wal, snap) if d.is_dir() for f in d.iterdir())


async def _cmd_up(args, inv) -> int:
    from console.procs import LocalProcesses, ProcError, is_local

    tls_info = {"on": inv.cluster.tls is not None}
    if inv.cluster.tls is not None and inv.cluster.tls.dir is not None:
        fresh = [c for c, r in _init(inv, inv.cluster.tls.dir) if r != "kept"]
        tls_info.update(dir=str(inv.cluster.tls.dir), issued=fresh)
        if fresh and not args.json:
            print(f"TLS: issued {', '.join(fresh)} in {inv.cluster.tls.dir}")
    procs = LocalProcesses(inv)
    rows: dict[str, dict] = {}
    started = {}
    newcomers = await _not_members(inv, args, procs)
    for n in inv.nodes:
        row = {"name": n.name, "address": _addr(n.host, n.port), "action": None, "pid": None}
        rows[n.name] = row
        if not is_local(n):
            row["action"] = "remote"
            row["note"] = "remote (ssh): not started here; `raftdeck deploy` starts it"
            continue
        p = procs.process(n)
        if p.alive:
            row.update(action="running", pid=p.pid, process=p.state)
            continue
        if n.name in newcomers:
            row.update(action="skipped", note=(
                f"removed from the running cluster: take it out of {inv.path.name}"
                if _has_log(procs.data_dir(n)) else
                f"not a member of the running cluster: `raftdeck add-node {n.name}` adds "
                "and starts it"))
            continue
        try:
            r = procs.start(n)
        except ProcError as e:
            row.update(action="failed", error=str(e))
            continue
        started[n.name] = r
        row.update(action="started", pid=r.pid, log=str(r.log))
        if p.state == "stale":
            row["note"] = "a stale pid file was replaced"

    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.wait_s
    health: dict = {}
    sts: dict = {}
    async with _client(inv, args, timeout=1.0) as client:
        while True:
            for name, r in list(started.items()):
                node = inv.node(name)
                if not procs.process(node).alive:
                    rc = procs.exit_code(r.pid)
                    tail = procs.stderr_tail(node, r.stderr_offset)
                    why = f"exited with code {rc}" if rc is not None else "exited"
                    rows[name].update(action="failed",
                                      error=f"{why}: {tail or 'see ' + str(r.stderr)}")
                    procs.remove_pid_file(node)
                    del started[name]
            sts = await _statuses(client, inv.names, per_agent=1.0)
            health = _health(inv, sts)
            waiting_for = [n for n in started if not isinstance(sts.get(n), dict)]
            if health["quorum"] and not waiting_for:  # a majority follows one leader
                break
            if not any(isinstance(s, dict) for s in sts.values()) and not started and \
                    not any(r["action"] == "running" for r in rows.values()):
                break  # nothing runs that could elect a leader
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.1)

    for name, row in rows.items():
        st = sts.get(name)
        if isinstance(st, dict):
            row["role"] = st.get("role")
            row["term"] = st.get("term")
        elif row["action"] in ("started", "running"):
            row["role"] = None
            row["error"] = f"not answering: {st}"
    n_started = sum(1 for r in rows.values() if r["action"] == "started")
    n_local = sum(1 for r in rows.values() if r["action"] != "remote")
    failed = [r for r in rows.values() if r["action"] == "failed"]
    result = {"nodes": list(rows.values()), "started": n_started, "leader": health.get("leader"),
              "term": health.get("term"), "quorum": health.get("quorum"), "tls": tls_info}
    if args.json:
        _print_json(result)
    else:
        lines = []
        for r in rows.values():
            what = {"started": "started", "running": "already running", "failed": "FAILED",
                    "remote": "remote", "skipped": "NOT STARTED"}[r["action"]]
            extra = r.get("error") or r.get("note") or ""
            lines.append([r["name"], r["address"], what,
                          f"pid {r['pid']}" if r["pid"] else "", r.get("role") or "",
                          extra or (f"log {r['log']}" if r.get("log") else "")])
        for ln in _table(lines):
            print(ln)
        if n_started == 0 and not failed and not any(r["action"] == "skipped" for r in rows.values()):
            print(f"nothing to start: all {n_local} local agents already run")
        if health.get("leader"):
            print(f"leader: {health['leader']} (term {health['term']})"
                  + ("" if health.get("quorum") else ", without a quorum"))
        else:
            print("leader: none")
    if failed:
        raise CliError(f"{', '.join(r['name'] for r in failed)} failed to start: "
                       f"{failed[0]['error']}")
    if not health.get("quorum"):
        raise CliError(f"no leader with a quorum within {args.wait_s:g}s "
                       f"({health.get('reachable', 0)} of {len(inv.nodes)} agents answer)")
    return EXIT_OK


def _cmd_console(args, inv) -> int:
    """Run the Textual console until the operator leaves it."""
    from console.app import RaftdeckApp
    from console.cluster import node_infos
    from console.procs import Processes

    ssl_ctx, role = _ssl(inv, args), _my_role(inv, args)
    procs = Processes(inv)  # local nodes by pid file, remote ones over SSH

    app = RaftdeckApp(node_infos(inv), inv.cluster.name,
                      {n.name: (n.host, n.port) for n in inv.nodes},
                      procs=procs, readonly=getattr(args, "readonly", False),
                      ssl=ssl_ctx, role=role, inventory=inv)
    app.run()
    return EXIT_OK


def _cmd_down(args, inv) -> int:
    from console.procs import LocalProcesses, is_local

    procs = LocalProcesses(inv)
    local = [n.name for n in inv.nodes if is_local(n)]
    res = procs.stop(local, timeout=args.grace_s)
    rows = []
    for n in inv.nodes:
        r = res.get(n.name, {"result": "remote", "pid": None})
        rows.append({"name": n.name, **r})
    if args.json:
        _print_json({"nodes": rows})
    else:
        text = {"stopped": "stopped", "killed": f"killed (still running {args.grace_s:g}s after SIGTERM)",
                "not_running": "not running", "stale": "not running (stale pid file removed)",
                "failed": "FAILED to stop", "remote": "remote: not managed here"}
        for ln in _table([[r["name"], text[r["result"]], f"pid {r['pid']}" if r["pid"] else ""]
                          for r in rows]):
            print(ln)
        if not any(r["result"] in ("stopped", "killed") for r in rows):
            print("nothing was running")
    bad = [r["name"] for r in rows if r["result"] == "failed"]
    if bad:
        raise CliError(f"could not stop {', '.join(bad)}")
    return EXIT_OK


# == status ======================================================================================


async def _cmd_status(args, inv) -> int:
    async with _client(inv, args, timeout=STATUS_TIMEOUT) as client:
        sts = await _statuses(client, inv.names)
    health = _health(inv, sts)
    procs = _process_states(inv)
    said = _last_words(inv, [n for n, st in procs.items() if st in ("stale", "stopped")
                             and not isinstance(sts[n], dict)])
    leader_commit = None
    if health["leader"] is not None:
        leader_commit = sts[health["leader"]].get("commit")
    nodes = []
    for n in inv.nodes:
        s = sts[n.name]
        row: dict[str, Any] = {"name": n.name, "address": _addr(n.host, n.port),
                               "reachable": isinstance(s, dict), "process": procs[n.name]}
        if isinstance(s, dict):
            load = s.get("load") or {}
            applied = s.get("applied", 0)
            base = leader_commit if leader_commit is not None else s.get("commit", 0)
            voters = s.get("voters")
            row.update(voter=n.name in voters if isinstance(voters, list) and voters else None)
            row.update(role=s.get("role"), term=s.get("term"), leader=s.get("leader"),
                       commit=s.get("commit"), applied=applied, lag=max(0, base - applied),
                       digest=s.get("digest"),
                       load={"running": load.get("running"), "queued": load.get("queued"),
                             "capacity": load.get("capacity", s.get("capacity"))},
                       faults=len(s.get("faults") or ()), fault_rules=s.get("faults") or [],
                       pid=s.get("pid"), uptime_s=s.get("uptime_s"),
                       cert=(s.get("security") or {}).get("cert"),
                       ca=[c.get("sha256") for c in (s.get("security") or {}).get("ca") or ()],
                       untrusted_closed=(s.get("security") or {}).get("untrusted_closed"),
                       disk=s.get("disk"), refused_peers=s.get("refused_peers") or {},
                       error=None)
        else:
            row.update(role=None, term=None, leader=None, commit=None, applied=None, lag=None,
                       digest=None, load=None, faults=None, fault_rules=None, cert=None,
                       disk=None, error=s, last_words=said.get(n.name) or None)
        nodes.append(row)
    tls = "on" if inv.cluster.tls is not None else "off"
    health["tls"] = tls == "on"
    health["refused_voters"] = refused_voters(sts)
    if args.json:
        _print_json({"nodes": nodes, "health": health})
    else:
        out = []
        for r in nodes:
            if r["reachable"]:
                ld = r["load"]
                state = "ok" if r["process"] != "paused" else "ok (paused?)"
                role = "learner" if r["role"] == "follower" and r.get("voter") is False else r["role"]
                out.append([r["name"], r["address"], role, r["term"], r["leader"] or "-",
                            r["commit"], r["applied"], r["lag"], (r["digest"] or "")[:8] or "-",
                            f"{_dash(ld['running'])}/{_dash(ld['queued'])}/{_dash(ld['capacity'])}",
                            r["faults"], state])
            else:
                proc = r["process"]
                hint = f" (process {proc})" if proc not in ("remote",) else ""
                if r.get("last_words"):
                    hint = f" (process {proc}; it said: {r['last_words']})"
                out.append([r["name"], r["address"], "-", "-", "-", "-", "-", "-", "-", "-", "-",
                            f"UNREACHABLE: {r['error']}{hint}"])
        for ln in _table(out, ["NODE", "ADDRESS", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED",
                               "LAG", "DIGEST", "LOAD", "FAULTS", "STATE"]):
            print(ln)
        print(_health_line(health))
        print(f"tls: {tls}" + (f" (as {_my_role(inv, args)})" if tls == "on" else
                               " (anyone who reaches a port may run any command)"))
        for ln in cert_lines(nodes, time.time()):
            print(ln)
        for ln in disk_lines(sts) + refused_lines(sts):
            print(ln)
    return EXIT_OK if health["quorum"] else EXIT_FAIL


def _when(ms) -> str | None:
    """Milliseconds since the epoch as UTC time."""
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def _dash(v) -> str:
    return "-" if v is None else str(v)


# == tasks =======================================================================================


def _task_args(kind: str, pairs: list[str]) -> dict:
    raw = dict(DEFAULT_ARGS.get(kind, {}))
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise CliError(f"--arg {p!r}: expected KEY=VALUE", EXIT_USAGE)
        raw[k] = v
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "ms":
            try:
                out[k] = int(v)
            except ValueError:
                raise CliError(f"--arg ms={v}: not an integer", EXIT_USAGE) from None
        elif k == "data":
            out[k] = v.encode()
        else:
            out[k] = v
    return out


def _task_line(r: dict) -> list[Any]:
    dur = None
    if r.get("finished_at") and r.get("submitted_at"):
        dur = f"{r['finished_at'] - r['submitted_at']}ms"
    output = r.get("error") or _jsonable(r.get("stdout") or b"").strip()
    output = " ".join(str(output).split())
    if len(output) > 60:
        output = output[:57] + "..."
    return [r["id"], r.get("kind"), r.get("state"), r.get("node") or "-", r.get("attempt"),
            _dash(r.get("exit_code")), dur or "-", output]


TASK_HEADER = ["ID", "KIND", "STATE", "NODE", "ATTEMPT", "EXIT", "TIME", "OUTPUT"]


async def _cmd_submit(args, inv) -> int:
    from nodeagent.state import CommandError, check_task_spec

    task_args = _task_args(args.kind, args.arg)
    specs = []
    for _ in range(args.count):
        spec = {"id": f"{args.id_prefix}{uuid.uuid4().hex}", "kind": args.kind,
                "args": task_args, "timeout_ms": args.timeout_ms}
        if args.max_attempts is not None:
            spec["max_attempts"] = args.max_attempts
        if args.policy:
            spec["policy"] = args.policy
        if args.key:
            spec["key"] = args.key
        specs.append(spec)
    try:
        check_task_spec({"max_attempts": 1, **specs[0]})
    except CommandError as e:
        raise CliError(f"bad task: {e}", EXIT_USAGE) from None
    ids = [s["id"] for s in specs]
    async with _Cluster(inv, args) as client:
        r = await client.submit(specs)
        refused = [(i, x) for i, x in zip(ids, r["results"]) if not x.get("ok")]
        records = None
        if args.wait and not refused:
            try:
                records = await client.wait(ids, timeout=args.wait_s)
            except TimeoutError as e:
                raise CliError(f"waiting for tasks: {e} (they keep running; see `raftdeck tasks`)")
    result = {"index": r["index"], "ids": ids,
              "results": [{"id": i, **x} for i, x in zip(ids, r["results"])]}
    if records is not None:
        result["tasks"] = records
    if args.json:
        _print_json(result)
    else:
        if records is None:
            for i, x in zip(ids, r["results"]):
                print(f"{i}  {'submitted' if x.get('ok') else 'REFUSED: ' + str(x.get('error'))}")
        else:
            for ln in _table([_task_line(rec) for rec in records], TASK_HEADER):
                print(ln)
            counts: dict[str, int] = {}
            for rec in records:
                counts[rec["state"]] = counts.get(rec["state"], 0) + 1
            print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if refused:
        i, x = refused[0]
        raise CliError(f"{len(refused)} of {len(ids)} tasks refused; {i}: {x.get('error')}"
                       + (f" ({x['detail']})" if x.get("detail") else ""))
    if records is not None and any(rec["state"] != "succeeded" for rec in records):
        bad = [rec for rec in records if rec["state"] != "succeeded"]
        raise CliError(f"{len(bad)} of {len(records)} tasks did not succeed "
                       f"(first: {bad[0]['id']} {bad[0]['state']})")
    return EXIT_OK


async def _cmd_tasks(args, inv) -> int:
    if args.node:
        _node(inv, args.node)
    async with _Cluster(inv, args) as client:
        recs = await client.tasks(state=args.state, node=args.node, limit=args.limit,
                                  after=args.after)
    if args.json:
        _print_json(recs)
    else:
        for ln in _table([_task_line(r) for r in recs], TASK_HEADER):
            print(ln)
        if not recs:
            print("no tasks")
    return EXIT_OK


async def _cmd_task(args, inv) -> int:
    async with _Cluster(inv, args) as client:
        rec = await client.task(args.id)
    if rec is None:
        raise CliError(f"no task {args.id!r}")
    if args.json:
        _print_json(rec)
        return EXIT_OK
    for k in ("id", "kind", "args", "state", "node", "attempt", "max_attempts", "timeout_ms",
              "policy", "key", "exit_code", "error", "submitted_at", "finished_at",
              "submitted_by"):
        if k in rec:
            v = rec[k]
            if k.endswith("_at"):
                v = _when(v)
            elif isinstance(v, dict):
                v = json.dumps(_jsonable(v))
            print(f"{k + ':':14}{_dash(v)}")
    for a in rec.get("attempts") or ():
        print(f"{'attempt ' + str(a.get('attempt')) + ':':14}on {a.get('node')}, "
              f"{a.get('outcome') or 'in progress'} (assigned {_when(a.get('assigned_at'))}, "
              f"finished {_when(a.get('finished_at'))})")
    for k in ("stdout", "stderr"):
        if rec.get(k):
            print(f"{k}:")
            print(_jsonable(rec[k]).rstrip("\n"))
    return EXIT_OK


async def _cmd_cancel(args, inv) -> int:
    async with _Cluster(inv, args) as client:
        rec = await client.cancel(args.id)
    if args.json:
        _print_json(rec)
    else:
        state = rec.get("state") if isinstance(rec, dict) else None
        print(f"{args.id}: {state or 'cancelled'}")
    return EXIT_OK


# == process control =============================================================================


async def _cmd_signal(args, inv) -> int:
    from console.procs import LocalProcesses, is_local

    verb = args.command
    if verb == "reload":
        if bool(args.node) == bool(args.all):
            raise CliError("reload: name the nodes, or give --all", EXIT_USAGE)
        nodes = list(inv.nodes) if args.all else [_node(inv, n) for n in args.node]
    else:
        node = _node(inv, args.node)
    # Process actions are admin's, local or over SSH (the agent cannot check a signal).
    role = _my_role(inv, args)
    if role is not None and role != "admin":
        raise CliError(f"forbidden: {verb} needs the admin role; this certificate is {role} "
                       "(use --role admin)")
    if verb == "reload":
        return await _reload_all(args, inv, nodes)
    if not is_local(node):  # over SSH
        from console.deploy import remote_signal_command

        return await remote_signal_command(args, inv, node)
    procs = LocalProcesses(inv)
    result: dict[str, Any] = {"name": node.name, "action": verb}
    if verb == "kill":
        result["pid"] = procs.kill(node.name)
        text = f"{node.name} killed (pid {result['pid']})"
    elif verb == "pause":
        result["pid"] = procs.pause(node.name)
        text = f"{node.name} paused (pid {result['pid']}); `raftdeck resume {node.name}` continues it"
    elif verb == "resume":
        result["pid"] = procs.resume(node.name)
        text = f"{node.name} resumed (pid {result['pid']})"
    else:
        old = procs.process(node)
        result["old_pid"] = procs.kill(node.name) if old.alive else None
        if old.state == "stale":
            procs.remove_pid_file(node)
        r = procs.start(node)
        result["pid"] = r.pid
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.wait_s
        async with _client(inv, args, timeout=1.0) as client:
            while True:
                if not procs.process(node).alive:
                    rc = procs.exit_code(r.pid)
                    procs.remove_pid_file(node)
                    tail = procs.stderr_tail(node, r.stderr_offset)
                    raise CliError(f"{node.name} exited right after the restart"
                                   f"{f' with code {rc}' if rc is not None else ''}: "
                                   f"{tail or 'see ' + str(r.stderr)}")
                st = (await _statuses(client, [node.name], per_agent=1.0))[node.name]
                if isinstance(st, dict):
                    result.update(role=st.get("role"), term=st.get("term"))
                    break
                if loop.time() >= deadline:
                    raise CliError(f"{node.name} restarted (pid {r.pid}) but does not answer "
                                   f"after {args.wait_s:g}s: {st}")
                await asyncio.sleep(0.1)
        was = f"pid {result['old_pid']} -> " if result["old_pid"] else "was not running; "
        text = f"{node.name} restarted ({was}pid {r.pid}), answering as {result['role']}"
    if args.json:
        _print_json(result)
    else:
        print(text)
    return EXIT_OK


async def _reload_all(args, inv, nodes) -> int:
    """`raftdeck reload NODE...`: each in turn; a node that fails does not stop the rest."""
    from console.procs import ProcError

    results, failed = [], False
    for node in nodes:
        try:
            result = await _reload(args, inv, node)
        except (CliError, ProcError) as e:  # ProcError: a local node without its pid file
            if len(nodes) == 1:
                raise
            failed = True
            results.append({"name": node.name, "action": "reload", "error": str(e)})
            if not args.json:
                print(f"{node.name}: {e}", file=sys.stderr)
            continue
        results.append(result)
        if not args.json:
            print(f"{node.name} reloaded its TLS files (pid {result['pid']}): certificate "
                  f"{str(result['sha256'])[:16]}, valid until {str(result['not_after'])[:10]}"
                  + ("" if result["changed"] else " (the same certificate as before)"))
    if args.json:
        _print_json(results[0] if len(nodes) == 1 else results)
    return EXIT_FAIL if failed else EXIT_OK


async def _reload(args, inv, node) -> dict:
    """SIGHUP one agent (by the pid file, locally or over SSH), then wait until its status
    counts the reload, or its refusal (CliError). The result, for `_reload_all`."""
    from console.deploy import reload_outcome
    from console.procs import LocalProcesses, is_local

    if inv.cluster.tls is None:
        raise CliError("TLS is off in this inventory: an agent has no TLS files to reload")
    async with _client(inv, args, timeout=2.0) as client:
        st = (await _statuses(client, [node.name]))[node.name]
        if not isinstance(st, dict):
            raise CliError(f"{node.name} does not answer, so a reload could not be checked: {st}")
        before = (st.get("security") or {}).get("cert")
        if not isinstance(before, dict) or "reload_failures" not in before:
            raise CliError(f"{node.name}'s agent reports no reloadable certificate (TLS off in "
                           "its config, or a version before reloads): restart it instead")
        if is_local(node):  # a node that is not running: ProcError, its own exit code
            pid = LocalProcesses(inv).signal(node.name, signal.SIGHUP)
        else:
            from console.deploy import Deployer, HostError, _client_ssl, ssh_options_from

            d = Deployer(inv, ssh=ssh_options_from(args), client_ssl=_client_ssl(inv, args))
            try:
                pid = await d.signal(node, "HUP")
            except HostError as e:
                raise CliError(str(e)) from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15.0
        while True:
            st = (await _statuses(client, [node.name], per_agent=1.0))[node.name]
            cert = ((st.get("security") or {}).get("cert") or {}) if isinstance(st, dict) else {}
            outcome = reload_outcome(before, cert)
            if outcome == "refused":
                raise CliError(f"{node.name} refused the TLS files and keeps its certificate: "
                               f"{cert.get('reload_error')}")
            if outcome == "reloaded":
                break
            if loop.time() >= deadline:
                raise CliError(f"{node.name} (pid {pid}) got SIGHUP but reported no reload "
                               f"within 15s; see `raftdeck logs {node.name}`")
            await asyncio.sleep(0.1)
    return {"name": node.name, "action": "reload", "pid": pid, "sha256": cert.get("sha256"),
            "not_after": cert.get("not_after"), "changed": cert.get("sha256") != before.get("sha256")}


# == faults ======================================================================================


async def _cmd_partition(args, inv) -> int:
    if args.shape == "isolate":
        n = _node(inv, args.node).name
        rules = [{"from": [n], "to": None}, {"from": None, "to": [n]}]
    elif args.shape == "split":
        a, b = _names(inv, args.a), _names(inv, args.b)
        if set(a) & set(b):
            raise CliError(f"split: {', '.join(sorted(set(a) & set(b)))} in both groups", EXIT_USAGE)
        rules = [{"from": a, "to": b}, {"from": b, "to": a}]
    else:
        a, b = _names(inv, args.a), _names(inv, args.b)
        rules = [{"from": a, "to": b}]
    for r in rules:
        r["action"] = "partition"
        if args.duration_ms:
            r["duration_ms"] = args.duration_ms
    per_node = await _on_every_agent(inv, args, "fault", rules)
    ok = [n for n, e in per_node.items() if e is None]
    if not ok:
        _all_forbidden(per_node)
    result = {"rules": rules, "nodes": [{"name": n, "ok": e is None, "error": e}
                                        for n, e in per_node.items()]}
    if args.json:
        _print_json(result)
    else:
        for r in rules:
            dur = f" for {r['duration_ms']} ms" if r.get("duration_ms") else " until healed"
            print(f"injected: partition {_group(r['from'])} -> {_group(r['to'])}{dur}")
        for ln in _table([[n, "ok" if e is None else f"NOT INJECTED: {e}"]
                          for n, e in per_node.items()]):
            print("  " + ln)
    if not ok:
        _all_forbidden(per_node)
        raise CliError("no agent accepted the fault (none reachable?)")
    return EXIT_OK


def _group(names) -> str:
    return "*" if names is None else ",".join(names)


async def _cmd_chaos(args, inv) -> int:
    from console import chaos

    return await chaos.main(args)


async def _cmd_heal(args, inv) -> int:
    per_node = await _on_every_agent(inv, args, "heal", [{}])
    if args.json:
        _print_json({"nodes": [{"name": n, "ok": e is None, "error": e}
                               for n, e in per_node.items()]})
    else:
        for ln in _table([[n, "healed" if e is None else f"NOT HEALED: {e}"]
                          for n, e in per_node.items()]):
            print(ln)
    if not any(e is None for e in per_node.values()):
        _all_forbidden(per_node)
        raise CliError("no agent could be healed (none reachable?)")
    return EXIT_OK


def _all_forbidden(per_node: dict[str, str | None]) -> None:
    errors = [e for e in per_node.values() if e]
    if errors and all(e.startswith("forbidden:") for e in errors):
        raise CliError(errors[0])


async def _on_every_agent(inv, args, type_: str, requests: list[dict]) -> dict[str, str | None]:
    """Send each request to every agent in parallel; name -> None (all done) or the error."""
    from console.client import ConnectionFailed, OutcomeUnknown, RequestError

    async with _client(inv, args, timeout=STATUS_TIMEOUT) as client:
        async def one(n: str):
            try:
                for req in requests:
                    await asyncio.wait_for(client.call(n, type_, **req), STATUS_TIMEOUT * 2 + 0.5)
                return n, None
            except asyncio.TimeoutError:
                return n, "no answer"
            except RequestError as e:
                return n, f"{e.code}: {e.message}"
            except (ConnectionFailed, OutcomeUnknown, OSError) as e:
                return n, _short_error(n, e)

        return dict(await asyncio.gather(*(one(n) for n in inv.names)))


async def _cmd_transfer(args, inv) -> int:
    node = _node(inv, args.node).name
    loop = asyncio.get_running_loop()
    async with _Cluster(inv, args) as client:
        await client.transfer(node)
        deadline = loop.time() + 10.0
        seen = None
        while loop.time() < deadline:
            st = (await _statuses(client, [node], per_agent=1.0))[node]
            if isinstance(st, dict) and st.get("role") == "leader":
                seen = st.get("term")
                break
            await asyncio.sleep(0.05)
    if seen is None:
        raise CliError(f"transfer to {node} started, but it did not become leader within 10s")
    if args.json:
        _print_json({"leader": node, "term": seen})
    else:
        print(f"{node} leads (term {seen})")
    return EXIT_OK


# == membership ==================================================================================


async def _membership(client) -> tuple[str, dict]:
    """The leader and its status (voters, learners, commit)."""
    leader = await client.find_leader()
    if leader is None:
        raise CliError("no leader: a membership change needs one (`raftdeck status`)")
    return leader, await client.call(leader, "status")


async def _ask_add(client, leader: str, node, *, learner: bool):
    """The leader's add_node request for an inventory node: as a learner, or a voter."""
    return await client.call(leader, "add_node", node=node.name, host=node.host,
                             port=node.port, priority=node.priority, learner=learner)


async def _cmd_add_node(args, inv) -> int:
    from console.procs import LocalProcesses, ProcError, is_local

    node = _node(inv, args.node)
    remote = not is_local(node)
    if inv.cluster.tls is not None and inv.cluster.tls.dir is not None:
        _init(inv, inv.cluster.tls.dir)  # its node certificate, if new
    want_voter = node.role == "voter" and not args.learner
    done: list[str] = []
    loop = asyncio.get_running_loop()
    async with _Cluster(inv, args) as client:
        leader, st = await _membership(client)
        members = _members_of([st])
        if node.name not in members:
            try:
                await _ask_add(client, leader, node, learner=True)
            except Exception as e:
                raise CliError(f"the leader {leader} refused to add {node.name}: {e}") from None
            done.append("added as a learner")
        procs = None if remote else LocalProcesses(inv)
        if remote:
            from console.deploy import deploy_joining

            r = await deploy_joining(args, inv, node)
            if r.action != "unchanged":
                done.append(f"{r.action} on {node.ssh.host} (--join)")
        elif not procs.process(node).alive:
            try:
                procs.start(node, join=True)
            except ProcError as e:
                raise CliError(f"{node.name}: {e}") from None
            done.append("started (--join)")
        # Caught up: it has applied what the leader had committed when we looked.
        target = (await client.call(leader, "status"))["commit"]
        deadline = loop.time() + args.wait_s
        applied = None
        while loop.time() < deadline:
            s = (await _statuses(client, [node.name], per_agent=1.0))[node.name]
            applied = s.get("applied") if isinstance(s, dict) else None
            if applied is not None and applied >= target:
                break
            if procs is not None and not procs.process(node).alive:
                said = procs.last_words(node)
                raise CliError(f"{node.name}'s agent exited" + (f": {said}" if said else ""))
            await asyncio.sleep(0.1)
        else:
            raise CliError(f"{node.name} did not catch up within {args.wait_s:g}s "
                           f"(applied {applied}, the leader's commit was {target}); see "
                           f"`raftdeck status` and `raftdeck logs {node.name}`")
        leader, st = await _membership(client)
        if want_voter and node.name not in (st.get("voters") or ()):
            while True:  # refused while it lags (learner_promotion_lag): try again
                try:
                    await _ask_add(client, leader, node, learner=False)
                    break
                except Exception as e:
                    if loop.time() > deadline:
                        raise CliError(f"the leader {leader} refused to make {node.name} a "
                                       f"voter: {e}") from None
                    await asyncio.sleep(0.2)
                    leader, _ = await _membership(client)
            done.append("made a voter")
        leader, st = await _membership(client)
    role = "voter" if node.name in (st.get("voters") or ()) else "learner"
    if args.json:
        _print_json({"node": node.name, "role": role, "done": done, "leader": leader,
                     "voters": st.get("voters"), "learners": st.get("learners")})
    else:
        print(f"{node.name}: {', '.join(done) or 'already a member and running'}; now a {role} "
              f"(voters: {', '.join(st.get('voters') or ())}"
              + (f"; learners: {', '.join(st['learners'])}" if st.get("learners") else "") + ")")
    return EXIT_OK


async def _cmd_remove_node(args, inv) -> int:
    from console.procs import LocalProcesses, NotRunning, is_local

    node = _node(inv, args.node)
    loop = asyncio.get_running_loop()
    async with _Cluster(inv, args) as client:
        leader, st = await _membership(client)
        members = _members_of([st])
        if node.name not in members:
            raise CliError(f"{node.name} is not a member of the running cluster "
                           f"(voters: {', '.join(st.get('voters') or ())})")
        if leader == node.name:
            others = [n for n in (st.get("voters") or ()) if n != node.name]
            if not others:
                raise CliError(f"{node.name} is the only voter: the cluster cannot remove it")
            await client.transfer(others[0])
            deadline = loop.time() + 10.0
            while leader == node.name and loop.time() < deadline:
                await asyncio.sleep(0.1)
                leader = await client.find_leader() or node.name
            if leader == node.name:
                raise CliError(f"{node.name} leads and did not hand leadership on within 10s")
        try:
            index = (await client.call(leader, "remove_node", node=node.name))["index"]
        except Exception as e:
            raise CliError(f"the leader {leader} refused to remove {node.name}: {e}") from None
        rest = [n for n in members if n != node.name]
        deadline = loop.time() + 30.0
        while loop.time() < deadline:
            sts = await _statuses(client, rest, per_agent=1.0)
            if all(isinstance(s, dict) and s.get("applied", 0) >= index for s in sts.values()):
                break
            await asyncio.sleep(0.1)
    stopped = False
    if is_local(node):
        try:
            LocalProcesses(inv).kill(node.name)
            stopped = True
        except NotRunning:
            pass
    else:
        from console.deploy import Deployer, HostError, ssh_options_from

        try:
            stopped = await Deployer(inv, ssh=ssh_options_from(args)).stop(node) is not None
        except (HostError, OSError) as e:
            raise CliError(f"{node.name} removed (entry {index}), but its agent was not "
                           f"stopped: {e}; `raftdeck kill {node.name}` stops it") from None
    if args.json:
        _print_json({"node": node.name, "removed_at": index, "stopped": stopped})
    else:
        print(f"{node.name} removed (entry {index})"
              + ("; its agent stopped" if stopped else "")
              + f"; take it out of {inv.path.name}, or empty its data directory and "
                f"`raftdeck add-node {node.name}` to bring it back")
    return EXIT_OK


# == backup and restore ==========================================================================


async def _cmd_backup(args, inv) -> int:
    from console import backup

    path = Path(args.file)
    if not path.parent.is_dir():
        raise CliError(f"{path.parent} is not a directory: where should {path.name} go?", EXIT_USAGE)
    if args.stale and not args.node:
        raise CliError("--stale needs --node: the replica whose applied state to save", EXIT_USAGE)
    async with _Cluster(inv, args) as client:
        node = _node(inv, args.node).name if args.node else await client.find_leader()
        if node is None:
            raise CliError("no leader to take a backup from (`raftdeck status`); with no "
                           "quorum left, `--node N --stale` saves what replica N has applied")
        try:
            b = await backup.fetch(client, node, stale=args.stale)
        except backup.BackupError as e:
            raise CliError(str(e)) from None
    try:
        backup.write_file(path, backup.encode(b))
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None
    if args.json:
        _print_json({**b.meta(), "file": str(path)})
    else:
        print(f"backup of cluster {b.cluster} from {b.node} at index {b.index} (term {b.term}), "
              f"{b.size:,} bytes, sha256 {b.sha256[:16]}... -> {path}")
    return EXIT_OK


async def _cmd_restore(args, inv) -> int:
    from console import backup
    from console.procs import LocalProcesses, is_local
    from nodeagent.agent import initial_conf

    try:
        blob = Path(args.file).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {args.file}: {e.strerror or e}", EXIT_USAGE) from None
    try:
        b = backup.decode(blob, args.file)
    except backup.BackupError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    conf = initial_conf(inv.agent_config(inv.nodes[0].name))
    try:
        sm = backup.load(b)
        info = backup.describe(b, sm) if args.check else None  # before the membership changes
        state = backup.restored_state(b, conf, sm)
    except backup.BackupError as e:
        raise CliError(f"{args.file}: {e}") from None
    # Every node is checked before anything is written anywhere.
    procs = LocalProcesses(inv)
    local = {n.name: procs.data_dir(n) for n in inv.nodes if is_local(n)}
    remote = [n for n in inv.nodes if not is_local(n)]
    problems = []
    for n in (n for n in inv.nodes if n.name in local):
        proc, d = procs.process(n), local[n.name]
        if proc.alive or procs.port_in_use(n):
            problems.append(f"{n.name}'s agent is running (or something answers on "
                            f"{_addr(n.host, n.port)}): `raftdeck down` first")
        elif d.exists() and any(d.iterdir()):
            problems.append(f"{n.name}'s data directory {d} is not empty: move it aside (a "
                            "restore starts every node from the backup) and run again")
    deployer = None
    if remote:
        from console.deploy import Deployer, HostError, ssh_options_from

        deployer = Deployer(inv, ssh=ssh_options_from(args))

        async def check(n):
            try:
                r = await deployer.data_dir_state(n)
            except HostError as e:
                return str(e)
            if r["state"] in ("running", "paused"):
                return (f"{n.name}'s agent is running on {n.ssh.host} (pid {r['pid']}): "
                        f"`raftdeck kill {n.name}` first")
            if r["data"] not in ("absent", "empty"):
                return (f"{n.name}'s data directory {r['where']} is not empty: move it aside "
                        "on the host (a restore starts every node from the backup) and run again")
            return None

        problems += [p for p in await asyncio.gather(*(check(n) for n in remote)) if p]
    if args.check:
        return _restore_check(args, inv, info, problems)
    if problems:
        raise CliError("; ".join(problems))
    for name, d in local.items():
        try:
            backup.restore_into(d, b, conf, state)
        except OSError as e:
            raise CliError(f"{name}: cannot write {d}: {e}") from None
    results = {}
    if remote:
        with tempfile.TemporaryDirectory(prefix="raftdeck-restore-") as tmp:
            prepared = {n.name: Path(tmp) / n.name for n in remote}
            for d in prepared.values():
                backup.restore_into(d, b, conf, state)  # each its own data id
            results = await deployer.restore(prepared)
    failed = sorted(name for name, r in results.items() if not r.ok)
    done = sorted([*local, *(name for name, r in results.items() if r.ok)])
    if args.json:
        _print_json({**b.meta(), "nodes": done, "failed": {name: results[name].message
                                                           for name in failed},
                     "voters": sorted(conf.voters), "learners": sorted(conf.learners)})
    else:
        other = "" if b.cluster == inv.cluster.name else f" (taken from cluster {b.cluster})"
        start = " and ".join(x for x in ("`raftdeck up`" if local else "",
                                          "`raftdeck deploy`" if remote else "") if x)
        if done:
            print(f"restored index {b.index} (term {b.term}){other} into {len(done)} data "
                  f"directories: {', '.join(done)}; voters {', '.join(sorted(conf.voters))}."
                  + ("" if failed else f" Start them with {start}."))
    if failed:
        raise CliError(f"restore failed on {', '.join(failed)}: "
                       + "; ".join(results[name].message for name in failed)
                       + (f". Move the restored directories of {', '.join(done)} aside too "
                          "(nothing was started from them) and run again" if done else ""))
    return EXIT_OK


def _restore_check(args, inv, info: dict, problems: list[str]) -> int:
    """`raftdeck restore FILE --check`: what the backup holds (``backup.describe``), and
    whether the restore would go ahead; nothing is written."""
    if args.json:
        _print_json({**info, "file": args.file, "ready": not problems, "problems": problems})
    else:
        taken = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["taken_at_ms"] / 1000))
        tasks = ", ".join(f"{v:,} {k}" for k, v in info["tasks"].items()) or "none"
        print(f"{args.file}: backup of cluster {info['cluster']} from {info['node']} at index "
              f"{info['index']} (term {info['term']}), taken {taken}")
        print(f"  {info['size']:,} bytes, sha256 {info['sha256']} (checked)")
        print(f"  {info['keys']:,} keys, {info['sessions']:,} client sessions, tasks: {tasks}; "
              f"digest {info['digest'][:12]}")
        print(f"  taken under voters {', '.join(info['voters'])}"
              + (f", learners {', '.join(info['learners'])}" if info["learners"] else "")
              + f"; a restore gives {', '.join(n.name for n in inv.nodes)} the inventory's "
              "membership")
        print("ready: every node is stopped with an empty or absent data directory"
              if not problems else "not ready: " + "; ".join(problems))
    if problems:
        raise CliError("a restore would be refused now (see above); nothing was written")
    return EXIT_OK


# == KV ==========================================================================================


async def _cmd_put(args, inv) -> int:
    return await _kv_write(args, inv, "written", lambda c: c.put(args.key, args.value.encode()))


async def _kv_write(args, inv, done: str, write) -> int:
    """A write through the leader that answers with its log index."""
    async with _Cluster(inv, args) as client:
        index = await write(client)
    if args.json:
        _print_json({"key": args.key, "index": index})
    else:
        print(f"{args.key}: {done} at index {index}")
    return EXIT_OK


async def _cmd_get(args, inv) -> int:
    if args.node and not args.stale:
        raise CliError("--node needs --stale (a linearizable read goes through the leader)",
                       EXIT_USAGE)
    node = _node(inv, args.node).name if args.node else None
    async with _Cluster(inv, args) as client:
        value = await client.get(args.key, "stale" if args.stale else "linearizable", node=node)
    if args.json:
        _print_json({"key": args.key, "found": value is not None,
                     "value": None if value is None else _jsonable(value)})
    elif value is not None:
        print(_jsonable(value))
    if value is None:
        raise CliError(f"key {args.key!r} not found")
    return EXIT_OK


async def _cmd_delete(args, inv) -> int:
    return await _kv_write(args, inv, "deleted", lambda c: c.delete(args.key))


async def _cmd_cas(args, inv) -> int:
    expected = None if args.absent else args.expect.encode()
    async with _Cluster(inv, args) as client:
        swapped, value = await client.cas(args.key, expected, args.value.encode())
    now = None if value is None else _jsonable(value)
    if args.json:
        _print_json({"key": args.key, "swapped": swapped, "value": now})
    elif swapped:
        print(f"{args.key}: swapped")
    if not swapped:
        held = "is absent" if value is None else f"holds {now!r}"
        raise CliError(f"{args.key}: not swapped; it {held}")
    return EXIT_OK


async def _cmd_keys(args, inv) -> int:
    if not 1 <= args.limit <= 1_000_000:
        raise CliError("--limit must be between 1 and 1000000", EXIT_USAGE)
    node = _node(inv, args.node).name if args.node else None
    async with _Cluster(inv, args) as client:
        if node is None:
            node = await client.find_leader()
            if node is None:
                raise CliError("no node says it leads now; list one replica's keys with --node N")
        r = await client.dump(node, limit=args.limit, prefix=args.prefix, after=args.after)
    pairs = list(r["kv"].items())
    if args.json:
        _print_json({"node": node, "applied": r["applied"], "truncated": r["truncated"],
                     "keys": {k: _jsonable(v) for k, v in pairs} if args.values else [k for k, _ in pairs]})
        return EXIT_OK
    for k, v in pairs:
        print(f"{k} = {_jsonable(v)}" if args.values else k)
    if r["truncated"] and not pairs:
        print("raftdeck: the next key's value is over 3 MiB, too large to list; read it with "
              "`raftdeck get`", file=sys.stderr)
    elif r["truncated"]:
        print(f"raftdeck: the listing stopped early (--limit {args.limit}, or about 3 MiB); "
              f"the next page: --after {shlex.quote(pairs[-1][0])}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    # `python -m console.cli`: run the module's importable copy, so that the exception
    # classes other modules import from console.cli are the ones main() catches
    from console.cli import main as _main

    sys.exit(_main())
