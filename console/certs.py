"""What the console says about the certificates the agents present (pure): the lines of
`raftdeck status` and the alerts of the console's header, both from the ``security`` part
of each agent's status (``cert``: the certificate in use and its reloads; ``ca``: the CAs
it trusts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

CERT_WARN_DAYS = 30  # warn this long before a node certificate expires


@dataclass(frozen=True)
class CertFacts:
    first: tuple[str, str, int] | None  # (node, expiry date, days left): the first to expire
    refused: list[tuple[str, str]] = field(default_factory=list)  # (node, why its reload was refused)
    trust: dict[str, int] = field(default_factory=dict)  # node -> how many CAs it trusts

    @property
    def expiring(self) -> bool:
        return self.first is not None and self.first[2] < CERT_WARN_DAYS

    @property
    def replacing_ca(self) -> bool:
        """Agents trust more than one CA, or not all the same number: a CA replacement
        (`raftdeck init --rotate-ca`) is between steps."""
        counts = set(self.trust.values())
        return bool(counts) and (len(counts) > 1 or max(counts) > 1)


def node_rows(statuses: Mapping[str, Any]) -> list[dict]:
    """``{"name", "cert", "ca"}`` per node from a name -> status map (an agent that did
    not answer has a string or None there, and is left out)."""
    rows = []
    for name, st in statuses.items():
        if not isinstance(st, Mapping):
            continue
        sec = st.get("security") or {}
        rows.append({"name": name, "cert": sec.get("cert"),
                     "ca": [c.get("sha256") for c in sec.get("ca") or () if isinstance(c, Mapping)]})
    return rows


def cert_facts(nodes: Iterable[Mapping[str, Any]], now: float) -> CertFacts:
    """From rows as ``node_rows`` makes them (or `raftdeck status`'s); ``now`` is wall-clock
    seconds."""
    nodes = list(nodes)
    certs = [(r["name"], r["cert"]) for r in nodes if r.get("cert")]
    dated = sorted((c["not_after_unix"], name, c.get("not_after") or "") for name, c in certs
                   if isinstance(c.get("not_after_unix"), int))
    first = None
    if dated:
        at, name, iso = dated[0]
        first = (name, iso[:10], int((at - now) // 86400))
    return CertFacts(first=first,
                     refused=[(name, c["reload_error"]) for name, c in certs if c.get("reload_error")],
                     trust={r["name"]: len(r["ca"]) for r in nodes if r.get("ca")})


def cert_lines(nodes: Iterable[Mapping[str, Any]], now: float) -> list[str]:
    """What `raftdeck status` says: the certificate that expires first (with a warning
    within ``CERT_WARN_DAYS``), any refused reload, a CA replacement under way."""
    f = cert_facts(nodes, now)
    out = []
    if f.first is not None:
        name, day, days = f.first
        line = f"certificates: the first to expire is {name}'s, on {day} (in {days} days)"
        if f.expiring:
            line += ("; WARNING: renew it: delete its files under the TLS folder, run "
                     "`raftdeck init`, then `raftdeck deploy` (or copy them and send SIGHUP)")
        out.append(line)
    for name, why in f.refused:
        out.append(f"{name}: the last TLS reload was refused, the old certificate is in use: {why}")
    if f.replacing_ca:
        counts = ", ".join(f"{name} {k}" for name, k in sorted(f.trust.items()))
        out.append(f"CA: a replacement is under way (CAs trusted: {counts}); the next step "
                   "is `raftdeck init --rotate-ca` once every agent has the files")
    return out


def cert_alerts(nodes: Iterable[Mapping[str, Any]], now: float) -> list[str]:
    """The console header's short form: only what needs the operator (an expiry within
    ``CERT_WARN_DAYS``, a refused reload, a CA replacement between steps)."""
    f = cert_facts(nodes, now)
    out = []
    if f.expiring:
        name, _, days = f.first
        out.append(f"cert of {name} expires in {days} days" if days >= 0 else f"cert of {name} EXPIRED")
    if f.refused:
        out.append("TLS reload refused by " + ", ".join(name for name, _ in f.refused))
    if f.replacing_ca:
        out.append("CA replacement under way")
    return out
