"""The child-process side of ``nodeagent.executor``: run one built-in task, then exit.

    python -P /path/to/nodeagent/taskrunner.py <kind>     (args: one msgpack map on stdin)

The executor starts this file by path (not ``-m nodeagent.taskrunner``) so the child does
not depend on how, or whether, the ``nodeagent`` package is importable from its working
directory; ``-P`` keeps the script's directory off ``sys.path``. It therefore imports
nothing from ``nodeagent``: only the standard library and msgpack (an agent dependency).
It also works as ``python -m nodeagent.taskrunner <kind>`` when the package is importable.

Kinds (the executor has already validated the args; this checks them again, cheaply):

* ``sleep`` ``{ms}``: sleep ``ms`` milliseconds of wall-clock time.
* ``cpu``   ``{ms}``: burn ``ms`` milliseconds of this process's CPU time (a busy loop
  that watches ``time.process_time()``), so the cost is the same on a loaded host.
* ``echo``  ``{data}``: write ``data`` (bytes) to stdout.

Exit status: 0 on success, 2 for a usage or argument error (message on stderr). Signals
keep their default actions, so the executor's SIGTERM and SIGKILL end the task at once.
"""

from __future__ import annotations

import sys
import time

EXIT_USAGE = 2


def _ms(args: dict) -> float:
    ms = args.get("ms")
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not ms >= 0:
        raise ValueError(f"'ms' must be a number >= 0, got {ms!r}")
    return float(ms)


def run_sleep(args: dict) -> None:
    time.sleep(_ms(args) / 1000.0)


def run_cpu(args: dict) -> None:
    budget = _ms(args) / 1000.0
    start = time.process_time()
    x = 0
    while time.process_time() - start < budget:
        for i in range(1000):  # a little arithmetic between clock reads
            x = (x * 31 + i) & 0xFFFFFFFF


def run_echo(args: dict) -> None:
    data = args.get("data", b"")
    if isinstance(data, str):
        data = data.encode()
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"'data' must be bytes, got {type(data).__name__}")
    out = sys.stdout.buffer
    view = memoryview(data)
    for i in range(0, len(view), 1 << 20):  # bounded writes; the pipe applies back-pressure
        out.write(view[i:i + (1 << 20)])
    out.flush()


KINDS = {"sleep": run_sleep, "cpu": run_cpu, "echo": run_echo}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in KINDS:
        print(f"usage: taskrunner.py {{{'|'.join(KINDS)}}} < msgpack-args", file=sys.stderr)
        return EXIT_USAGE
    import msgpack

    raw = sys.stdin.buffer.read()
    try:
        args = msgpack.unpackb(raw, raw=False) if raw else {}
        if not isinstance(args, dict):
            raise ValueError("args must be a map")
        KINDS[argv[1]](args)
    except ValueError as e:
        print(f"taskrunner {argv[1]}: bad args: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
