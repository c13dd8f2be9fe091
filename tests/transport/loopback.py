"""Loopback connections for the transport tests (plain, and TLS with our stream on the
server side), and a deadline for each test's trio run."""

from __future__ import annotations

import ssl

import trio

from nodeagent.tlsstream import TLSStream


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """(client, server) ends of a fresh TCP connection on loopback."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


async def tls_server_pair(server_ctx: ssl.SSLContext,
                          client_ctx: ssl.SSLContext) -> tuple[TLSStream, trio.SSLStream]:
    """(our server-side TLSStream, trio's client SSLStream), handshaken."""
    raw_client, raw_server = await tcp_pair()
    ours = TLSStream(raw_server, server_ctx, server_side=True)
    theirs = trio.SSLStream(raw_client, client_ctx, server_hostname="127.0.0.1")
    async with trio.open_nursery() as n:
        n.start_soon(ours.do_handshake)
        n.start_soon(theirs.do_handshake)
    return ours, theirs


def with_deadline(main, seconds: float = 20) -> None:
    """``trio.run(main)``, failing after ``seconds`` instead of hanging."""
    async def bounded():
        with trio.fail_after(seconds):
            await main()

    trio.run(bounded)
