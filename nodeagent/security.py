"""Security: the cluster CA and its certificates, TLS contexts, roles, limits, the audit log.

Certificates (``init_tls``, what ``raftdeck init`` runs), under one directory::

    ca.crt  ca.key                      the cluster CA (ECDSA P-256, 10 years)
    nodes/<name>.crt  nodes/<name>.key  one per node: SAN = its host (an IP SAN for an IP
                                         address, a DNS SAN otherwise), plus 127.0.0.1 and
                                         localhost for a local node; serverAuth + clientAuth
    operators/<role>.crt .key           viewer, operator, admin: clientAuth only

Key files are 0600, directories 0700. What a certificate is comes from its subject's
organizational unit (OU): ``node`` for an agent (CN = the node's name), or the operator
role ``viewer`` / ``operator`` / ``admin`` (CN = the role). Only the cluster's CA signs, so
the OU is as trustworthy as the CA key. ``init_tls`` is idempotent: existing files are kept
(and checked against the CA), missing ones are issued.

Roles (``check_request``, a pure table): viewer < operator < admin, plus ``node`` for an
agent's own client connections (relayed writes and task reports). A request relayed by a
follower carries the original client's role in ``as_role``; the leader honours it only
downwards (``effective_role``), so a relay never escalates.

Also pure: ``TokenBucket`` (request rate per client connection). I/O: ``init_tls`` writes
files, the context builders read them, ``AuditLog`` appends to a file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import json
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .protocol import MESSAGE_SCHEMAS
from .storage import write_file_durably

ROLES = ("viewer", "operator", "admin")
RANK = {"viewer": 0, "operator": 1, "admin": 2}
NODE = "node"  # the kind (and client role) of an agent's own certificate

# Requests that only an agent sends (with its node certificate).
NODE_ONLY = frozenset({"task_report"})
# The rights of an agent's client connection when it relays no one's role: what an
# operator may do, plus NODE_ONLY.
NODE_RANK = RANK["operator"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

__all__ = [
    "ROLES", "NODE", "TLSError", "Identity", "init_tls", "server_context", "peer_client_context",
    "client_context", "identity_from_cert", "required_role", "check_request", "effective_role",
    "TokenBucket", "AuditLog", "tls_paths_for_node", "tls_paths_for_role", "dn_text", "trusted_cas",
    "pem_fingerprints", "cert_file_facts", "rotate_ca",
]


class TLSError(Exception):
    """A TLS set-up problem; ``str()`` is one actionable line."""


# == identities and roles (pure) ===================================================================


@dataclass(frozen=True)
class Identity:
    """Who is on the other end of a connection: ``kind`` is ``node``, ``operator`` or
    ``anonymous`` (TLS off); ``role`` is the client role (viewer/operator/admin, or node);
    ``name`` is the certificate's CN (a node name or a role)."""

    kind: str
    role: str
    name: str

    def describe(self) -> str:
        if self.kind == "anonymous":
            return "anonymous (TLS off)"
        return f"{self.kind} {self.name}" if self.kind == NODE else f"operator certificate {self.name}"


ANONYMOUS = Identity("anonymous", "admin", "-")


