"""receive_waiting_first: the agent's read on a plain TCP connection (wait, then read)."""

import os
import socket
import struct

import pytest
import trio

from nodeagent.tlsstream import receive_waiting_first

from .loopback import tcp_pair, with_deadline


def test_reads_what_arrives_and_then_the_end_of_stream():
    async def main():
        client, server = await tcp_pair()
        got = []

        async def reader():
            while chunk := await receive_waiting_first(server, 65536):
                got.append(chunk)

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await client.send_all(b"first")
            await trio.sleep(0.05)  # the reader is waiting now, not reading
            await client.send_all(b"second")
            await client.aclose()
        assert b"".join(got) == b"firstsecond"
        await server.aclose()

    with_deadline(main)


def test_a_reset_connection_raises_broken_resource():
    async def main():
        client, server = await tcp_pair()
        # Close with an RST: SO_LINGER on, timeout 0.
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await receive_waiting_first(server, 65536)
        await server.aclose()

    with_deadline(main)


def test_a_close_during_the_wait_raises_closed_and_reads_no_reused_descriptor(tmp_path):
    """Another task closes the connection while the read waits: the read must end with
    ClosedResourceError and never read from whatever then holds the socket's number
    (the lesson of session 8's stale-descriptor write)."""
    async def main():
        client, server = await tcp_pair()
        old = server.socket.fileno()
        outcome = []

        async def reader():
            try:
                outcome.append(await receive_waiting_first(server, 65536))
            except trio.ClosedResourceError as e:
                outcome.append(e)

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.sleep(0.05)
            await server.aclose()
        assert len(outcome) == 1 and isinstance(outcome[0], trio.ClosedResourceError)
        # A file takes the freed number; a read on the closed stream must not touch it.
        files = []
        while True:
            fd = os.open(tmp_path / f"f{len(files)}", os.O_RDWR | os.O_CREAT)
            os.write(fd, b"not the socket's bytes")
            os.lseek(fd, 0, os.SEEK_SET)
            files.append(fd)
            if fd >= old:
                break
        try:
            assert fd == old, f"the socket's number {old} was not reused (got {fd})"
            with pytest.raises(trio.ClosedResourceError):
                await receive_waiting_first(server, 65536)
            assert os.lseek(fd, 0, os.SEEK_CUR) == 0, "the read took bytes from the reused descriptor"
        finally:
            for f in files:
                os.close(f)
        await client.aclose()

    with_deadline(main)


def test_two_readers_at_once_is_an_error():
    async def main():
        client, server = await tcp_pair()
        async with trio.open_nursery() as n:
            n.start_soon(receive_waiting_first, server, 10)
            await trio.sleep(0.05)
            with pytest.raises(trio.BusyResourceError):
                await receive_waiting_first(server, 10)
            await client.send_all(b"x")
        await client.aclose()
        await server.aclose()

    with_deadline(main)
