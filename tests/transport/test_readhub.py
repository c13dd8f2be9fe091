"""ReadHub on real sockets: one wake-up reads every connection that has data, a message the
step declines goes to the connection's task in order, and the end of a stream, a
protocol violation and a cancelled wait each reach the task that waits."""

import socket

import pytest
import trio

from nodeagent.protocol import ProtocolError, encode
from nodeagent.readhub import ReadHub
from nodeagent.server import Connection

from .loopback import tls_server_pair, with_deadline as run


def put(i: int, key: str = "k") -> bytes:
    return encode({"type": "put", "id": i, "key": f"{key}{i}", "value": b"v", "client_id": "c",
                   "seq": i})


def get(i: int) -> bytes:
    return encode({"type": "get", "id": i, "key": f"k{i}"})


def conn_pair() -> tuple[Connection, socket.socket]:
    """(a Connection over our end, the raw other end to write frames into)."""
    ours, theirs = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    return Connection(stream, 1 << 20, "test"), theirs


async def wait_until(cond) -> None:
    while not cond():
        await trio.sleep(0.001)


def test_one_wakeup_reads_every_connection_with_data():
    """Eight connections each get a put while their tasks wait in take(): the hub answers
    all eight in one wake-up, without waking a connection's task, between one call of
    its begin hook and one of its end hook (the driver takes them as one batch)."""
    async def main():
        seen: list = []
        hub = ReadHub(lambda: seen.append("begin"), lambda: seen.append("end"))
        pairs = [conn_pair() for _ in range(8)]
        woke: list[int] = []

        async def serve(n: int, conn: Connection) -> None:
            def step(msg):
                seen.append((n, msg["id"]))
                return True
            while True:
                msg = await hub.take(conn, step)
                woke.append(n)
                if msg is None:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            await wait_until(lambda: hub.running)
            for n, (conn, _) in enumerate(pairs):
                nursery.start_soon(serve, n, conn)
            await wait_until(lambda: len(hub._watches) == 8)
            for n, (_, raw) in enumerate(pairs):
                raw.sendall(put(n))
            await wait_until(lambda: len(seen) == 10)
            assert seen[0] == "begin" and seen[-1] == "end"
            assert sorted(seen[1:-1]) == [(n, n) for n in range(8)]
            assert hub.wakeups == 1
            assert hub.messages == 8
            assert woke == []  # no task woke for a write
            for _, raw in pairs:
                raw.close()  # each task sees its end of stream and returns
            await wait_until(lambda: len(woke) == 8)
            nursery.cancel_scope.cancel()
        assert hub._watches == {}

    run(main)


def test_a_declined_message_goes_to_the_task_in_order():
    """put 1, get 2, put 3 in one read: the step answers 1, hands 2 to the task, and 3 is
    stepped only after the task has taken 2 (it was buffered, not in the socket)."""
    async def main():
        hub = ReadHub()
        conn, raw = conn_pair()
        order: list[str] = []

        def step(msg):
            if msg["type"] == "get":
                return False
            order.append(f"step {msg['id']}")
            return True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            await wait_until(lambda: hub.running)

            async def serve():
                while True:
                    msg = await hub.take(conn, step)
                    if msg is None:
                        order.append("end")
                        return
                    order.append(f"task {msg['id']}")

            nursery.start_soon(serve)
            await wait_until(lambda: hub._watches)
            raw.sendall(put(1) + get(2) + put(3))
            await wait_until(lambda: len(order) == 3)
            raw.sendall(get(4))
            await wait_until(lambda: len(order) == 4)
            raw.shutdown(socket.SHUT_WR)
            await wait_until(lambda: len(order) == 5)
            nursery.cancel_scope.cancel()
        assert order == ["step 1", "task 2", "step 3", "task 4", "end"]

    run(main)


def test_a_bad_frame_and_a_raising_step_reach_the_task():
    async def main():
        hub = ReadHub()
        bad, raw_bad = conn_pair()
        boom, raw_boom = conn_pair()
        errors: dict[str, BaseException] = {}

        def step(msg):
            if msg["key"] == "boom1":
                raise ValueError("the step failed")
            return True

        async def serve(name, conn):
            try:
                await hub.take(conn, step)
            except Exception as e:
                errors[name] = e

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            await wait_until(lambda: hub.running)
            nursery.start_soon(serve, "bad", bad)
            nursery.start_soon(serve, "boom", boom)
            await wait_until(lambda: len(hub._watches) == 2)
            raw_bad.sendall(b"\x00\x00\x00\x05hello")  # not msgpack
            raw_boom.sendall(put(1, key="boom"))
            await wait_until(lambda: len(errors) == 2)
            nursery.cancel_scope.cancel()
        assert isinstance(errors["bad"], ProtocolError)
        assert isinstance(errors["boom"], ValueError)
        assert hub._watches == {}

    run(main)


