"""A follower relays a write to the leader when the client asks it to (forward: true),
and answers not_leader with the leader's name when it does not."""

from __future__ import annotations

import asyncio

import pytest

from console.client import RequestError
from console.local import LocalCluster

pytestmark = pytest.mark.integration


def test_a_follower_forwards_writes_on_request_and_redirects_otherwise(tmp_path):
    lc = LocalCluster(tmp_path, 3)
    lc.start_all()

    async def main():
        async with lc.client() as c:
            leader = await lc.wait_leader(c)
            follower = next(n for n in lc.names if n != leader)
            with pytest.raises(RequestError) as e:
                await c.call(follower, "register", client_id="fw")
            assert e.value.code == "not_leader" and e.value.leader == leader
            r = await c.call(follower, "register", client_id="fw", forward=True)
            assert r["index"] > 0
            r = await c.call(follower, "put", key="k", value=b"v", client_id="fw", seq=2,
                             forward=True)
            # A retry of the same (client_id, seq), through another follower, applies once.
            other = next(n for n in lc.names if n not in (leader, follower))
            r2 = await c.call(other, "put", key="k", value=b"v", client_id="fw", seq=2,
                              forward=True)
            assert r2["index"] > r["index"]  # a new log entry, answered from the session
            st = await lc.wait_converged(c)
            assert {s["keys"] for s in st.values()} == {1}
            assert await c.get("k") == b"v"

    try:
        asyncio.run(main())
    finally:
        lc.stop_all()
