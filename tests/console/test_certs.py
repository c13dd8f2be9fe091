"""The console's certificate alerts (console/certs.py): pure rules, and the header of the
console showing them from the agents' statuses, and clearing them when fixed."""

from __future__ import annotations

import asyncio

from console.certs import CERT_WARN_DAYS, cert_alerts, node_rows
from console.demo import WALL, demo_app
from console.testing import until

DAY = 86400


def sec(days: float, *, cas: int = 1, error: str | None = None) -> dict:
    return {"cert": {"sha256": "ab" * 32, "not_after_unix": int(WALL + days * DAY + 60),
                     "not_after": "2026-12-07T00:00:00+00:00", "reloads": 0, "reload_error": error},
            "ca": [{"sha256": f"{i:064x}", "subject": f"CN=ca {i}"} for i in range(cas)]}


def test_alerts_name_only_what_needs_the_operator():
    fine = {f"n{i}": {"security": sec(400)} for i in range(1, 4)}
    assert cert_alerts(node_rows(fine), WALL) == []
    soon = dict(fine, n2={"security": sec(CERT_WARN_DAYS - 1)})
    assert cert_alerts(node_rows(soon), WALL) == [f"cert of n2 expires in {CERT_WARN_DAYS - 1} days"]
    gone = dict(fine, n3={"security": sec(-2)})
    assert cert_alerts(node_rows(gone), WALL) == ["cert of n3 EXPIRED"]
    refused = dict(fine, n1={"security": sec(400, error="cannot load the TLS files")})
    assert cert_alerts(node_rows(refused), WALL) == ["TLS reload refused by n1"]
    rotating = dict(fine, n1={"security": sec(400, cas=2)})
    assert cert_alerts(node_rows(rotating), WALL) == ["CA replacement under way"]
    between = {n: {"security": sec(400, cas=2)} for n in fine}  # every agent took a step
    assert cert_alerts(node_rows(between), WALL) == ["CA replacement under way"]
    # An agent that does not answer, or one without TLS, says nothing.
    assert cert_alerts(node_rows({"n1": "connection refused", "n2": {"security": {"cert": None}}}),
                       WALL) == []


def test_the_header_shows_certificate_alerts_and_clears_them():
    app = demo_app()
    clock = [app.mono()]
    app.mono = lambda: clock[0]
    m = app.model

    def feed(security: dict[str, dict]) -> None:
        clock[0] += 2.0  # past the header's once-a-second look at the certificates
        for name, s in security.items():
            m.update(name, {**m.status(name), "security": s}, clock[0])

    feed({"n1": sec(400, cas=2), "n2": sec(10), "n3": sec(400, cas=2), "n4": sec(400, cas=2)})

    async def main():
        async with app.run_test(size=(160, 40)) as pilot:
            def header() -> str:
                return str(app.query_one("#health").content)

            await until(pilot, lambda: "TLS: cert of n2 expires in 10 days; CA replacement under way"
                        in header(), 10, lambda: header())
            feed({n: sec(400) for n in ("n1", "n2", "n3", "n4")})
            await until(pilot, lambda: "TLS:" not in header(), 10, lambda: header())

    asyncio.run(main())


def test_a_console_context_follows_its_files_and_keeps_the_last_good_one(tmp_path):
    from console.client import current_context, followed_context
    from nodeagent import security as sec

    d = tmp_path / "tls"
    nodes = [("n1", "127.0.0.1")]
    sec.init_tls(d, "demo", nodes)
    ctx = followed_context(*sec.tls_paths_for_role(d, "admin"))
    files = ctx.raftdeck_files
    files.checked = -1e9  # past the once-a-second throttle
    assert current_context(ctx) is ctx  # nothing changed
    sec.rotate_ca(d, "demo", nodes)
    sec.rotate_ca(d, "demo", nodes)  # a new CA, and a new admin certificate from it
    assert current_context(ctx) is ctx  # looked at less than a second ago
    files.checked = -1e9
    new = current_context(ctx)
    assert new is not ctx and len(new.get_ca_certs()) == 2
    assert current_context(ctx) is new is current_context(new)
    (d / "operators" / "admin.crt").write_text("half copied")
    files.checked = -1e9
    assert current_context(ctx) is new  # files that do not load: the context in use stays
    assert current_context(None) is None  # TLS off
