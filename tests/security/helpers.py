"""Shared by the security tests: raw (TLS) connections, frames, the agents' JSON logs."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path

from nodeagent.protocol import CLOSED, NEED_DATA, PROTOCOL_VERSION, FrameDecoder, ProtocolError, encode
from nodeagent.security import client_context, init_tls, tls_paths_for_node, tls_paths_for_role


def hello(cluster: str, role: str = "client", node: str | None = None) -> bytes:
    msg = {"type": "hello", "role": role, "cluster": cluster, "version": PROTOCOL_VERSION,
           "client_id": "security-test"}
    if node is not None:
        msg["node"] = node
    return encode(msg)


def ctx_for(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca``, presenting ``cert`` (or none)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def other_cluster(tmp: Path, cluster: str = "test") -> Path:
    """Another cluster's CA and certificates (same names and hosts as ours)."""
    d = tmp / "other-cluster-tls"
    init_tls(d, cluster, [(f"n{i}", "127.0.0.1") for i in (1, 2, 3)])
    return d


async def read_frames(reader: asyncio.StreamReader, decoder: FrameDecoder, timeout: float):
    """Frames until EOF (or a reset): returns (messages, how it ended)."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        msg = decoder.next_message()
        if msg is NEED_DATA:
            left = deadline - time.monotonic()
            if left <= 0:
                return out, "open"
            try:
                data = await asyncio.wait_for(reader.read(65536), left)
            except asyncio.TimeoutError:
                return out, "open"
            except (ConnectionError, ssl.SSLError, OSError) as e:
                return out, f"reset: {type(e).__name__}"
            decoder.receive_data(data)
            continue
        if msg is CLOSED:
            return out, "closed"
        out.append(msg)


async def attempt(port: int, payload: bytes, ssl_ctx: ssl.SSLContext | None,
                  timeout: float = 15.0) -> tuple[list[dict], str, int]:
    """Connect, send ``payload``, read until the agent closes: (frames, end, local port).
    A TLS handshake the agent refuses shows as an SSL error (the end is 'tls: ...')."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl_ctx, server_hostname="127.0.0.1" if ssl_ctx else None), timeout)
    except (ssl.SSLError, ConnectionError, OSError) as e:
        # the handshake failed on our side (the agent sent an alert); we cannot see our port
        return [], f"tls: {type(e).__name__}: {e}", -1
    sockname = writer.get_extra_info("sockname")  # None if the agent closed it already
    local_port = sockname[1] if sockname else -1
    try:
        writer.write(payload)
        await writer.drain()
        frames, end = await read_frames(reader, FrameDecoder(), timeout)
    except (ConnectionError, ssl.SSLError, OSError) as e:
        frames, end = [], f"reset: {type(e).__name__}"
    except ProtocolError as e:
        frames, end = [], f"protocol: {e}"
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2)
        except Exception:
            pass
    return frames, end, local_port


def log_records(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


async def wait_for_log(path: Path, pred, timeout: float = 20.0, what: str = "a log line") -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for rec in log_records(path):
            if pred(rec):
                return rec
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not in {path} within {timeout:g}s")
        await asyncio.sleep(0.1)


__all__ = ["hello", "ctx_for", "other_cluster", "attempt", "read_frames", "log_records",
           "wait_for_log", "client_context", "tls_paths_for_node", "tls_paths_for_role"]