def test_a_cancelled_wait_stops_the_watch_and_the_socket_is_read_again_later():
    async def main():
        hub = ReadHub()
        conn, raw = conn_pair()
        got = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            await wait_until(lambda: hub.running)
            with trio.move_on_after(0.05):
                await hub.take(conn, lambda m: got.append(m) or True)
            assert hub._watches == {}
            raw.sendall(get(7))  # nobody watches: it waits in the socket
            await trio.sleep(0.05)
            assert got == []
            msg = await hub.take(conn, lambda m: False)
            assert msg["id"] == 7
            nursery.cancel_scope.cancel()

    run(main)


def test_without_the_hub_task_the_connection_reads_itself():
    async def main():
        hub = ReadHub()  # never run
        conn, raw = conn_pair()
        raw.sendall(put(1) + get(2))
        stepped = []
        msg = await hub.take(conn, lambda m: m["type"] == "put" and not stepped.append(m["id"]))
        assert stepped == [1] and msg["id"] == 2

    run(main)


def test_tls_connections_are_read_whole_by_the_hub(contexts):
    """Over TLS the hub decrypts everything the socket delivered: three frames written in
    three TLS records arrive at the step without a task read."""
    async def main():
        ours, theirs = await tls_server_pair(*contexts)
        conn = Connection(ours, 1 << 20, "tls")
        hub = ReadHub()
        seen = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            await wait_until(lambda: hub.running)

            async def serve():
                msg = await hub.take(conn, lambda m: not seen.append(m["id"]))
                seen.append(("end", msg))

            nursery.start_soon(serve)
            await wait_until(lambda: hub._watches)
            for i in range(3):
                await theirs.send_all(put(i))
            await wait_until(lambda: len(seen) == 3)
            await theirs.aclose()
            await wait_until(lambda: len(seen) == 4)
            nursery.cancel_scope.cancel()
        assert seen == [0, 1, 2, ("end", None)]
        assert hub.messages == 3

    run(main)


def test_tls_records_left_inside_tls_by_the_task_read_are_not_stranded(contexts):
    """The hello's read (``receive_some``) decrypts one record; records that arrived with
    it wait inside TLS, invisible to a poll of the socket. take() must step them without
    any more bytes arriving."""
    async def main():
        ours, theirs = await tls_server_pair(*contexts)
        for i in range(3):  # three records, all in the socket before we read
            await theirs.send_all(put(i))
        sock = ours.transport_stream.socket
        while len(await sock.recv(1 << 16, socket.MSG_PEEK)) < 3 * len(put(0)):
            await trio.sleep(0.01)
        conn = Connection(ours, 1 << 20, "tls")
        first = await conn.receive()
        assert first["id"] == 0
        assert conn.input_pending()
        hub = ReadHub()
        seen = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            await wait_until(lambda: hub.running)
            nursery.start_soon(hub.take, conn, lambda m: not seen.append(m["id"]))
            await wait_until(lambda: len(seen) == 2)
            nursery.cancel_scope.cancel()
        assert seen == [1, 2]
        assert not conn.input_pending()

    run(main)


@pytest.mark.parametrize("n", [1, 5])
def test_many_frames_larger_than_one_read(n):
    """Frames spanning reads: a 200 KiB put arrives in several reads of 64 KiB."""
    async def main():
        hub = ReadHub()
        conn, raw = conn_pair()
        seen = []
        big = [encode({"type": "put", "id": i, "key": f"k{i}", "value": b"x" * 200_000,
                       "client_id": "c", "seq": i}) for i in range(n)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            await wait_until(lambda: hub.running)
            nursery.start_soon(hub.take, conn, lambda m: not seen.append(m["id"]))
            await wait_until(lambda: hub._watches)
            data = b"".join(big)

            async def writer():
                await trio.to_thread.run_sync(raw.sendall, data)

            nursery.start_soon(writer)
            await wait_until(lambda: len(seen) == n)
            nursery.cancel_scope.cancel()
        assert seen == list(range(n))

    run(main)
