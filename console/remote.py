"""The host side of `raftdeck deploy`: a small stdlib-only program that runs on each remote
host, sent over SSH as the program text of ``python3 - ARGS`` (nothing is installed to run
it, and it is always the console's own version).

One invocation does one operation and prints one JSON line: ``{"ok": true, ...}`` or
``{"ok": false, "kind": "...", "error": "..."}``. The argument is one JSON map with ``op``
and the operation's fields; every path in it is absolute (the console resolves them
against ``home`` from ``probe``).

Operations:

* ``probe``: home directory, Python version and machine, free disk space, which wheels
  already lie in the wheel directory (name -> sha256), the manifest of the last
  successful deploy, and the agent's process state.
* ``install``: create the venv (``--without-pip``: pip runs from the uploaded pip wheel,
  so a host without ensurepip works) and install the dependency wheels in it with
  ``--no-index`` (the hosts need no internet); install the project wheel into its own
  release folder (``pip --target``), and check that it imports there. ``prune`` removes
  the release folders no longer needed.
* ``start``: start the agent detached (its own session, stdio to files) and write the pid
  file; wait until its port accepts connections or it exits (then say why, with the tail
  of its stderr file).
* ``signal`` (KILL, STOP, CONT), ``stop`` (TERM, KILL after a grace time), ``status``,
  ``logs`` (the last lines of the agent's log and stderr files), ``remove`` (files and
  directories deploy made).
* ``datadir``: the agent's process state and whether its data directory is absent, empty
  or in use (`raftdeck restore` checks every host before it writes to any).
* ``adopt``: make an uploaded directory the node's data directory (`raftdeck restore`):
  every file checked against the console's list of sizes and sha256s and fsynced, then
  renamed into place while the agent is stopped and the data directory absent or empty.

The pid file has the format of the local one (console/procs.py): one JSON line with
``pid`` and ``start_ticks`` (field 22 of /proc/PID/stat), so a pid that now belongs to
another process is never signalled; the process must also still have ``nodeagent`` and
its config file on its command line.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

SIGNALS = {"KILL": signal.SIGKILL, "STOP": signal.SIGSTOP, "CONT": signal.SIGCONT,
           "TERM": signal.SIGTERM, "HUP": signal.SIGHUP}


def _out(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def file_sha256(path):
    """A file's sha256, read 1 MiB at a time (the console hashes what it uploads with
    this same function)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- processes --------------------------------------------------------------------------


def _stat(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _threads_dead(pid):
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return True
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid), "rb") as f:
                data = f.read().decode(errors="replace")
        except OSError:
            continue
        st = data[data.rfind(")") + 2:].split()[:1]
        if st and st[0] not in "ZXx":
            return False
    return True


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _read_pid(pid_file):
    try:
        with open(pid_file) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text.isdigit():
        return {"pid": int(text)}
    try:
        d = json.loads(text)
        return d if isinstance(d.get("pid"), int) and d["pid"] > 0 else None
    except (ValueError, AttributeError):
        return None


def _gone(info):
    st = _stat(info["pid"])
    if st is None:
        return True
    if info.get("start_ticks") is not None and st[1] != info["start_ticks"]:
        return True
    if st[0] not in "ZXx":
        return False
    return _threads_dead(info["pid"])


def _process(a):
    """(state, info): state is running | paused | stopped | stale."""
    pf = a["pid_file"]
    info = _read_pid(pf)
    if info is None:
        return ("stale" if os.path.exists(pf) else "stopped"), None
    if _gone(info):
        return "stale", info
    st = _stat(info["pid"])
    argv = _cmdline(info["pid"])
    if argv and not (any("nodeagent" in x for x in argv) and a["config"] in argv):
        return "stale", info  # the pid now belongs to another program
    return ("paused" if st and st[0] in "Tt" else "running"), info


