"""An agent reads one inbound link per peer: the newest. A peer that reconnected has
given up its older connection, and one whose end never reached us (its host powered off
during a partition: no FIN, no RST) would otherwise be read forever, holding a socket
and a decoder of up to 64 MiB per connection."""

from __future__ import annotations

import asyncio

import pytest

from nodeagent.protocol import PROTOCOL_VERSION, encode

pytestmark = pytest.mark.integration


def test_a_newer_link_from_a_peer_ends_the_older_one(make_cluster):
    lc = make_cluster(3, tls=False)

    async def hello_as(node: str, port: int):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode({"type": "hello", "role": "peer", "cluster": lc.cluster,
                             "version": PROTOCOL_VERSION, "node": node}))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(1), 10), "no hello_ok"
        return reader, writer

    async def main():
        async with lc.client(timeout=3.0) as c:
            leader = await lc.wait_leader(c)
            victim, gone = [n for n in lc.names if n != leader]
            lc.kill(gone)  # its own links end; what follows speaks for it
            r1, w1 = await hello_as(gone, lc.ports[victim])
            await asyncio.sleep(0.5)
            assert not r1.at_eof()
            before = (await c.call(victim, "status"))["connections"]
            r2, w2 = await hello_as(gone, lc.ports[victim])
            # The older one is closed by the agent: read to its end (bounded).
            rest = await asyncio.wait_for(r1.read(), 10)
            assert r1.at_eof(), rest
            await asyncio.sleep(0.5)
            assert not r2.at_eof()  # the newest stays
            assert (await c.call(victim, "status"))["connections"] == before
            for w in (w1, w2):
                w.close()

    asyncio.run(main())
