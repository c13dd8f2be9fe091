"""Memory a snapshot used goes back to the OS (nodeagent.libc.release_free_memory), and
worker threads allocate from the main arena (nodeagent.libc.share_one_malloc_arena).

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
        keep.append(bytearray(4096))  # a later C-heap block (pymalloc takes only <= 512 B) pins the top
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


ARENAS = textwrap.dedent("""
    import sys, threading
    from nodeagent.libc import share_one_malloc_arena

    HEAP = 64 << 20  # glibc's per-thread heaps are 64 MiB, aligned to their size

    def thread_heaps():
        maps = [line.split() for line in open("/proc/self/maps")]
        spans = [(int(m[0].split("-")[0], 16), int(m[0].split("-")[1], 16), len(m) == 5) for m in maps]
        n = 0
        for i, (start, end, anon) in enumerate(spans):
            if not anon or start % HEAP:
                continue
            while end - start < HEAP and i + 1 < len(spans) and spans[i + 1][0] == end and spans[i + 1][2]:
                i += 1
                end = spans[i][1]
            n += end - start == HEAP
        return n

    limited = share_one_malloc_arena() if sys.argv[1] == "limit" else None
    before = thread_heaps()
    held, go = [], threading.Barrier(4)

    def work():
        go.wait()  # all four allocate at once
        held.append([bytearray(50_000) for _ in range(20)])  # malloc'd, below the mmap threshold

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(limited, thread_heaps() - before)
""")


def _new_heaps(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    limited, heaps = out.stdout.split()
    return limited, int(heaps)


def test_worker_threads_share_the_main_arena():
    # Without the call each allocating thread gets a heap of its own; that is what the
    # check counts, so it is shown to see them before it is trusted to see none.
    assert _new_heaps("default")[1] >= 1
    assert _new_heaps("limit") == ("True", 0)
