"""Memory a snapshot used goes back to the OS (nodeagent.libc.release_free_memory).

A snapshot is serialized in a worker thread, in that thread's malloc arena, and freed
once written; glibc keeps freed heap pages unless asked (``malloc_trim``). The driver
asks once per snapshot. Measured in a fresh interpreter, so pytest's own heap does not
blur the figure.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys, threading
    from nodeagent.libc import release_free_memory

    def rss_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    keep = []

    def serialize_like_a_snapshot():
        parts = [bytearray(100_000) for _ in range(300)]  # 30 MB in this thread's arena
        for p in parts:
            p[::4096] = b"x" * len(p[::4096])  # touch every page
        keep.append(bytearray(16))  # a later small block pins the top of the heap
        del parts

    t = threading.Thread(target=serialize_like_a_snapshot)
    t.start()
    t.join()
    before = rss_kib()
    released = release_free_memory()
    print(before, rss_kib(), released)
""")


def test_memory_freed_by_a_worker_thread_is_handed_back():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, after, released = out.stdout.split()
    assert released == "True"
    assert int(before) - int(after) > 5_000, (before, after)  # KiB: most of what was freed
