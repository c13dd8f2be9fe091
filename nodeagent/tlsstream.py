"""TLS over a trio socket stream with a write that does not wait: ``TLSStream``.

``trio.SSLStream`` makes every send an await (its own lock and retry loop, then the
socket's), so a frame over TLS could only leave through a writer task: a scheduling hop
on each side of every message, where a plain TCP link writes from the caller's task
(docs/ARCHITECTURE.md, "Writes without a hop"). This stream drives an ``ssl.SSLObject``
over two memory BIOs itself. ``write_now`` encrypts into the outgoing BIO and writes what
the socket takes at once; ciphertext the kernel does not take waits, in order, for the
next ``send_all``. Reads decrypt what the socket delivers.

One rule keeps the byte stream in order: only ``send_all`` (one at a time) and
``write_now`` write to the socket, and ``write_now`` writes nothing while a ``send_all``
is under way; ciphertext made meanwhile (by ``write_now`` or by a read answering a TLS
post-handshake message) joins the queue that ``send_all`` empties before it returns.

Errors are those of ``trio.SSLStream``: a TLS failure or a broken socket raises
``trio.BrokenResourceError`` with the ``ssl.SSLError`` or ``OSError`` as its cause.
"""

from __future__ import annotations

import os
import socket
import ssl
import weakref

import trio

__all__ = ["TLSStream", "open_streams", "read_nowait", "receive_waiting_first"]

# Every stream whose handshake completed and that is not closed yet, so that a reload
# that stops trusting a CA can find the connections made with it (Agent.reload_tls).
_OPEN: "weakref.WeakSet[TLSStream]" = weakref.WeakSet()


def open_streams(contexts) -> list["TLSStream"]:
    """The open streams made with one of ``contexts`` (SSLContext objects)."""
    ids = {id(c) for c in contexts}
    return [s for s in list(_OPEN) if id(s.context) in ids and not s._closed]

_READ = 65536


async def receive_waiting_first(stream: trio.SocketStream, max_bytes: int) -> bytes:
    """``stream.receive_some`` for a connection whose peer has usually said all it had
    to (a client waiting for its answer): wait for the socket to be readable, then read.
    trio's receive tries the read first, and that read, failing with EAGAIN, costs a
    syscall and a raised exception per request on the leader (issue 9). The number is
    looked up on every call, never kept: a closed socket's is -1, and a close during
    the wait wakes it with ClosedResourceError (trio's notify_closing)."""
    sock = stream.socket
    while True:
        fd = sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the connection was closed")
        await trio.lowlevel.wait_readable(fd)  # a close meanwhile raises here
        data = _read_fd(fd, max_bytes)
        if data is not None:
            return data
        # woken without data after all: wait again


def read_nowait(stream: trio.SocketStream, max_bytes: int) -> bytes | None:
    """One read of the socket without waiting: its bytes (``b""`` at its end), or None
    when it has none now. The number is looked up now (-1 once closed, which fails);
    a broken socket raises ``trio.BrokenResourceError``."""
    return _read_fd(stream.socket.fileno(), max_bytes)


def _read_fd(fd: int, max_bytes: int) -> bytes | None:
    try:
        return os.read(fd, max_bytes)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise trio.BrokenResourceError(f"the connection broke: {exc}") from exc


