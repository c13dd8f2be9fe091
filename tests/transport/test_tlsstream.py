"""TLSStream against trio's own SSLStream on real sockets, with the cluster's certificates:
the handshake, both directions, a write that does not wait, a full socket, and failures."""

import os
import ssl

import pytest
import trio

from nodeagent import security as sec
from nodeagent.tlsstream import TLSStream

from .loopback import tcp_pair, with_deadline

MB = 1 << 20


async def pair(server_ctx, client_ctx):
    """(our client TLSStream, trio's server SSLStream), handshaken."""
    raw_client, raw_server = await tcp_pair()
    ours = TLSStream(raw_client, client_ctx, server_hostname="127.0.0.1")
    theirs = trio.SSLStream(raw_server, server_ctx, server_side=True)
    async with trio.open_nursery() as n:
        n.start_soon(ours.do_handshake)
        n.start_soon(theirs.do_handshake)
    return ours, theirs


async def read_exactly(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(1 << 16)
        assert chunk, f"end of stream after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def pattern(tag: int, n: int) -> bytes:
    return bytes((tag + i) % 251 for i in range(256)) * (n // 256)


def test_both_directions_and_the_peer_certificate(contexts):
    async def main():
        ours, theirs = await pair(*contexts)
        assert ours.write_now(b"ping") is True  # a reading peer: all of it left at once
        assert await read_exactly(theirs, 4) == b"ping"
        await ours.send_all(b"more")
        assert await read_exactly(theirs, 4) == b"more"
        await theirs.send_all(b"pong" * 10_000)
        assert await read_exactly(ours, 40_000) == b"pong" * 10_000
        subject = dict(x[0] for x in ours.getpeercert()["subject"])
        assert subject["commonName"] == "n1"
        await theirs.aclose()
        assert await ours.receive_some() == b""  # the end of the stream, not an error
        await ours.aclose()

    with_deadline(main)


def test_a_full_socket_keeps_the_rest_for_send_all(contexts):
    """write_now never waits: with the peer not reading, the kernel takes part of the
    ciphertext and the rest waits in the stream until send_all (of nothing) sends it."""
    async def main():
        ours, theirs = await pair(*contexts)
        data = pattern(1, 16 * MB)
        assert ours.write_now(data) is False  # far more than a loopback socket holds
        async with trio.open_nursery() as n:
            n.start_soon(ours.send_all, b"")
            assert await read_exactly(theirs, len(data)) == data

    with_deadline(main)


class Gate(trio.abc.Stream):
    """The socket stream under a TLSStream, whose sends wait for ``open``."""

    def __init__(self, inner):
        self.inner, self.socket, self.open = inner, inner.socket, trio.Event()

    async def send_all(self, data):
        await self.open.wait()
        await self.inner.send_all(data)

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(max_bytes)

    async def wait_send_all_might_not_block(self):
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self):
        await self.inner.aclose()


def test_write_now_during_a_send_all_writes_nothing_itself(contexts):
    """While a send_all is under way, a write_now joins the queue behind what send_all
    is sending: writing to the socket itself would put its records before the earlier
    ones, and the peer would fail to decrypt them. The peer gets both, in order."""
    async def main():
        ours, theirs = await pair(*contexts)
        gate = ours.transport_stream = Gate(ours.transport_stream)
        first, second = pattern(1, 64 * 1024), pattern(2, 4096)
        async with trio.open_nursery() as n:
            n.start_soon(ours.send_all, first)
            while not ours._sending:  # set as send_all starts; it runs to the gate unbroken
                await trio.sleep(0.001)
            assert ours.write_now(second) is False
            gate.open.set()
            got = await read_exactly(theirs, len(first) + len(second))
        assert got == first + second

    with_deadline(main)


def test_small_reads_drain_what_was_decrypted_before_waiting(contexts):
    """A record bigger than one read: the rest of it is already decrypted and must be
    returned, not waited for on a socket that has nothing more to say."""
    async def main():
        ours, theirs = await pair(*contexts)
        data = pattern(3, 40_000)
        await theirs.send_all(data)
        got = bytearray()
        while len(got) < len(data):
            got += await ours.receive_some(1000)
        assert got == data

    with_deadline(main)


def test_a_refused_handshake_raises_broken_resource_with_the_tls_cause(contexts, tmp_path):
    """A client certificate from another CA: the server refuses it, both ends raise
    trio.BrokenResourceError caused by the ssl error, and nothing is left open."""
    server_ctx, _ = contexts
    other = tmp_path / "other"
    sec.init_tls(other, "x", [("n9", "127.0.0.1")])
    stranger = sec.peer_client_context(*sec.tls_paths_for_node(other, "n9"))
    stranger.check_hostname = False
    stranger.verify_mode = ssl.CERT_NONE  # it would talk to anyone: only the server refuses

    async def main():
        raw_client, raw_server = await tcp_pair()
        ours = TLSStream(raw_server, server_ctx, server_side=True)
        theirs = trio.SSLStream(raw_client, stranger, server_hostname="127.0.0.1")
        errors = []

        async def shake(s):
            try:
                await s.do_handshake()
                await s.receive_some()  # TLS 1.3: the client hears of the refusal here
            except trio.BrokenResourceError as e:
                errors.append((s, e))

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(shake, ours)
                n.start_soon(shake, theirs)
        mine = [e for s, e in errors if s is ours]
        assert mine and isinstance(mine[0].__cause__, ssl.SSLError), errors
        assert "certificate" in str(mine[0]).lower()
        await ours.aclose()
        await theirs.aclose()

    with_deadline(main)


def test_a_write_after_the_close_fails_and_touches_no_reused_descriptor(contexts, tmp_path):
    """A server answers a request on a connection that has already closed. The close
    came while a send_all waited on a full socket, so it sent no close_notify and TLS
    still encrypts. write_now must then fail (OSError) and not write the ciphertext to
    whatever now holds the socket's old descriptor number. With the number kept from
    before the close, a reply once went into the pipe of a task being spawned and hung
    the spawn (CI on session 7's head)."""
    async def main():
        ours, theirs = await pair(*contexts)
        old = ours.transport_stream.socket.fileno()
        failed = []

        async def stuck_send():
            try:
                await ours.send_all(b"x" * (16 * MB))  # the peer does not read
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                failed.append(e)

        async with trio.open_nursery() as n:
            n.start_soon(stuck_send)
            while not ours._sending:
                await trio.sleep(0.01)
            await trio.sleep(0.05)
            await ours.aclose()  # from another task, mid-send
        assert failed, "the send did not fail when its socket closed"
        # Take the freed number (the lowest free one goes first) with a plain file.
        files = []
        while True:
            fd = os.open(tmp_path / f"f{len(files)}", os.O_WRONLY | os.O_CREAT)
            files.append(fd)
            if fd >= old:
                break
        try:
            assert fd == old, f"the socket's number {old} was not reused (got {fd})"
            with pytest.raises(OSError):
                ours.write_now(b"late reply" * 100)
            await ours.aclose()  # a second close writes nothing either
            assert os.fstat(fd).st_size == 0, "ciphertext went to the reused descriptor"
        finally:
            for f in files:
                os.close(f)
        await theirs.aclose()

    with_deadline(main)
