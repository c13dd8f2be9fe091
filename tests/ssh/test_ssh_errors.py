"""Each way of failing to reach a host is one exact, actionable line for that host, and the
other hosts carry on (real sshd; no agent is deployed, so these are quick)."""

from __future__ import annotations

import asyncio

import asyncssh

from console.deploy import Deployer, SSHOptions
from nodeagent.config import parse_inventory


def inventory(hs, nodes: str):
    text = "cluster:\n  name: errs\nnodes:\n" + nodes
    path = hs.tmp / "inventory.yaml"
    path.write_text(text)
    return parse_inventory(text, path)


def deploy(hs, inv, *, accept_new=False, timeout=10.0):
    d = Deployer(inv, ssh=SSHOptions(known_hosts=hs.known_hosts, accept_new=accept_new,
                                     connect_timeout=timeout))
    return asyncio.run(d.deploy())


def fingerprint(h) -> str:
    key = asyncssh.read_public_key(str(h.host_key) + ".pub")
    return f"ssh-ed25519 {key.get_fingerprint()}"


def test_unknown_host_key_then_learnt_then_changed(ssh_hosts):
    hs = ssh_hosts(1)
    h = hs.hosts[0]
    inv = inventory(hs, hs.node_yaml("n1", h, 7101))
    r = deploy(hs, inv)["n1"]
    assert not r.ok
    assert r.message == (
        f"n1 ({hs.user}@{h.addr}:{h.ssh_port}): unknown host key ({fingerprint(h)}), not in "
        f"{hs.known_hosts}; check the fingerprint on the host (ssh-keygen -lf "
        "/etc/ssh/ssh_host_*_key.pub) and run again with --accept-new-host-keys")
    assert not hs.known_hosts.exists()  # nothing learnt without the flag

    # --accept-new-host-keys learns it (the run goes on to the next step: no artifacts
    # here, so it stops after the Python check, which is past the SSH part)
    from console import deploy as dep

    async def connect_only():
        conn = await dep.ssh_connect(inv.node("n1"), SSHOptions(known_hosts=hs.known_hosts,
                                                                accept_new=True))
        async with conn:
            return await dep.check_python(conn, inv.node("n1"))

    version, _, _ = asyncio.run(connect_only())
    assert version >= (3, 11)
    pattern = h.addr if h.ssh_port == 22 else f"[{h.addr}]:{h.ssh_port}"
    assert hs.known_hosts.read_text() == f"{pattern} ssh-ed25519 {hs.host_pub(h)}\n"

    # the host is reinstalled: a new host key. Never accepted, even with the flag.
    h.host_key.unlink()
    (h.root / "ssh_host_ed25519_key.pub").unlink()
    from tests.ssh.conftest import keygen

    keygen(h.host_key)
    for p in h.sshds:
        p.kill()
        p.wait()
    h.sshds.clear()
    hs.start_sshd(h)
    r = deploy(hs, inv, accept_new=True)["n1"]
    assert r.message == (
        f"n1 ({hs.user}@{h.addr}:{h.ssh_port}): host key CHANGED (now {fingerprint(h)}; "
        f"{hs.known_hosts} has another for {pattern}): refusing to connect; if the host was "
        f"reinstalled, remove the old key with ssh-keygen -R '{pattern}' -f {hs.known_hosts} "
        "and run again")
    assert hs.known_hosts.read_text().count("\n") == 1  # the old line is still the only one


def test_wrong_key_unreachable_and_no_python_each_one_line(ssh_hosts):
    hs = ssh_hosts(1)
    h = hs.hosts[0]
    hs.trust(h)
    # a second sshd on the same host whose sessions find no python3 on PATH
    bare_port = 2222
    hs.start_sshd(h, port=bare_port, extra="SetEnv PATH=/nonexistent")
    hs.trust(h, bare_port)
    closed_port = 2299
    nodes = (hs.node_yaml("wrongkey", h, 7101, key=hs.wrong_key)
             + hs.node_yaml("closed", h, 7102, ssh_port=closed_port)
             + hs.node_yaml("nopython", h, 7103, ssh_port=bare_port))
    inv = inventory(hs, nodes)
    res = deploy(hs, inv)
    u = hs.user
    assert res["wrongkey"].message == (
        f"wrongkey ({u}@{h.addr}:{h.ssh_port}): authentication refused (tried key "
        f"{hs.wrong_key}); add the public key to ~{u}/.ssh/authorized_keys on the host, or set "
        "ssh.key and ssh.user in the inventory")
    assert res["closed"].message == (
        f"closed ({u}@{h.addr}:{closed_port}): cannot connect: connection refused; check "
        "ssh.port and that sshd runs on the host")
    assert res["nopython"].message == (
        f"nopython ({u}@{h.addr}:{bare_port}): no Python on the host (python3: command not "
        "found); install Python 3.11 or newer there, or set ssh.python to its path")
    assert all(not r.ok and "\n" not in r.message for r in res.values())


def test_disk_full_is_one_line_and_the_other_host_goes_on(ssh_hosts, tmp_path):
    """A host whose install_dir has too little space fails before anything is uploaded;
    another host in the same run is not held up by it (it gets as far as the same check
    and passes it; the tiny dummy wheels are not installable, which is its own error)."""
    import os
    import shutil
    import subprocess
    import zipfile

    import pytest

    from console.deploy import Artifacts, Wheel

    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    hs = ssh_hosts(2)
    for h in hs.hosts:
        hs.trust(h)
    full = hs.hosts[0].root / "raftdeck"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
    try:
        # `ip netns exec` gave the host's sshd its own copy of the mount table: start it
        # again so that its copy has the small disk too
        h = hs.hosts[0]
        for p in h.sshds:
            p.kill()
            p.wait()
        h.sshds.clear()
        hs.start_sshd(h)
        wheels = []
        for name in ("raftdeck-0.1.0-py3-none-any.whl", "pip-1-py3-none-any.whl",
                     "dep-1-py3-none-any.whl"):
            p = tmp_path / name
            with zipfile.ZipFile(p, "w") as z:
                z.writestr("x/data.bin", os.urandom(2 * 1024 * 1024))
            wheels.append(Wheel.of(p))
        art = Artifacts(wheels[0], (wheels[2],), wheels[1])
        inv = inventory(hs, hs.node_yaml("full", hs.hosts[0], 7101)
                        + hs.node_yaml("roomy", hs.hosts[1], 7102))
        d = Deployer(inv, ssh=SSHOptions(known_hosts=hs.known_hosts), artifacts=art)
        res = asyncio.run(d.deploy())
        free = os.statvfs(full).f_bavail * os.statvfs(full).f_frsize // (1 << 20)
        need = (art.size + 64 * 1024 * 1024) // (1 << 20)
        assert res["full"].message == (
            f"full ({hs.user}@{hs.hosts[0].addr}:{hs.hosts[0].ssh_port}): not enough disk space: "
            f"{free} MiB free under {full}, about {need} MiB needed; free some space or point "
            "ssh.install_dir elsewhere")
        assert os.listdir(full) == []  # nothing was uploaded
        roomy = res["roomy"]
        assert not roomy.ok and "install failed" in roomy.message  # it got past upload
        assert (hs.hosts[1].root / "raftdeck" / "wheels" / wheels[0].name).exists()
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
