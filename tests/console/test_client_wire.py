"""AgentConnection's socket handling (console/client.py ``_Wire``): frames decoded as
they arrive and handed to the waiting request. The far end is a scripted agent on a real
127.0.0.1 socket speaking the real protocol, so each test controls exactly which bytes
arrive when: split frames, replies out of order, garbage, a close mid-frame."""

from __future__ import annotations

import asyncio

import pytest

from console.client import AgentConnection, ClusterClient, ConnectionFailed, OutcomeUnknown, RequestError
from nodeagent.protocol import NEED_DATA, PROTOCOL_VERSION, FrameDecoder, encode

HELLO_OK = encode({"type": "hello_ok", "node": "n1", "version": PROTOCOL_VERSION, "leader": "n1"})


def _reply(rid: int, result) -> bytes:
    return encode({"type": "reply", "id": rid, "ok": True, "result": result})


class ScriptedAgent:
    """Accepts one connection, reads the hello, then runs ``script(reader, writer, next)``
    where ``next()`` returns the client's next request."""

    def __init__(self, script, hello: bytes = HELLO_OK):
        self.script = script
        self.hello = hello
        self.done = asyncio.Event()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        dec = FrameDecoder()

        async def next_msg():
            while True:
                m = dec.next_message()
                if m is not NEED_DATA:
                    return m
                dec.receive_data(await reader.read(65536))

        try:
            hello = await next_msg()
            assert hello["type"] == "hello"
            writer.write(self.hello)
            await writer.drain()
            await self.script(reader, writer, next_msg)
        finally:
            writer.close()
            self.done.set()


async def _connect(agent: ScriptedAgent) -> AgentConnection:
    conn = AgentConnection("n1", "127.0.0.1", agent.port, "test", client_id="wire-test")
    await conn.connect()
    return conn


def test_replies_out_of_order_and_byte_by_byte_reach_their_requests():
    async def script(reader, writer, next_msg):
        a, b = await next_msg(), await next_msg()
        # b's reply first, one byte per write (each its own segment: TCP_NODELAY)
        for byte in _reply(b["id"], {"value": b["key"]}):
            writer.write(bytes([byte]))
            await writer.drain()
        writer.write(_reply(a["id"], {"value": a["key"]}) + _reply(999, "nobody asked"))
        await writer.drain()
        await reader.read()  # until the client closes

    async def main():
        async with ScriptedAgent(script) as agent:
            conn = await _connect(agent)
            try:
                got = await asyncio.gather(conn.request("get", key="a"), conn.request("get", key="b"))
                assert got == [{"value": "a"}, {"value": "b"}]
                assert conn.connected
            finally:
                await conn.close()
            assert not conn.connected

    asyncio.run(main())


@pytest.mark.parametrize("ending", ["garbage", "cut", "error"])
def test_a_broken_stream_fails_the_waiting_request_as_unknown(ending):
    async def script(reader, writer, next_msg):
        await next_msg()
        if ending == "garbage":
            writer.write(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")  # not msgpack
        elif ending == "cut":
            writer.write(_reply(1, "x")[:7])  # then the connection ends mid-frame
        else:
            writer.write(encode({"type": "error", "code": "internal", "message": "bye"}))
        await writer.drain()

    async def main():
        async with ScriptedAgent(script) as agent:
            conn = await _connect(agent)
            with pytest.raises(OutcomeUnknown, match="connection lost"):
                await conn.request("get", key="a", timeout=10)
            assert not conn.connected
            with pytest.raises(ConnectionFailed):
                await conn.request("get", key="a")
            await conn.close()

    asyncio.run(main())


def test_a_refused_hello_says_why():
    async def script(reader, writer, next_msg):
        pass

    refusal = encode({"type": "error", "code": "wrong_cluster", "message": "this is cluster prod"})

    async def main():
        async with ScriptedAgent(script, hello=refusal) as agent:
            with pytest.raises(ConnectionFailed, match="refused: wrong_cluster: this is cluster prod"):
                await _connect(agent)

    asyncio.run(main())


def test_a_hello_answered_with_garbage_says_so():
    async def script(reader, writer, next_msg):
        await reader.read()

    async def main():
        async with ScriptedAgent(script, hello=b"\x00\x00\x00\x03\xc1\xc1\xc1") as agent:
            with pytest.raises(ConnectionFailed, match="no hello answer"):
                await _connect(agent)

    asyncio.run(main())


def test_an_error_reply_and_status_pushes_with_deltas(caplog):
    async def script(reader, writer, next_msg):
        req = await next_msg()
        writer.write(encode({"type": "reply", "id": req["id"], "ok": False,
                             "error": {"code": "not_leader", "message": "ask n2"}, "leader": "n2"}))
        sub = await next_msg()
        assert sub["type"] == "subscribe"
        writer.write(_reply(sub["id"], None))
        writer.write(encode({"type": "status_update", "id": sub["id"], "status": {"term": 1, "role": "leader"}}))
        writer.write(encode({"type": "status_update", "id": sub["id"], "delta": True,
                             "status": {"set": {"term": 2}}}))
        await writer.drain()
        await asyncio.sleep(0.2)
        # A delta that does not fit the map ends the stream (and the connection).
        writer.write(encode({"type": "status_update", "id": sub["id"], "delta": True,
                             "status": {"term": 3}}))
        await writer.drain()
        await reader.read()

    async def main():
        async with ScriptedAgent(script) as agent:
            conn = await _connect(agent)
            with pytest.raises(RequestError) as info:
                await conn.request("get", key="a")
            assert (info.value.code, info.value.leader) == ("not_leader", "n2")
            seen = [st async for st in conn.subscribe(100)]
            assert seen == [{"term": 1, "role": "leader"}, {"term": 2, "role": "leader"}]
            assert not conn.connected
            await conn.close()

    asyncio.run(main())
    # Ended by the client's own decision, not by asyncio catching an exception.
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelname == "ERROR"]


