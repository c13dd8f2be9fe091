"""Pure parts of nodeagent/security.py (the role table, relayed roles, the token bucket,
identities from certificates) and the files `raftdeck init` writes (modes, SANs, kinds,
idempotence), checked with the ssl module the agents use."""

from __future__ import annotations

import os
import ssl
import stat

import pytest
from cryptography import x509

from nodeagent import security as sec
from nodeagent.protocol import MESSAGE_SCHEMAS

VIEWER_OK = {"status", "subscribe", "unsubscribe", "whoami", "get", "dump", "task_get",
             "task_list", "task_wait"}
OPERATOR_OK = VIEWER_OK | {"put", "delete", "cas", "register", "submit", "task_cancel"}
ADMIN_OK = OPERATOR_OK | {"transfer", "add_node", "remove_node", "fault", "heal", "backup"}
REQUESTS = {t for t, s in MESSAGE_SCHEMAS.items() if s.category == "request"}


@pytest.mark.parametrize("role,allowed", [("viewer", VIEWER_OK), ("operator", OPERATOR_OK),
                                          ("admin", ADMIN_OK)])
def test_the_role_table(role, allowed):
    got = {t for t in REQUESTS if sec.check_request(role, t, {"tasks": []}) is None}
    assert got == allowed
    # every refusal names the role it needs
    for t in REQUESTS - allowed:
        msg = sec.check_request(role, t, {"tasks": []})
        assert "needs the" in msg or "only by agents" in msg, msg


def test_task_reports_come_only_from_agents_and_shell_tasks_need_admin():
    for role in sec.ROLES:
        assert sec.check_request(role, "task_report") is not None
    assert sec.check_request(sec.NODE, "task_report") is None
    shell = {"tasks": [{"kind": "sleep"}, {"kind": "shell"}]}
    assert "needs the admin role" in sec.check_request("operator", "submit", shell)
    assert sec.check_request("admin", "submit", shell) is None
    assert sec.check_request(sec.NODE, "fault") is not None  # an agent's link is not admin
    assert sec.check_request("viewer", "no_such_request") is not None


def test_a_relayed_role_only_ever_lowers():
    node = sec.Identity(sec.NODE, sec.NODE, "n2")
    viewer = sec.Identity("operator", "viewer", "viewer")
    operator = sec.Identity("operator", "operator", "operator")
    # a follower relays the original client's role; the leader checks with it
    assert sec.effective_role(node, "viewer") == "viewer"
    assert sec.effective_role(node, None) == sec.NODE
    # an operator certificate cannot raise itself by claiming a role
    assert sec.effective_role(viewer, "admin") == "viewer"
    assert sec.effective_role(operator, "admin") == "operator"
    assert sec.effective_role(operator, "viewer") == "viewer"
    assert sec.check_request(sec.effective_role(node, "viewer"), "put") is not None


def test_token_bucket():
    b = sec.TokenBucket(rate=10, burst=5, now=0.0)
    assert [b.take(0.0) for _ in range(5)] == [0.0] * 5
    assert b.take(0.0) == pytest.approx(0.1)  # one token short at 10/s
    assert b.take(1.0) == 0.0  # refilled (capped at burst)
    for _ in range(100):
        wait = b.take(1.0)
    assert wait <= 5 / 10 + 1e-9  # debt is capped at burst: waits stay bounded
    with pytest.raises(ValueError):
        sec.TokenBucket(0, 1, 0.0)