def _wait_gone(info, timeout):
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not _gone(info):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _tail(path, lines, max_bytes=1 << 20):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode(errors="replace")
    except OSError:
        return []
    out = data.splitlines()
    return out[-lines:] if lines else []


# -- operations -------------------------------------------------------------------------


def op_probe(a):
    home = os.path.expanduser("~")
    out = {"home": home, "python": list(sys.version_info[:3]), "machine": os.uname().machine,
           "executable": sys.executable}
    # free space where the install directory is (or its nearest existing parent)
    p = a.get("install_dir") or home
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        st = os.statvfs(p or "/")
        out["free_bytes"] = st.f_bavail * st.f_frsize
    except OSError:
        out["free_bytes"] = None
    wheels = {}
    wd = a.get("wheel_dir")
    if wd and os.path.isdir(wd):
        for name in sorted(os.listdir(wd)):
            if name.endswith(".whl"):
                wheels[name] = file_sha256(os.path.join(wd, name))
    out["wheels"] = wheels
    manifest = None
    mf = a.get("manifest")
    if mf:
        try:
            with open(mf) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            manifest = None
    out["manifest"] = manifest
    files = {}
    for path in a.get("hash_files") or ():
        try:
            files[path] = file_sha256(path)
        except OSError:
            files[path] = None
    out["files"] = files
    out["exists"] = {p: os.path.exists(p) for p in a.get("exists") or ()}
    if a.get("pid_file"):
        state, info = _process(a)
        out["agent"] = {"state": state, "pid": info and info.get("pid")}
    _out(ok=True, **out)