def _subject_fields(cert: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            out.setdefault(k, v)
    return out


def identity_from_cert(cert: Mapping[str, Any] | None) -> Identity:
    """The identity of a verified peer certificate (``SSLObject.getpeercert()``). Raises
    TLSError for a certificate of our CA that is neither a node's nor an operator role's."""
    if not cert:
        raise TLSError("no client certificate")
    subj = _subject_fields(cert)
    ou, cn = subj.get("organizationalUnitName"), subj.get("commonName", "")
    if ou == NODE and cn:
        return Identity(NODE, NODE, cn)
    if ou in ROLES:
        return Identity("operator", ou, cn or ou)
    raise TLSError(f"certificate {cn!r} has OU {ou!r}: neither node nor one of {', '.join(ROLES)}")


def cert_file_identity(path: str | os.PathLike[str]) -> Identity:
    """The identity a certificate file carries (what an agent will see), read locally."""
    x509, _, _, _, _, NameOID = _x509()
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise TLSError(f"cannot read the certificate {path}: {getattr(e, 'strerror', None) or e}") from None
    attrs = {a.oid: a.value for a in cert.subject}
    return identity_from_cert({"subject": (
        (("organizationalUnitName", attrs.get(NameOID.ORGANIZATIONAL_UNIT_NAME, "")),),
        (("commonName", attrs.get(NameOID.COMMON_NAME, "")),))})


def required_role(msg_type: str, msg: Mapping[str, Any] | None = None) -> str:
    """The least role allowed to send this request: the protocol's table
    (``MESSAGE_SCHEMAS[type].role``), raised to admin for a submission with a shell task,
    and ``node`` for requests only agents send. Unknown types need admin."""
    if msg_type in NODE_ONLY:
        return NODE
    spec = MESSAGE_SCHEMAS.get(msg_type)
    role = spec.role if spec is not None and spec.role in RANK else "admin"
    if msg_type == "submit" and msg is not None:
        for t in msg.get("tasks") or ():
            if isinstance(t, Mapping) and t.get("kind") == "shell":
                return "admin"
    return role


def effective_role(identity: Identity, as_role: str | None) -> str:
    """The role a request is checked with. ``as_role`` (set by a relaying follower) only
    ever lowers an operator's role; from an agent (a node certificate), it is the original
    client's role, which the follower checked already. Never raises a role."""
    if as_role not in RANK:
        return identity.role
    if identity.kind == NODE:
        return as_role
    if RANK[as_role] < RANK.get(identity.role, -1):
        return as_role
    return identity.role


def check_request(role: str, msg_type: str, msg: Mapping[str, Any] | None = None, *,
                  need: str | None = None) -> str | None:
    """None if ``role`` may send this request, else the refusal's message (the error code
    is ``forbidden``). Pure: role x request -> allowed. ``need``: ``required_role`` of the
    request, if the caller has it already."""
    if need is None:
        need = required_role(msg_type, msg)
    if need == NODE:
        if role == NODE:
            return None
        return f"{msg_type} is sent only by agents (a node certificate); this client is {role}"
    have = NODE_RANK if role == NODE else RANK.get(role, -1)
    if have >= RANK[need]:
        return None
    what = msg_type
    if msg_type == "submit" and need == "admin":
        what = "submit with a shell task"
    return f"{what} needs the {need} role; this client is {role}"


# == rate limit (pure) ============================================================================


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved. ``take(now)`` spends one token
    and returns how long to wait before acting on it (0.0: at once). Debt is capped at
    ``burst`` so a client cannot queue unbounded future work."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at = now

    def take(self, now: float, n: float = 1.0) -> float:
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
        self.tokens = max(self.tokens - n, -self.burst)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


# == certificates (I/O: files) ======================================================================


def tls_paths_for_node(tls_dir: Path, name: str) -> tuple[Path, Path, Path]:
    return tls_dir / "ca.crt", tls_dir / "nodes" / f"{name}.crt", tls_dir / "nodes" / f"{name}.key"


def tls_paths_for_role(tls_dir: Path, role: str) -> tuple[Path, Path, Path]:
    return tls_dir / "ca.crt", tls_dir / "operators" / f"{role}.crt", tls_dir / "operators" / f"{role}.key"


def _x509():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _name(cluster: str, ou: str, cn: str):
    x509, _, _, _, _, NameOID = _x509()
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"raftdeck cluster {cluster}"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _mkdir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write(path: Path, data: bytes, mode: int) -> None:
    write_file_durably(path, data, mode)


def _new_key():
    _, _, _, ec, _, _ = _x509()
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    _, _, serialization, _, _, _ = _x509()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _sans(host: str):
    x509 = _x509()[0]
    names: list[Any] = []
    seen: set[str] = set()
    hosts = [host]
    if host in LOCAL_HOSTS:
        hosts += ["127.0.0.1", "localhost"]
    for h in hosts:
        if h in seen:
            continue
        seen.add(h)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def _issue(ca_key, ca_cert, cluster: str, ou: str, cn: str, *, ca: bool = False,
           hosts: Iterable[str] = (), days: int = 3650):
    x509, hashes, _, _, EKU, _ = _x509()
    key = _new_key()
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    subject = _name(cluster, ou, cn)
    issuer = subject if ca else ca_cert.subject
    signer = key if ca else ca_key
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + _dt.timedelta(days=days))
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        b = (b.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                                          encipher_only=False, decipher_only=False), critical=True))
    else:
        b = (b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                            critical=False)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False,
                                          key_agreement=True, key_cert_sign=False, crl_sign=False,
                                          encipher_only=False, decipher_only=False), critical=True))
        usages = [EKU.CLIENT_AUTH] if ou != NODE else [EKU.SERVER_AUTH, EKU.CLIENT_AUTH]
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        sans = [s for h in hosts for s in _sans(h)]
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(signer, hashes.SHA256())
    return key, cert


