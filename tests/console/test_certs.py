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
