"""The agent runs on every host, so it stays small: importing it (and starting its CLI)
loads trio, msgpack, pyyaml and cryptography at most, never the console's textual or
asyncssh. Checked the way DESIGN.md says, with `python -X importtime`."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("textual", "asyncssh", "rich", "console")


def imported_modules(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    mods = set()
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            mods.add(name.split(".")[0])
    return mods


def test_the_agent_never_imports_the_console_stack():
    mods = imported_modules("import nodeagent.agent, nodeagent.cli, nodeagent.executor, "
                            "nodeagent.tasks, nodeagent.storage")
    assert "trio" in mods and "msgpack" in mods  # the check sees real imports
    bad = sorted(m for m in mods if m in FORBIDDEN)
    assert not bad, f"the agent imports {bad}"


# Loaded only where used (an error message's suggestion, a task placement, a log file),
# so that an idle agent's resident memory does not carry them.
LAZY = ("difflib", "fractions", "decimal", "logging.handlers", "pickle")


def test_a_running_agent_loads_no_module_it_only_needs_on_some_paths():
    code = ("import sys, nodeagent.cli, nodeagent.config, trio, nodeagent.agent, "
            "nodeagent.server, nodeagent.libc, nodeagent.security, nodeagent.storage\n"
            "from nodeagent.logs import setup_logging\n"
            "setup_logging('n1')\n"
            f"print(sorted(m for m in {LAZY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"the agent imports {out.stdout.strip()}"