def op_install(a):
    venv = a["venv"]
    vpy = os.path.join(venv, "bin", "python")
    want = list(sys.version_info[:2])
    fresh = False
    if os.path.exists(vpy):
        r = subprocess.run([vpy, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
                           capture_output=True, text=True)
        if r.returncode != 0 or r.stdout.split() != [str(x) for x in want]:
            fresh = True  # the host's Python changed under the venv: build it again
    else:
        fresh = True
    if fresh:
        args = [sys.executable, "-m", "venv", "--without-pip"]
        if os.path.exists(venv):
            args.append("--clear")
        r = subprocess.run(args + [venv], capture_output=True, text=True)
        if r.returncode != 0:
            return _out(ok=False, kind="venv", error=_last(r.stderr or r.stdout))
    pip = [vpy, a["pip_wheel"] + "/pip", "install", "--no-index", "--no-deps",
           "--disable-pip-version-check", "--no-input", "--no-warn-script-location", "-q"]
    if a.get("deps"):
        r = subprocess.run(pip + a["deps"], capture_output=True, text=True)
        if r.returncode != 0:
            return _out(ok=False, kind="pip", error=_last(r.stderr or r.stdout))
    # The project goes into its own release folder (pip --target), never over the files a
    # running agent uses: the agent is started with PYTHONPATH=<release>.
    rel = a["release"]
    if not os.path.isdir(rel):
        os.makedirs(os.path.dirname(rel), exist_ok=True)
        tmp = rel + ".part"
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run(pip + ["--target", tmp, a["project_wheel"]], capture_output=True,
                           text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            return _out(ok=False, kind="pip", error=_last(r.stderr or r.stdout))
        os.rename(tmp, rel)
    env = dict(os.environ, PYTHONPATH=rel)
    r = subprocess.run([vpy, "-c", "import nodeagent.cli, trio, msgpack, yaml, cryptography"],
                       capture_output=True, text=True, env=env, cwd=rel)
    if r.returncode != 0:
        shutil.rmtree(rel, ignore_errors=True)  # never started from; the next run builds it again
        return _out(ok=False, kind="import", error=_last(r.stderr or r.stdout))
    _out(ok=True, fresh_venv=fresh)


def op_prune(a):
    """Remove the release folders other than ``keep``."""
    removed = []
    d = a["releases"]
    keep = set(a.get("keep") or ())
    if os.path.isdir(d):
        for name in os.listdir(d):
            path = os.path.join(d, name)
            if path not in keep and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    _out(ok=True, removed=removed)


def _last(text):
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("ERROR") or "Error" in ln]
    return (errs or lines or ["(no output)"])[-1][:500]


def op_start(a):
    state, info = _process(a)
    if state in ("running", "paused"):
        return _out(ok=True, pid=info["pid"], already=True)
    _unlink(a["pid_file"])
    for path in (a["pid_file"], a["stderr_file"], a["log_file"], a["data_dir"]):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    argv = [a["python"], "-m", "nodeagent.cli", "run", "--config", a["config"],
            "--log-file", a["log_file"]]
    if a.get("join"):  # added to a running cluster: learn the membership from the leader
        argv.append("--join")
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "USER",
                                                         "LOGNAME", "TMPDIR")}
    if a.get("pythonpath"):
        env["PYTHONPATH"] = a["pythonpath"]
    with open(a["stderr_file"], "ab") as err:
        offset = err.tell()
        err.write(("--- %s raftdeck deploy starts %s: %s\n" % (
            time.strftime("%Y-%m-%dT%H:%M:%S"), a["node"], " ".join(argv))).encode())
        err.flush()
        # SIGHUP blocked in the child until the agent has its handler (console/procs.py,
        # sighup_held): a reload sent while it starts waits instead of ending it.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            p = subprocess.Popen(argv, cwd=a["cwd"], env=env, stdin=subprocess.DEVNULL,
                                 stdout=err, stderr=err, start_new_session=True, close_fds=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    st = _stat(p.pid)
    info = {"pid": p.pid, "start_ticks": st and st[1], "started_at": round(time.time(), 3),
            "node": a["node"], "config": a["config"], "argv": argv}
    tmp = a["pid_file"] + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(info) + "\n")
    os.replace(tmp, a["pid_file"])
    deadline = time.monotonic() + a.get("wait_s", 20)
    while time.monotonic() < deadline:
        rc = p.poll()
        if rc is not None:
            _unlink(a["pid_file"])
            tail = [ln for ln in _tail_from(a["stderr_file"], offset) if not ln.startswith("--- ")]
            return _out(ok=False, kind="exited", code=rc,
                        error="the agent exited with code %s: %s" % (
                            rc, (" | ".join(tail[-2:]) or "see " + a["stderr_file"])))
        try:
            with socket.create_connection((a["host"], a["port"]), timeout=0.5):
                return _out(ok=True, pid=p.pid)
        except OSError:
            time.sleep(0.1)
    _out(ok=False, kind="timeout", pid=p.pid,
         error="the agent (pid %d) does not listen on %s:%d after %ss; see %s" % (
             p.pid, a["host"], a["port"], a.get("wait_s", 20), a["stderr_file"]))


def _tail_from(path, offset):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return []


def op_status(a):
    state, info = _process(a)
    _out(ok=True, state=state, pid=info and info.get("pid"))


def op_signal(a):
    state, info = _process(a)
    if state not in ("running", "paused"):
        if state == "stale":
            _unlink(a["pid_file"])
        return _out(ok=False, kind="not_running", state=state,
                    error=("its pid file was stale and is removed" if state == "stale"
                           else "no pid file"))
    sig = a["signal"]
    try:
        os.kill(info["pid"], SIGNALS[sig])
    except ProcessLookupError:
        _unlink(a["pid_file"])
        return _out(ok=False, kind="not_running", state="stale", error="its pid is gone")
    if sig == "KILL":
        if not _wait_gone(info, a.get("timeout", 10)):
            return _out(ok=False, kind="stuck", error="pid %d did not die within %ss of SIGKILL"
                        % (info["pid"], a.get("timeout", 10)))
        _unlink(a["pid_file"])
    _out(ok=True, pid=info["pid"])


