"""`nodeagent` command line.

One sub-command per verb; each is a ``_cmd_<verb>(args) -> int`` set as the sub-parser's
``func``. Exit codes: 0 success, 2 bad usage or bad configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

EXIT_OK = 0
EXIT_CONFIG = 2  # argparse uses 2 for usage errors too


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodeagent", description="raftdeck node agent")
    parser.add_argument("--version", action="version", version="nodeagent 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "check-inventory",
        help="validate an inventory file and summarise its nodes",
        description="Load and validate an inventory; print a summary line for the cluster, "
        "then one line per node (warnings on stderr). "
        "On a problem, print it as one line (file:line: field: problem; fix) and exit 2.",
    )
    p.add_argument("path", metavar="PATH", nargs="?", default="inventory.yaml", help="default: inventory.yaml")
    p.set_defaults(func=_cmd_check_inventory)

    p = sub.add_parser(
        "run",
        help="run one agent (one Raft node) until interrupted",
        description="Run the agent for one node: recover its data directory, connect to its "
        "peers, listen for peers and clients. Give an inventory and a node name, or a "
        "single-node config file. Logs are JSON lines on stderr, or in --log-file, else in the "
        "node's log_file setting if it has one. SIGTERM "
        "or SIGINT stops it; SIGHUP rereads its TLS files (certificate rotation).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--inventory", metavar="PATH", help="inventory file (with --name)")
    src.add_argument("--config", metavar="PATH", help="single-node config file")
    p.add_argument("--name", help="this node's name in the inventory")
    p.add_argument("--log-file", metavar="PATH",
                   help="append JSON logs here (default: the node's log_file, else stderr)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--join", action="store_true",
                   help="this node joins a running cluster (after `raftdeck add-node`, or an "
                        "add_node request): with an empty data directory, learn the membership "
                        "from the leader instead of writing the inventory's as the log's first "
                        "entry. Ignored once the data directory holds a log")
    p.set_defaults(func=_cmd_run)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_OK
    return args.func(args)


def _cmd_check_inventory(args: argparse.Namespace) -> int:
    from nodeagent.config import ConfigError, load_inventory

    try:
        inv = load_inventory(args.path)
    except ConfigError as e:
        print(e, file=sys.stderr)  # file:line: first, so editors can jump to it
        return EXIT_CONFIG
    c = inv.cluster
    print(
        f"{args.path}: cluster {c.name}: {len(inv.nodes)} nodes "
        f"({len(inv.voters)} voters, {len(inv.learners)} learners), "
        f"heartbeat {c.heartbeat_interval_ms} ms, election {c.election_timeout_ms} ms, "
        f"dispatch {c.dispatch_policy}, tls {'on' if c.tls else 'off'}, fsync {'on' if c.fsync else 'off'}"
    )
    name_w = max(len(n.name) for n in inv.nodes)
    addr_w = max(len(_addr(n.host, n.port)) for n in inv.nodes)
    for n in inv.nodes:
        extra = []
        if n.metrics_port is not None:
            extra.append(f"metrics={n.metrics_port}")
        if n.allow_shell:
            extra.append("shell")
        if n.ssh is not None:
            user = f"{n.ssh.user}@" if n.ssh.user else ""
            extra.append(f"ssh={user}{_addr(n.ssh.host, n.ssh.port)}")
        print(
            f"  {n.name:<{name_w}}  {_addr(n.host, n.port):<{addr_w}}  {n.role:<7}  "
            f"priority={n.priority}  capacity={n.capacity}  data_dir={n.data_dir}"
            + "".join(f"  {x}" for x in extra)
        )
    for w in inv.warnings():
        print(f"nodeagent: warning: {w}", file=sys.stderr)
    return EXIT_OK


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"




EXIT_STORAGE = 3  # the data directory is damaged, full or failing: the agent does not start, or stops


def _operator_error(exc: BaseException):
    """The error in ``exc`` (trio wraps what ends a nursery in exception groups, nested,
    and the other tasks' errors while they unwind may be beside it) that has an
    operator's explanation: the storage failing or a port that cannot be bound."""
    from nodeagent.agent import ListenError
    from nodeagent.storage import StorageFailed

    if isinstance(exc, (StorageFailed, ListenError)):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            found = _operator_error(e)
            if found is not None:
                return found
    return None


def _cmd_run(args: argparse.Namespace) -> int:
    import signal

    # SIGHUP's default action ends the process. Until the agent's own receiver is up
    # (after the imports and the recovery, which can take seconds), a reload sent to an
    # agent that is still starting (the chaos ca nemesis right after a restart, an
    # operator's kill -HUP) would end it: note it instead, and reload once the receiver
    # is there.
    early_hup: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: early_hup.append(signum))
    # Whoever started us may have blocked it until now (console/procs.py, sighup_held):
    # one that arrived meanwhile is delivered here, to the handler above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    delay = os.environ.get("RAFTDECK_TEST_START_DELAY_S")
    if delay:  # tests only: a start as slow as a long recovery, to signal an agent in it
        print("nodeagent run: RAFTDECK_TEST_START_DELAY_S: starting slowly", file=sys.stderr,
              flush=True)
        time.sleep(float(delay))

    from nodeagent.config import ConfigError, load_inventory, load_node_config

    try:
        if args.inventory:
            if not args.name:
                print("nodeagent run: --inventory needs --name NODE", file=sys.stderr)
                return EXIT_CONFIG
            inv = load_inventory(args.inventory)
            if args.name not in inv:
                print(f"nodeagent run: {args.inventory}: no node named {args.name!r} "
                      f"(nodes: {', '.join(inv.names)})", file=sys.stderr)
                return EXIT_CONFIG
            cfg = inv.agent_config(args.name)
        else:
            cfg = load_node_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG

    import trio

    from nodeagent.agent import Agent
    from nodeagent.libc import release_free_memory, share_one_malloc_arena
    from nodeagent.logs import setup_logging
    from nodeagent.security import TLSError
    from nodeagent.storage import (StorageCorruption, StorageFailed, StorageLocked,
                                   io_error_advice)

    log_file = args.log_file or (str(cfg.node.log_file) if cfg.node.log_file else None)
    try:
        setup_logging(cfg.node.name, level=args.log_level, file=log_file)
    except (OSError, ValueError) as e:
        print(f"nodeagent run: cannot open the log file {log_file}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    import logging

    log = logging.getLogger("nodeagent")
    share_one_malloc_arena()  # before trio's worker threads exist (see nodeagent/libc.py)
    agent = Agent(cfg, join=args.join)
    try:
        agent.recover()
    except StorageCorruption as e:
        print(f"nodeagent run: node {cfg.node.name}: {e}", file=sys.stderr)
        return EXIT_STORAGE
    except StorageLocked as e:
        print(f"nodeagent run: node {cfg.node.name}: {e}", file=sys.stderr)
        return EXIT_STORAGE
    except TLSError as e:
        print(f"nodeagent run: node {cfg.node.name}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StorageFailed as e:
        print(f"nodeagent run: node {cfg.node.name}: cannot recover its log: {e}",
              file=sys.stderr)
        return EXIT_STORAGE
    except OSError as e:
        print(f"nodeagent run: node {cfg.node.name}: cannot use the data directory: "
              f"{io_error_advice(str(cfg.node.data_dir), e)}", file=sys.stderr)
        return EXIT_STORAGE
    # Compiling the imports (no .pyc files where bytecode is not written), reading the
    # inventory and recovering leave megabytes free in the C heap that nothing reuses
    # soon: Python's small objects come from arenas of their own. Hand them back.
    release_free_memory()

    async def main_task() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(agent.run)
                if early_hup:  # files may have changed since recover() read them
                    log.info("SIGHUP arrived while starting: reloading the TLS files now")
                    nursery.start_soon(agent.reload_tls)
                async for signum in signals:
                    if signum == signal.SIGHUP:  # reread the TLS files (Agent.reload_tls)
                        nursery.start_soon(agent.reload_tls)
                        continue
                    log.info("stopping on signal")
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main_task)
    except BaseException as exc:
        stop = _operator_error(exc)
        if stop is None:
            raise
        if isinstance(stop, StorageFailed):
            log.error("stopping: the storage failed", extra={"data_dir": stop.data_dir,
                                                              "errno": stop.errno})
            print(f"nodeagent run: node {cfg.node.name} stopped: cannot write its log: {stop} "
                  "(what it acknowledged was fsynced before; the other nodes go on without "
                  "it, and it catches up when started again)", file=sys.stderr)
            return EXIT_STORAGE
        print(f"nodeagent run: node {cfg.node.name}: {stop}", file=sys.stderr)
        return 1
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