def _load_pair(crt: Path, key: Path):
    x509, _, serialization, _, _, _ = _x509()
    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        k = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise TLSError(f"{crt} / {key}: cannot load ({type(e).__name__}); move them away to "
                       "issue new ones") from None
    return cert, k


def _signed_by(cert, ca_cert) -> bool:
    _, _, _, ec, _, _ = _x509()
    try:
        ca_cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                                    ec.ECDSA(cert.signature_hash_algorithm))
        return cert.issuer == ca_cert.subject
    except Exception:
        return False


def _san_covers(cert, host: str) -> bool:
    x509 = _x509()[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        return host in san.get_values_for_type(x509.DNSName)


def init_tls(tls_dir: str | os.PathLike[str], cluster: str,
             nodes: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Create (or complete) the CA, node and operator certificates under ``tls_dir``.
    ``nodes`` is (name, host) pairs. Returns (path relative to tls_dir, "created" | "kept"
    | "reissued: why") per certificate. Raises TLSError (one line) on a problem."""
    d = Path(tls_dir)
    _, _, serialization, _, _, _ = _x509()
    try:
        _mkdir(d)
        _mkdir(d / "nodes")
        _mkdir(d / "operators")
    except OSError as e:
        raise TLSError(f"cannot create {d}: {e.strerror or e}") from None
    out: list[tuple[str, str]] = []
    ca_crt, ca_key_path = d / "ca.crt", d / "ca.key"
    if ca_crt.exists() != ca_key_path.exists():
        missing = ca_key_path if ca_crt.exists() else ca_crt
        raise TLSError(f"{missing} is missing but its pair exists; restore it, or move the "
                       f"directory {d} away to start a new CA (every certificate is reissued)")
    previous: list[Any] = []  # CAs still trusted while the CA is replaced (rotate_ca)
    if ca_crt.exists():
        ca_cert, ca_key = _load_pair(ca_crt, ca_key_path)
        previous = _load_bundle(ca_crt)[1:]
        out.append(("ca.crt", "kept"))
    else:
        ca_key, ca_cert = _issue(None, None, cluster, "ca", f"raftdeck {cluster} CA", ca=True)
        _write(ca_key_path, _key_pem(ca_key), 0o600)
        _write(ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        out.append(("ca.crt", "created"))

    def one(sub: str, name: str, ou: str, hosts: tuple[str, ...]) -> None:
        crt, key = d / sub / f"{name}.crt", d / sub / f"{name}.key"
        rel = f"{sub}/{name}.crt"
        why = None
        if crt.exists() and key.exists():
            cert, _ = _load_pair(crt, key)
            if _signed_by(cert, ca_cert):
                missing = [h for h in hosts if not _san_covers(cert, h)]
                if not missing:
                    out.append((rel, "kept"))
                    return
                why = f"reissued: host {missing[0]} was not in it"
            elif any(_signed_by(cert, p) for p in previous):
                why = "reissued: issued by the previous CA"
            else:
                raise TLSError(f"{crt} was not issued by {ca_crt}; remove {crt} and {key} to "
                               "issue a new one")
        k, cert = _issue(ca_key, ca_cert, cluster, ou, name, hosts=hosts, days=1825)
        _write(key, _key_pem(k), 0o600)
        _write(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        out.append((rel, why or "created"))

    for name, host in nodes:
        one("nodes", name, NODE, (host,))
    for role in ROLES:
        one("operators", role, role, ())
    return out


def _load_bundle(path: Path) -> list[Any]:
    x509 = _x509()[0]
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as e:
        raise TLSError(f"{path}: cannot load ({type(e).__name__}); restore it from a copy") from None


def _write_bundle(path: Path, certs: list[Any]) -> None:
    _, _, serialization, _, _, _ = _x509()
    _write(path, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs), 0o644)


ROTATE_STEPS = ("trust", "issue", "finish")


def ca_rotation_state(tls_dir: str | os.PathLike[str]) -> str:
    """Where a CA replacement stands, from the files: ``"steady"`` (one CA), ``"trust"``
    done (``ca-next.crt`` is made and ``ca.crt`` lists both), ``"issue"`` done (the new CA
    signs, the old one is still trusted)."""
    d = Path(tls_dir)
    if (d / "ca-next.crt").exists():
        return "trust"
    if (d / "ca.crt").exists() and len(_load_bundle(d / "ca.crt")) > 1:
        return "issue"
    return "steady"


def rotate_ca(tls_dir: str | os.PathLike[str], cluster: str,
              nodes: Iterable[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """Take the next step of replacing the cluster CA without stopping the cluster; each
    step's files must reach every agent (deploy, or reload) before the next one:

    1. ``trust``: a new CA (``ca-next.crt``/``.key``); ``ca.crt`` lists the old CA, then
       the new one. Agents trust both; every certificate stays.
    2. ``issue``: the new CA signs (``ca.crt`` lists it first, ``ca.key`` is its key,
       ``ca-next.*`` are gone) and every node and operator certificate is issued again.
    3. ``finish``: ``ca.crt`` lists the new CA only; an agent that reloads it ends the
       connections still made with certificates of the old one.

    Returns (the step taken, the files as ``init_tls`` reports them). Raises TLSError."""
    d = Path(tls_dir)
    _, _, serialization, _, _, _ = _x509()
    ca_crt, ca_key_path = d / "ca.crt", d / "ca.key"
    next_crt, next_key = d / "ca-next.crt", d / "ca-next.key"
    if not ca_crt.exists() or not ca_key_path.exists():
        raise TLSError(f"{d} has no CA to replace (ca.crt and ca.key); run `raftdeck init`")
    state = ca_rotation_state(d)
    bundle = _load_bundle(ca_crt)
    if state == "steady":
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        key, cert = _issue(None, None, cluster, "ca", f"raftdeck {cluster} CA {stamp}", ca=True)
        _write(next_key, _key_pem(key), 0o600)
        _write(next_crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write_bundle(ca_crt, [bundle[0], cert])
        return "trust", [("ca-next.crt", "created"), ("ca.crt", "trusts the old and the new CA")]
    if state == "trust":
        if not next_key.exists():
            raise TLSError(f"{next_key} is missing: it is the new CA's key, made by the first "
                           "step; restore it from a copy (the new CA cannot sign without it)")
        new_cert, new_key = _load_pair(next_crt, next_key)
        old = [c for c in bundle if c != new_cert]
        # ca.crt first (an interrupted step still finds ca-next.* and is taken again),
        # then its key; the leaves follow, reissued by init_tls (the previous CA's).
        _write_bundle(ca_crt, [new_cert, *old])
        _write(ca_key_path, _key_pem(new_key), 0o600)
        next_crt.unlink()
        next_key.unlink()
        out = [("ca.crt", "the new CA signs; the old one is still trusted")]
        return "issue", out + init_tls(d, cluster, nodes)[1:]
    _write_bundle(ca_crt, bundle[:1])
    return "finish", [("ca.crt", "trusts the new CA only")]


# == TLS contexts (I/O: read files) ===================================================================


def _base_context(purpose: ssl.Purpose, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    for what, p in (("ca", ca), ("cert", cert), ("key", key)):
        if not Path(p).is_file():
            raise TLSError(f"cluster.tls.{what}: {p} does not exist; run `raftdeck init` "
                           "(or give the right path)")
    try:
        ctx = ssl.create_default_context(purpose, cafile=os.fspath(ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    except (ssl.SSLError, OSError, ValueError) as e:
        # Never the file's content: only its name and the library's reason.
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or type(e).__name__
        raise TLSError(f"cannot load the TLS files ({cert}, {key}, CA {ca}): {reason}; "
                       "check that the key matches the certificate") from None
    return ctx


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """An agent's listener: its node certificate; every client and peer must present a
    certificate of the cluster CA."""
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, ca, cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """An agent's outbound links (peers, the relay): verifies the server's SAN."""
    return _base_context(ssl.Purpose.SERVER_AUTH, ca, cert, key)


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """The console's side: the operator certificate; verifies each agent's SAN."""
    return _base_context(ssl.Purpose.SERVER_AUTH, ca, cert, key)


_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def cert_file_facts(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What status shows of a certificate file: the SHA-256 fingerprint of its (first)
    certificate and, when this Python's ssl module can decode it, its serial and expiry.
    Read without the cryptography package, which an agent never loads (its memory).
    Never the key, nor the certificate's bytes. Raises TLSError naming the file."""
    try:
        pem = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError as e:
        raise TLSError(f"cannot read the certificate {path}: {e.strerror or e}") from None
    m = _PEM_CERT.search(pem)  # the first certificate of the file (a chain starts with it)
    try:
        der = ssl.PEM_cert_to_DER_cert(m.group(0)) if m else b""
    except ValueError:
        der = b""
    if not der:
        raise TLSError(f"{path} holds no PEM certificate")
    facts: dict[str, Any] = {"sha256": hashlib.sha256(der).hexdigest()}
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is not None:  # CPython's, private: the facts are a courtesy, so tolerate its absence
        try:
            decoded = decode(os.fspath(path))
            facts["issuer"] = dn_text(decoded["issuer"])
            facts["serial"] = decoded["serialNumber"]
            not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
            facts["not_after"] = _dt.datetime.fromtimestamp(not_after, _dt.timezone.utc).isoformat()
            facts["not_after_unix"] = int(not_after)
        except (ssl.SSLError, KeyError, ValueError, OSError):
            pass
    return facts


def key_permission_problem(key: Path) -> str | None:
    """A line to log if the key file is readable by group or others."""
    try:
        mode = os.stat(key).st_mode & 0o777
    except OSError:
        return None
    if mode & 0o077:
        return f"{key} is readable by others (mode {mode:o}); chmod 600 it"
    return None


# == audit (I/O: one file) ===========================================================================


class AuditLog:
    """Admin actions as JSON lines, one per request, appended to ``path`` (0600):
    ``{"ts", "node", "actor", "role", "remote", "request", "fields", "ok", "error"}``.
    Secrets in ``fields`` are redacted (nodeagent.logs.redact)."""

    def __init__(self, path: str | os.PathLike[str], node: str):
        self.path = Path(path)
        self.node = node
        self.written = 0

    def record(self, *, actor: Identity, role: str, remote: str, msg: Mapping[str, Any],
               ok: bool, error: str | None = None) -> None:
        from .logs import redact

        fields = {k: v for k, v in msg.items() if k not in ("type", "id")}
        if "tasks" in fields:
            fields["tasks"] = [{k: t.get(k) for k in ("id", "kind", "args")} for t in fields["tasks"]]
        line = {
            "ts": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "node": self.node, "actor": actor.name, "kind": actor.kind, "role": role,
            "remote": remote, "request": msg.get("type"), "fields": redact(_jsonable(fields)),
            "ok": ok, "error": error,
        }
        data = (json.dumps(line, separators=(",", ":"), default=str) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            self.written += 1
        except OSError:
            import logging

            logging.getLogger("nodeagent.security").warning(
                "cannot write the audit log", extra={"path": str(self.path), "audit": line})


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v



_DN_KEYS = {"countryName": "C", "organizationName": "O", "organizationalUnitName": "OU",
            "commonName": "CN"}


def dn_text(name: Any) -> str:
    """A distinguished name as the ssl module decodes it (a tuple of RDNs of (key, value)
    pairs) in one line, ``O=..., OU=..., CN=...``: how issuers and subjects are compared."""
    try:
        return ", ".join(f"{_DN_KEYS.get(k, k)}={v}" for rdn in name for k, v in rdn)
    except (TypeError, ValueError):
        return ""


def trusted_cas(ctx: ssl.SSLContext) -> list[dict[str, Any]]:
    """The CA certificates ``ctx`` trusts (its CA file may hold several while the CA is
    being replaced): the SHA-256 fingerprint, subject and expiry of each, in file order."""
    out = []
    for der, info in zip(ctx.get_ca_certs(binary_form=True), ctx.get_ca_certs()):
        fact = {"sha256": hashlib.sha256(der).hexdigest(), "subject": dn_text(info.get("subject", ()))}
        try:
            fact["not_after"] = _dt.datetime.fromtimestamp(
                ssl.cert_time_to_seconds(info["notAfter"]), _dt.timezone.utc).isoformat()
        except (KeyError, ValueError):
            pass
        out.append(fact)
    return out


def pem_fingerprints(path: str | os.PathLike[str]) -> list[str]:
    """The SHA-256 fingerprints of every certificate in a PEM file, in order (a CA file
    that holds two CAs during a rotation gives two). Raises TLSError naming the file."""
    try:
        pem = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError as e:
        raise TLSError(f"cannot read {path}: {e.strerror or e}") from None
    out = []
    for m in _PEM_CERT.finditer(pem):
        try:
            out.append(hashlib.sha256(ssl.PEM_cert_to_DER_cert(m.group(0))).hexdigest())
        except ValueError:
            raise TLSError(f"{path}: a certificate block does not decode") from None
    return out