def test_identity_from_a_certificate_dict():
    def cert(ou, cn):
        return {"subject": ((("organizationName", "raftdeck cluster x"),),
                            (("organizationalUnitName", ou),), (("commonName", cn),))}

    assert sec.identity_from_cert(cert("node", "n1")) == sec.Identity("node", "node", "n1")
    assert sec.identity_from_cert(cert("admin", "admin")).role == "admin"
    for bad in (None, {}, cert("ca", "x"), cert("root", "n1")):
        with pytest.raises(sec.TLSError):
            sec.identity_from_cert(bad)


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_writes_private_keys_0600_in_0700_dirs_with_kinds_and_sans(tmp_path):
    d = tmp_path / "tls"
    out = sec.init_tls(d, "demo", [("n1", "127.0.0.1"), ("n2", "10.0.0.7"), ("n3", "db.example")])
    assert dict(out) == {"ca.crt": "created", "nodes/n1.crt": "created", "nodes/n2.crt": "created",
                         "nodes/n3.crt": "created", "operators/viewer.crt": "created",
                         "operators/operator.crt": "created", "operators/admin.crt": "created"}
    for sub in (d, d / "nodes", d / "operators"):
        assert stat.S_IMODE(os.stat(sub).st_mode) == 0o700
    keys = list(d.rglob("*.key"))
    assert len(keys) == 7
    for k in keys:
        assert stat.S_IMODE(os.stat(k).st_mode) == 0o600, k
    sans = {n: _cert(d / "nodes" / f"{n}.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value for n in ("n1", "n2", "n3")}
    import ipaddress

    assert ipaddress.ip_address("127.0.0.1") in sans["n1"].get_values_for_type(x509.IPAddress)
    assert "localhost" in sans["n1"].get_values_for_type(x509.DNSName)
    assert sans["n2"].get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert sans["n3"].get_values_for_type(x509.DNSName) == ["db.example"]
    assert sec.cert_file_identity(d / "nodes" / "n2.crt") == sec.Identity("node", "node", "n2")
    assert sec.cert_file_identity(d / "operators" / "operator.crt").role == "operator"
    # operator certificates cannot serve (clientAuth only), node certificates can do both
    eku = _cert(d / "operators" / "admin.crt").extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def test_init_is_idempotent_and_completes_what_is_missing(tmp_path):
    d = tmp_path / "tls"
    sec.init_tls(d, "demo", [("n1", "127.0.0.1")])
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    again = sec.init_tls(d, "demo", [("n1", "127.0.0.1"), ("n2", "127.0.0.1")])
    assert {r for c, r in again if c != "nodes/n2.crt"} == {"kept"}
    assert dict(again)["nodes/n2.crt"] == "created"
    assert all(p.read_bytes() == b for p, b in before.items())  # nothing rewritten
    # the node moved: its certificate is reissued for the new host, by the same CA
    moved = dict(sec.init_tls(d, "demo", [("n1", "10.1.1.1")]))
    assert moved["nodes/n1.crt"].startswith("reissued")
    assert moved["ca.crt"] == "kept"
    # a certificate of another CA in the directory is an error, not silently kept
    other = tmp_path / "other"
    sec.init_tls(other, "demo", [("n1", "127.0.0.1")])
    for ext in ("crt", "key"):
        (d / "nodes" / f"n1.{ext}").write_bytes((other / "nodes" / f"n1.{ext}").read_bytes())
    with pytest.raises(sec.TLSError, match="was not issued by"):
        sec.init_tls(d, "demo", [("n1", "127.0.0.1")])
    (d / "ca.key").unlink()
    with pytest.raises(sec.TLSError, match="ca.key is missing"):
        sec.init_tls(d, "demo", [])


def test_contexts_require_client_certificates_and_name_missing_files(tmp_path):
    d = tmp_path / "tls"
    sec.init_tls(d, "demo", [("n1", "127.0.0.1")])
    srv = sec.server_context(*sec.tls_paths_for_node(d, "n1"))
    assert srv.verify_mode == ssl.CERT_REQUIRED
    cli = sec.client_context(*sec.tls_paths_for_role(d, "viewer"))
    assert cli.check_hostname and cli.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(sec.TLSError, match="does not exist; run `raftdeck init`"):
        sec.server_context(d / "ca.crt", d / "nodes" / "n9.crt", d / "nodes" / "n9.key")
    # a key that does not match: one line, naming files, never the key
    with pytest.raises(sec.TLSError) as e:
        sec.server_context(d / "ca.crt", d / "nodes" / "n1.crt", d / "operators" / "admin.key")
    assert "PRIVATE KEY" not in str(e.value) and "\n" not in str(e.value)


def test_rotate_ca_steps_through_the_files_and_names_a_missing_key(tmp_path):
    d = tmp_path / "tls"
    nodes = [("n1", "127.0.0.1")]
    sec.init_tls(d, "demo", nodes)
    old_ca = sec.pem_fingerprints(d / "ca.crt")
    old_n1 = sec.cert_file_facts(d / "nodes" / "n1.crt")
    assert sec.ca_rotation_state(d) == "steady" and len(old_ca) == 1

    step, files = sec.rotate_ca(d, "demo", nodes)  # 1: both trusted, nothing reissued
    assert step == "trust" and sec.ca_rotation_state(d) == "trust"
    both = sec.pem_fingerprints(d / "ca.crt")
    assert both[0] == old_ca[0] and len(both) == 2 and both[1] == sec.pem_fingerprints(d / "ca-next.crt")[0]
    assert {r for _, r in sec.init_tls(d, "demo", nodes)} == {"kept"}  # `init`/`up` between steps
    assert stat.S_IMODE(os.stat(d / "ca-next.key").st_mode) == 0o600

    step, files = sec.rotate_ca(d, "demo", nodes)  # 2: the new CA signs, everything reissued
    assert step == "issue" and sec.ca_rotation_state(d) == "issue"
    assert sec.pem_fingerprints(d / "ca.crt") == [both[1], both[0]]
    assert not (d / "ca-next.crt").exists() and not (d / "ca-next.key").exists()
    assert dict(files)["nodes/n1.crt"] == "reissued: issued by the previous CA"
    assert dict(files)["operators/admin.crt"] == "reissued: issued by the previous CA"
    new_n1 = sec.cert_file_facts(d / "nodes" / "n1.crt")
    assert new_n1["sha256"] != old_n1["sha256"] and new_n1["issuer"] != old_n1["issuer"]
    # both kinds of certificate still verify: agents one step apart talk
    ctx = sec.server_context(*sec.tls_paths_for_node(d, "n1"))
    assert [c["sha256"] for c in sec.trusted_cas(ctx)] == [both[1], both[0]]

    step, files = sec.rotate_ca(d, "demo", nodes)  # 3: the new CA alone
    assert step == "finish" and sec.ca_rotation_state(d) == "steady"
    assert sec.pem_fingerprints(d / "ca.crt") == [both[1]]
    assert {r for _, r in sec.init_tls(d, "demo", nodes)} == {"kept"}

    sec.rotate_ca(d, "demo", nodes)  # a second replacement starts; its key goes missing
    (d / "ca-next.key").unlink()
    with pytest.raises(sec.TLSError, match="ca-next.key is missing: it is the new CA's key"):
        sec.rotate_ca(d, "demo", nodes)