def test_no_leader_until_the_deadline_says_so_not_who_answered_last():
    """Every node answers not_leader with no hint (a majority is down): the operator is
    told that no node led within the operation's time, and what to look at."""
    async def script(reader, writer, next_msg):
        while True:
            req = await next_msg()
            writer.write(encode({"type": "reply", "id": req["id"], "ok": False,
                                 "error": {"code": "not_leader", "message": "this node is not the leader"}}))
            await writer.drain()

    async def main():
        hello = encode({"type": "hello_ok", "node": "n1", "version": PROTOCOL_VERSION, "leader": None})
        async with ScriptedAgent(script, hello=hello) as agent:
            async with ClusterClient({"n1": ("127.0.0.1", agent.port)}, "test", op_timeout=0.5) as c:
                with pytest.raises(RequestError) as info:
                    await c.get("k")
        assert info.value.code == "not_leader"
        assert str(info.value) == ("not_leader: no node led within 0.5s (the last asked: n1); is a "
                                   "majority of the voters down or cut off? `raftdeck status` shows "
                                   "who answers")

    asyncio.run(main())


def test_a_subscription_that_goes_silent_is_given_up():
    """A connection whose end never reaches us (a host powered off): the agent's pushes,
    keepalives included, stop. subscribe(silence_s=...) gives it up, so the console
    reconnects and the row comes back when the host does."""
    async def script(reader, writer, next_msg):
        sub = await next_msg()
        writer.write(_reply(sub["id"], None))
        writer.write(encode({"type": "status_update", "id": sub["id"], "status": {"term": 1}}))
        await writer.drain()
        await reader.read()  # then nothing, as if the host were gone

    async def main():
        async with ScriptedAgent(script) as agent:
            conn = await _connect(agent)
            seen = []
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(ConnectionFailed, match="no status for 0.5s"):
                async for st in conn.subscribe(100, silence_s=0.5):
                    seen.append(st)
            assert seen == [{"term": 1}] and asyncio.get_running_loop().time() - t0 < 5
            await conn.close()

    asyncio.run(main())


def test_an_agent_that_reads_nothing_cannot_hold_a_request_past_its_timeout():
    """Frames the agent does not take pile up in the client's buffer; waiting for room is
    bounded by the request's timeout like waiting for the answer is."""
    async def main():
        stop = asyncio.Event()

        async def script(reader, writer, next_msg):
            await stop.wait()  # never reads again

        async with ScriptedAgent(script) as agent:
            conn = await _connect(agent)
            t0 = asyncio.get_running_loop().time()
            said = []
            for _ in range(20):  # until the kernel's buffers and ours are full
                try:
                    await conn.request("put", timeout=1.0, key="k", value=b"x" * 3_000_000,
                                       client_id="c", seq=1)
                except OutcomeUnknown as e:
                    said.append(str(e))
                    if "took nothing" in str(e):
                        break
            assert said and said[-1] == ("n1: the agent took nothing for 1s (it reads slowly or "
                                         "not at all)"), said
            assert asyncio.get_running_loop().time() - t0 < 40
            conn._transport.abort()
            stop.set()

    asyncio.run(main())


def test_registration_against_a_silent_leader_is_bounded_by_the_operation_timeout():
    """A leader that answers the hello but nothing after: a write gives up within its
    op_timeout (retries included), not after eight registration attempts of it."""
    async def script(reader, writer, next_msg):
        while isinstance(await next_msg(), dict):
            pass  # read, never answer, until the client hangs up

    async def main():
        hello = encode({"type": "hello_ok", "node": "n1", "version": PROTOCOL_VERSION, "leader": "n1"})
        async with ScriptedAgent(script, hello=hello) as agent:
            async with ClusterClient({"n1": ("127.0.0.1", agent.port)}, "test", timeout=0.3,
                                     op_timeout=1.0) as c:
                t0 = asyncio.get_running_loop().time()
                with pytest.raises(OutcomeUnknown, match="could not register a client session within 1s"):
                    await c.put("k", b"v")
                assert asyncio.get_running_loop().time() - t0 < 3

    asyncio.run(main())


def test_a_request_too_large_to_send_is_refused_here_and_says_what_to_do():
    """An operator's oversized submit (many large tasks) is refused before anything is
    sent, as a RequestError (no effect) that says so, not an internal error."""
    async def script(reader, writer, next_msg):
        await reader.read()

    async def main():
        async with ScriptedAgent(script) as agent:
            conn = await _connect(agent)
            with pytest.raises(RequestError) as info:
                await conn.request("put", key="k", value=b"x" * 5_000_000, client_id="c", seq=1)
            assert info.value.code == "frame_too_large"
            assert "nothing was sent; send fewer or smaller items" in str(info.value)
            assert conn.connected  # the connection is fine for what follows
            await conn.close()

    asyncio.run(main())