def op_stop(a):
    state, info = _process(a)
    if state == "stopped":
        return _out(ok=True, result="not_running", pid=None)
    if state == "stale":
        _unlink(a["pid_file"])
        return _out(ok=True, result="stale", pid=info and info.get("pid"))
    for sig in (signal.SIGTERM, signal.SIGCONT):
        try:
            os.kill(info["pid"], sig)
        except ProcessLookupError:
            pass
    result = "stopped"
    if not _wait_gone(info, a.get("grace_s", 10)):
        try:
            os.kill(info["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        result = "killed"
        if not _wait_gone(info, 10):
            return _out(ok=False, kind="stuck", error="pid %d survives SIGKILL" % info["pid"])
    _unlink(a["pid_file"])
    _out(ok=True, result=result, pid=info["pid"])


def op_logs(a):
    _out(ok=True, log=_tail(a["log_file"], a.get("lines", 100)),
         stderr=_tail(a["stderr_file"], a.get("stderr_lines", 20)))


def op_remove(a):
    removed = []
    for path in a.get("paths") or ():
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif os.path.lexists(path):
            _unlink(path)
            removed.append(path)
    for d in a.get("rmdirs") or ():  # only if empty: what the operator put there stays
        try:
            os.rmdir(d)
            removed.append(d)
        except OSError:
            pass
    _out(ok=True, removed=removed)


def _dir_state(path):
    """absent | empty | used | not_a_directory."""
    try:
        return "used" if os.listdir(path) else "empty"
    except FileNotFoundError:
        return "absent"
    except NotADirectoryError:
        return "not_a_directory"


def op_datadir(a):
    state, info = _process(a)
    _out(ok=True, state=state, pid=info and info.get("pid"), data=_dir_state(a["data_dir"]))


def _fsync_path(path, flags=os.O_RDONLY):
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def op_adopt(a):
    staging, data_dir, files = a["staging"], a["data_dir"], a["files"]
    state, info = _process(a)
    if state in ("running", "paused"):
        return _out(ok=False, kind="running", pid=info["pid"],
                    error="the agent runs (pid %d)" % info["pid"])
    data = _dir_state(data_dir)
    if data not in ("absent", "empty"):
        return _out(ok=False, kind="not_empty", error="%s is not empty" % data_dir)
    found = set()
    for root, _dirs, names in os.walk(staging):
        for name in names:
            found.add(os.path.relpath(os.path.join(root, name), staging))
    if found != set(files):
        missing, extra = sorted(set(files) - found), sorted(found - set(files))
        return _out(ok=False, kind="damaged", error="the upload is not what was sent "
                    "(missing %s, unexpected %s)" % (missing or "none", extra or "none"))
    for rel, (size, digest) in sorted(files.items()):
        path = os.path.join(staging, rel)
        if os.path.getsize(path) != size or file_sha256(path) != digest:
            return _out(ok=False, kind="damaged", error="%s arrived damaged (size or sha256 "
                        "differs from what was sent)" % rel)
        os.chmod(path, 0o600)
        _fsync_path(path)
    for root, _dirs, _names in os.walk(staging, topdown=False):
        os.chmod(root, 0o700)
        _fsync_path(root)
    if data == "empty":
        os.rmdir(data_dir)
    os.rename(staging, data_dir)
    _fsync_path(os.path.dirname(data_dir))
    _out(ok=True, files=len(files))


OPS = {"datadir": op_datadir, "adopt": op_adopt, "probe": op_probe, "install": op_install, "prune": op_prune, "start": op_start, "status": op_status,
       "signal": op_signal, "stop": op_stop, "logs": op_logs, "remove": op_remove}


def main(argv):
    try:
        a = json.loads(argv[1])
        OPS[a["op"]](a)
    except OSError as e:
        _out(ok=False, kind="os", errno=e.errno,
             error="%s%s" % (e.strerror or e, " (%s)" % e.filename if e.filename else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
