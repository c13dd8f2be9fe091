"""`raftdeck up` in a real terminal: tmux runs it on a fresh data folder, we type keys
and read the screen with capture-pane, as an operator would see it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from console.local import free_ports

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)"),
]

ROOT = Path(__file__).resolve().parents[2]


def tmux(*args: str, check: bool = True) -> str:
    out = subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=20)
    if check and out.returncode != 0:
        raise AssertionError(f"tmux {' '.join(args)}: {out.stderr}")
    return out.stdout


def screen(session: str) -> str:
    """The visible screen; empty once the session has ended (its command exited)."""
    return tmux("capture-pane", "-p", "-t", session, check=False)


def wait_screen(session: str, cond, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = screen(session)
        if cond(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"never saw {what}; screen was:\n{text}")


def write_inventory(tmp_path: Path, name: str) -> Path:
    ports = free_ports(3)
    inv = tmp_path / "inventory.yaml"
    inv.write_text(
        f"cluster: {{name: {name}}}\nnodes:\n" + "".join(
            f"  - {{name: n{i + 1}, host: 127.0.0.1, port: {p}, priority: {3 - i}}}\n"
            for i, p in enumerate(ports)))
    return inv


def start_up(tmp_path: Path, inv: Path, session: str, *flags: str) -> None:
    # pytest exports COLUMNS/LINES (80x24); the console must size itself from the terminal.
    cmd = (f"cd {tmp_path} && env -u COLUMNS -u LINES PYTHONPATH={ROOT} "
           f"{sys.executable} -m console.cli --inventory {inv} up {' '.join(flags)}")
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "40", cmd)
    tmux("set-option", "-t", session, "window-size", "manual", check=False)
    tmux("resize-window", "-t", session, "-x", "160", "-y", "40", check=False)


def agent_pids(tmp_path: Path) -> dict[str, int]:
    """The agents `up` started, from their pid files (JSON or a bare number)."""
    import json

    out = {}
    for f in (tmp_path / ".raftdeck").glob("*.pid"):
        try:
            text = f.read_text().strip()
        except FileNotFoundError:  # removed between the listing and the read
            continue
        out[f.stem] = int(text) if text.isdigit() else int(json.loads(text)["pid"])
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def test_raftdeck_up_opens_the_console_in_a_real_terminal(tmp_path):
    inv = write_inventory(tmp_path, "tmuxdemo")
    session = f"raftdeck-test-{os.getpid()}"
    start_up(tmp_path, inv, session)
    try:
        text = wait_screen(session, lambda t: "leader: n" in t and "quorum" in t, 60,
                           "the console with a leader")
        assert "tmuxdemo" in text and "NODE" in text and "ROLE" in text
        assert all(f"n{i}" in text for i in (1, 2, 3)) and text.count("127.0.0.1:") >= 3, text
        tmux("send-keys", "-t", session, "?")
        wait_screen(session, lambda t: "raftdeck keys" in t and "Kill" in t, 20, "the help screen")
        tmux("send-keys", "-t", session, "Escape")
        wait_screen(session, lambda t: "raftdeck keys" not in t, 20, "help closed")
        tmux("send-keys", "-t", session, "q")
        # q leaves the console (and the shell command running it), the cluster stays up.
        wait_screen(session, lambda t: "quorum" not in t, 20, "the console closed")
        status = subprocess.run([sys.executable, "-m", "console.cli", "--inventory", str(inv),
                                 "status", "--json"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert status.returncode == 0, status.stderr
        pids = agent_pids(tmp_path)
        assert len(pids) == 3 and all(alive(p) for p in pids.values()), pids
    finally:
        tmux("kill-session", "-t", session, check=False)
        subprocess.run([sys.executable, "-m", "console.cli", "--inventory", str(inv), "down"],
                       cwd=tmp_path, capture_output=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_up_ephemeral_stops_the_cluster_when_the_console_closes_with_ctrl_c(tmp_path):
    inv = write_inventory(tmp_path, "ephemeral")
    session = f"raftdeck-eph-{os.getpid()}"
    start_up(tmp_path, inv, session, "--ephemeral")
    pids: dict[str, int] = {}
    try:
        wait_screen(session, lambda t: "leader: n" in t and "quorum" in t, 60,
                    "the console with a leader")
        pids = agent_pids(tmp_path)
        assert len(pids) == 3 and all(alive(p) for p in pids.values()), pids
        tmux("send-keys", "-t", session, "C-c")
        # `down` ends the agents, then removes their pid files.
        deadline = time.monotonic() + 30
        while any(alive(p) for p in pids.values()) or agent_pids(tmp_path):
            assert time.monotonic() < deadline, (
                f"after Ctrl-C with --ephemeral: agents alive "
                f"{[n for n, p in pids.items() if alive(p)]}, pid files "
                f"{sorted(agent_pids(tmp_path))}\n{screen(session)}")
            time.sleep(0.2)
    finally:
        tmux("kill-session", "-t", session, check=False)
        for pid in pids.values():  # only if the test failed before the console stopped them
            if alive(pid):
                os.kill(pid, 9)