class TLSStream(trio.abc.Stream):
    def __init__(self, transport_stream: trio.SocketStream, context: ssl.SSLContext, *,
                 server_side: bool = False, server_hostname: str | None = None):
        self.transport_stream = transport_stream
        self.context = context
        self.was_cut = False  # ended by ``cut``: this side chose to, the peer did not vanish
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=server_hostname)
        self._pending = bytearray()  # ciphertext not yet taken by the socket, in order
        self._sending = False
        self._receiving = False
        self._closed = False
        self._eof = False  # a close_notify was read by receive_nowait

    # -- the handshake and what it established -----------------------------------------

    async def do_handshake(self) -> None:
        """Complete the TLS handshake (the caller's deadline covers it)."""
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._send_pending()
                await self._feed()
            except ssl.SSLError as exc:
                self._take_out()
                try:
                    self._flush_nowait()  # the alert, if the socket takes it: the peer learns why
                except OSError:
                    pass
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
        await self._send_pending()
        _OPEN.add(self)

    def getpeercert(self, binary_form: bool = False):
        return self._obj.getpeercert(binary_form)

    def cut(self) -> None:
        """End the connection under whichever task uses it: shut the socket down both
        ways, so its reader sees the end of the stream and its writer a broken pipe; they
        close it as after any broken connection."""
        _OPEN.discard(self)
        self.was_cut = True
        try:
            self.transport_stream.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- writing ------------------------------------------------------------------------

    def write_now(self, data: bytes) -> bool:
        """Encrypt ``data`` and write what the socket takes without waiting. True when
        nothing is left; else the rest waits for the next ``send_all`` (``b""`` will do),
        which the caller must arrange. Raises ``OSError`` for a broken or closed socket
        and ``ssl.SSLError`` if TLS has failed."""
        self._encrypt(data)
        return self._flush_nowait()

    async def send_all(self, data) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            if data:
                try:
                    self._encrypt(data)
                except ssl.SSLError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
            while self._pending:
                # Take the queue whole (no copy); what joins meanwhile goes out next.
                chunk, self._pending = self._pending, bytearray()
                await self.transport_stream.send_all(chunk)
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    def _encrypt(self, data) -> None:
        view = memoryview(data)
        while view:
            n = self._obj.write(view)  # a memory BIO takes it all; loop all the same
            view = view[n:]
        self._take_out()

    def _take_out(self) -> None:
        if self._out.pending:
            self._pending += self._out.read()

    def _flush_nowait(self) -> bool:
        if self._sending:
            return False  # send_all is writing: it sends what joined the queue before returning
        if self._pending:
            # The descriptor is looked up on every write, never kept: once the socket is
            # closed, fileno() is -1 and the write fails (EBADF). A number kept from before
            # would by then name whatever the process opened next (a pipe of a task being
            # spawned, a log segment) and the ciphertext would go there.
            try:
                n = os.write(self.transport_stream.socket.fileno(), self._pending)
            except BlockingIOError:
                n = 0
            del self._pending[:n]
        return not self._pending

    async def _send_pending(self) -> None:
        self._take_out()
        if self._pending:
            await self.send_all(b"")

    # -- reading ------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Decrypted bytes, or ``b""`` at the end of the stream (a close_notify, or the
        socket closed without one: the framing above sees a frame cut short)."""
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            n = max_bytes or _READ
            obj, incoming = self._obj, self._in
            while True:
                if not incoming.pending and not obj.pending():
                    # Nothing to decrypt yet: wait for the socket (not for an exception).
                    if not await self._feed(eof_ok=True):
                        return b""
                try:
                    data = obj.read(n)
                except ssl.SSLWantReadError:
                    if not await self._feed(eof_ok=True):
                        return b""
                    continue
                except ssl.SSLZeroReturnError:
                    return b""
                except ssl.SSLError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                self._answer_post_handshake()
                return data
        finally:
            self._receiving = False

    def receive_nowait(self) -> bytes | None:
        """What ``receive_some`` would return without waiting: all the plaintext that
        the records already received decrypt to, or if there is none, that a read of
        the socket now gives; ``b""`` at the end of the stream, or None when there is
        nothing yet. All of it, so none stays in TLS buffers where a poll of the socket
        cannot see it. For ``ReadHub``, which calls it when the socket is readable or
        ``input_pending``."""
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        chunks = self._decrypt_all()
        if not chunks and not self._eof:
            raw = read_nowait(self.transport_stream, _READ)
            if raw is None:
                return None
            if not raw:
                return b""  # closed without close_notify: the framing sees a frame cut short
            self._in.write(raw)
            chunks = self._decrypt_all()
        if chunks:
            return b"".join(chunks)
        return b"" if self._eof else None

    def input_pending(self) -> bool:
        """Whether received bytes wait inside TLS (records read from the socket but not
        yet decrypted, or plaintext not yet returned): a poll of the socket does not
        see them. ``receive_some`` leaves them when records arrive together."""
        return bool(self._in.pending or self._obj.pending())

    def _decrypt_all(self) -> list[bytes]:
        chunks: list[bytes] = []
        if self._eof:
            return chunks
        obj = self._obj
        try:
            while True:
                data = obj.read(_READ)
                if not data:
                    self._eof = True
                    break
                chunks.append(data)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._eof = True
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        self._answer_post_handshake()
        return chunks

    def _answer_post_handshake(self) -> None:
        """Send what reading made TLS say back (a key update's answer), if anything."""
        if self._out.pending:
            self._take_out()
            self._flush_nowait()

    async def _feed(self, eof_ok: bool = False) -> bool:
        if type(self.transport_stream) is trio.SocketStream:
            data = await receive_waiting_first(self.transport_stream, _READ)
        else:
            data = await self.transport_stream.receive_some(_READ)
        if not data:
            if eof_ok:
                return False
            raise trio.BrokenResourceError("the peer closed the connection during the TLS handshake")
        self._in.write(data)
        return True

    # -- closing ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send close_notify if the socket takes it now, then close the socket. A second
        call only closes (again, harmlessly)."""
        try:
            if not self._sending and not self._closed:
                try:
                    self._obj.unwrap()
                except (ssl.SSLError, ValueError):
                    pass
                self._take_out()
                self._flush_nowait()
        except OSError:
            pass
        finally:
            self._closed = True
            _OPEN.discard(self)
            await self.transport_stream.aclose()
