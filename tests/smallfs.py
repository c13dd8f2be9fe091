"""Real small filesystems for the disk-full tests: a tmpfs mounted for one test, and a
file that takes all but a given amount of its free space (root only, as CI runs)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nodeagent.storage import disk_usage


class Mounts:
    """``mount(path, mib)`` mounts a fresh tmpfs of that size at ``path`` (made if
    missing) and returns it; ``unmount_all()`` detaches them (lazily: a failed test may
    still hold a file open there). Skips the test where mounting is not allowed."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def mount(self, path: Path, mib: int, kind: str = "tmpfs") -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small filesystem needs root")
        path.mkdir(parents=True, exist_ok=True)
        if kind == "tmpfs":
            args = ["-t", "tmpfs", "-o", f"size={mib}m", "tmpfs"]
        else:  # ext4 on a loop device, over an image file beside the mount point
            img = path.with_name(path.name + ".img")
            with open(img, "wb") as f:
                f.truncate(mib << 20)
            mk = subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], capture_output=True, text=True)
            if mk.returncode != 0:
                pytest.skip(f"mkfs.ext4: {mk.stderr.strip()}")
            args = ["-o", "loop", str(img)]
        res = subprocess.run(["mount", *args, str(path)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount {kind} on {path}: {res.stderr.strip()}")
        self.mounted.append(path)
        return path

    def unmount_all(self) -> None:
        for path in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        self.mounted.clear()


def fill(path: Path, leave: int, name: str = "ballast") -> Path:
    """Take all but ``leave`` bytes of ``path``'s filesystem with one file; its path."""
    free, _ = disk_usage(str(path))
    ballast = path / name
    with open(ballast, "wb") as f:
        if free > leave:
            os.posix_fallocate(f.fileno(), 0, free - leave)
    return ballast
