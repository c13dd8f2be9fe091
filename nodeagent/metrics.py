"""Prometheus metrics without a dependency: a registry, three metric types, a scrape server.

The text exposition format 0.0.4 (what every Prometheus scrapes)::

    # HELP raft_fsync_seconds Latency of one WAL fsync.
    # TYPE raft_fsync_seconds histogram
    raft_fsync_seconds_bucket{le="0.001"} 3
    raft_fsync_seconds_bucket{le="+Inf"} 4
    raft_fsync_seconds_sum 0.0042
    raft_fsync_seconds_count 4

Usage, in the manner of prometheus_client but with no global default registry (several
agents can live in one process, in tests)::

    reg = Registry()
    requests = reg.counter("raft_client_requests_total", "Client requests.", ["kind"])
    requests.labels(kind="put").inc()
    fsync = reg.histogram("raft_fsync_seconds", "Latency of one WAL fsync.", buckets=FSYNC_BUCKETS)
    fsync.observe(0.0012)
    term = reg.gauge("raft_term", "Current term.")
    term.set_function(lambda: node.term)  # read at scrape time

Metric objects are safe to update from worker threads (one small lock each). A metric with
label names is a parent: update its ``labels(...)`` children, not the parent itself.

``serve_metrics(registry, host, port)`` is a trio HTTP/1.1 server for ``GET /metrics`` and
``GET /healthz``: one request per connection, each connection under ``fail_after``, the
request head capped at 8 KiB, the number of connections capped.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import trio

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "FSYNC_BUCKETS",
    "REQUEST_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "format_value",
    "serve_metrics",
]

log = logging.getLogger("nodeagent.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

INF = float("inf")
#: prometheus_client's defaults: web request latencies, in seconds.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
#: fsync of a WAL batch: 100 µs (NVMe, page cache) to 1 s (a sick disk).
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: a client request through Raft (propose -> commit -> apply -> reply): 1 ms to 10 s.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it (Go's float formatting: ``+Inf``, ``NaN``, ``1.0``)."""
    v = float(value)
    if v == INF:
        return "+Inf"
    if v == -INF:
        return "-Inf"
    if math.isnan(v):
        return "NaN"
    s = repr(v)
    dot = s.find(".")
    if v > 0 and dot > 6:  # Go switches to an exponent sooner than Python (1e+07, not 10000000.0)
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0").rstrip(".")
        return f"{mantissa}e+0{dot - 1}"
    return s


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape_label_value(v)}"' for n, v in zip(names, values))
    return "{" + inner + "}"


# --------------------------------------------------------------------------- children
# A child holds one labelled series' value. An unlabelled metric has exactly one child, keyed
# by the empty tuple, and forwards its update methods to it.


class _CounterChild:
    __slots__ = ("_lock", "_value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up (inc by {amount})")
        with self._lock:
            self._value += amount

    @property
    def value(self) -> float:
        return self._value

    def _samples(self, name: str, labels: str) -> Iterator[str]:
        yield f"{name}{labels} {format_value(self._value)}"


class _GaugeChild:
    __slots__ = ("_lock", "_value", "_function")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0
        self._function: Callable[[], float] | None = None

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def set_function(self, function: Callable[[], float] | None) -> None:
        """Read the value by calling ``function()`` at scrape time (``None``: back to ``set``).

        It runs in the scraping task, on the event loop: keep it cheap and non-blocking. If it
        raises, the sample reads NaN and the error is logged; the scrape still succeeds.
        """
        self._function = function

    @property
    def value(self) -> float:
        function = self._function
        return float(function()) if function is not None else self._value

    def _samples(self, name: str, labels: str) -> Iterator[str]:
        try:
            value = self.value
        except Exception:
            log.warning("metrics: the function of gauge %s%s failed", name, labels, exc_info=True)
            value = math.nan
        yield f"{name}{labels} {format_value(value)}"


class _HistogramChild:
    __slots__ = ("_lock", "_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._lock = threading.Lock()
        self._bounds = bounds  # sorted, ends with +Inf
        self._counts = [0] * len(bounds)  # per bucket, not cumulative
        self._sum = 0.0

    def observe(self, value: float) -> None:
        v = float(value)
        # A bucket counts observations <= its bound; NaN belongs only to +Inf.
        i = len(self._bounds) - 1 if math.isnan(v) else bisect.bisect_left(self._bounds, v)
        with self._lock:
            self._counts[i] += 1
            self._sum += v

    @contextmanager
    def time(self) -> Iterator[None]:
        """Observe the wall-clock duration of the ``with`` block, in seconds."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - start)

    @property
    def count(self) -> int:
        return sum(self._counts)

    @property
    def sum(self) -> float:
        return self._sum

    def buckets(self) -> list[tuple[float, int]]:
        """``[(upper bound, cumulative count), ...]``, ending with ``(inf, count)``."""
        with self._lock:
            counts = list(self._counts)
        out, total = [], 0
        for bound, n in zip(self._bounds, counts):
            total += n
            out.append((bound, total))
        return out

    def _samples(self, name: str, labels: str) -> Iterator[str]:
        with self._lock:
            counts, total_sum = list(self._counts), self._sum
        prefix = labels[1:-1] + "," if labels else ""
        cumulative = 0
        for bound, n in zip(self._bounds, counts):
            cumulative += n
            yield f'{name}_bucket{{{prefix}le="{format_value(bound)}"}} {cumulative}'
        yield f"{name}_sum{labels} {format_value(total_sum)}"
        yield f"{name}_count{labels} {cumulative}"


# --------------------------------------------------------------------------- metrics


class _Metric:
    _type = ""
    _reserved_labels: frozenset[str] = frozenset()

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        registry: Registry | None = None,
    ) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        names = tuple(labelnames)
        for label in names:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"{name}: invalid label name {label!r}")
            if label in self._reserved_labels:
                raise ValueError(f"{name}: label name {label!r} is reserved for {self._type}s")
        if len(set(names)) != len(names):
            raise ValueError(f"{name}: duplicate label names {names}")
        self.name = name
        self.documentation = documentation
        self.labelnames = names
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], object] = {}
        if not names:
            self._children[()] = self._new_child()
        if registry is not None:
            registry.register(self)

    def _new_child(self):  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def sample_names(self) -> tuple[str, ...]:
        return (self.name,)

    def labels(self, *values: object, **kv: object):
        """The child for one combination of label values (made on first use), like prometheus_client.

        Values are given all by name or all by position; each is converted with ``str()``.
        """
        if not self.labelnames:
            raise ValueError(f"{self.name} has no labels")
        if values and kv:
            raise ValueError(f"{self.name}: give label values by name or by position, not both")
        if kv:
            if set(kv) != set(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {tuple(kv)}")
            key = tuple(str(kv[n]) for n in self.labelnames)
        else:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, got {len(values)}")
            key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, self._new_child())
        return child

    def remove(self, *values: object, **kv: object) -> None:
        """Forget one labelled series (a peer that left the cluster); absent is not an error."""
        key = tuple(str(kv[n]) for n in self.labelnames) if kv else tuple(str(v) for v in values)
        with self._lock:
            self._children.pop(key, None)

    def clear(self) -> None:
        """Forget every labelled series."""
        if self.labelnames:
            with self._lock:
                self._children.clear()

    def _only_child(self):
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...) first")
        return self._children[()]

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.documentation)}", f"# TYPE {self.name} {self._type}"]
        with self._lock:
            children = list(self._children.items())
        for values, child in children:
            lines.extend(child._samples(self.name, _label_text(self.labelnames, values)))  # type: ignore[attr-defined]
        return "\n".join(lines) + "\n"


class Counter(_Metric):
    """A value that only goes up. Name it ``*_total`` (rendered as given, no suffix added)."""

    _type = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self._only_child().inc(amount)

    @property
    def value(self) -> float:
        return self._only_child().value


class Gauge(_Metric):
    """A value that goes up and down, set directly or read by a function at scrape time."""

    _type = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def inc(self, amount: float = 1.0) -> None:
        self._only_child().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._only_child().dec(amount)

    def set(self, value: float) -> None:
        self._only_child().set(value)

    def set_function(self, function: Callable[[], float] | None) -> None:
        self._only_child().set_function(function)

    @property
    def value(self) -> float:
        return self._only_child().value


class Histogram(_Metric):
    """Observations counted in fixed buckets (``le`` = less than or equal), with sum and count."""

    _type = "histogram"
    _reserved_labels = frozenset({"le"})

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        registry: Registry | None = None,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or any(math.isnan(b) for b in bounds):
            raise ValueError(f"{name}: buckets must be non-empty numbers")
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"{name}: buckets must be strictly increasing, got {list(buckets)}")
        if bounds[-1] != INF:
            bounds.append(INF)
        self._bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self._bounds)

    def sample_names(self) -> tuple[str, ...]:
        return (self.name, f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")

    def observe(self, value: float) -> None:
        self._only_child().observe(value)

    def time(self):
        return self._only_child().time()

    @property
    def count(self) -> int:
        return self._only_child().count

    @property
    def sum(self) -> float:
        return self._only_child().sum

    def buckets(self) -> list[tuple[float, int]]:
        return self._only_child().buckets()


class Registry:
    """The metrics one agent exposes, rendered in registration order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}
        self._sample_names: set[str] = set()

    def register(self, metric: _Metric) -> None:
        names = metric.sample_names()
        with self._lock:
            clash = self._sample_names.intersection(names)
            if clash:
                raise ValueError(f"metric {metric.name}: name already registered: {sorted(clash)}")
            self._metrics[metric.name] = metric
            self._sample_names.update(names)

    def unregister(self, metric: _Metric) -> None:
        with self._lock:
            if self._metrics.get(metric.name) is metric:
                del self._metrics[metric.name]
                self._sample_names.difference_update(metric.sample_names())

    def get(self, name: str) -> _Metric | None:
        return self._metrics.get(name)

    def counter(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Counter:
        return Counter(name, documentation, labelnames, registry=self)

    def gauge(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Gauge:
        return Gauge(name, documentation, labelnames, registry=self)

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        return Histogram(name, documentation, labelnames, buckets=buckets, registry=self)

    def render(self) -> str:
        """Every metric in the text exposition format 0.0.4; ``""`` when empty."""
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(m.render() for m in metrics)


# --------------------------------------------------------------------------- HTTP

MAX_HEAD = 8 * 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}
_PATHS = ("/metrics", "/healthz")


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _head_end(buf: bytearray | bytes) -> int:
    """The length of the request head in ``buf`` (blank line included), or -1 if incomplete."""
    ends = [i + n for sep, n in ((b"\r\n\r\n", 4), (b"\n\n", 2)) if (i := buf.find(sep)) >= 0]
    return min(ends) if ends else -1


def _parse_head(head: bytes) -> tuple[str, str]:
    """``(method, path)`` of a request head; raises ``_BadRequest(400)`` on anything malformed."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400, "request head is not ASCII") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise _BadRequest(400, "empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method) or version not in ("HTTP/1.1", "HTTP/1.0") or not target.startswith("/"):
        raise _BadRequest(400, "malformed request line")
    for line in lines[1:]:
        name, colon, _ = line.partition(":")
        if not colon or not _TOKEN.match(name):  # also rejects obsolete line folding
            raise _BadRequest(400, "malformed header line")
    return method, target.partition("?")[0]


def _response(status: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
              head_only: bool = False, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


async def _read_head(stream: trio.abc.Stream, max_head: int) -> bytes | None:
    """The request head, or None if the peer closed before sending anything."""
    buf = bytearray()
    while True:
        end = _head_end(buf)
        if end >= 0:
            if end > max_head:
                raise _BadRequest(431, "request head too large")
            return bytes(buf[:end])
        if len(buf) > max_head:
            raise _BadRequest(431, "request head too large")
        data = await stream.receive_some(4096)
        if not data:
            if buf:
                raise _BadRequest(400, "connection closed mid-request")
            return None
        buf += data


def _answer(registry: Registry, method: str, path: str) -> bytes:
    if path not in _PATHS:
        return _response(404, b"not found\n", head_only=method == "HEAD")
    if method not in ("GET", "HEAD"):
        return _response(405, b"method not allowed\n", extra="Allow: GET, HEAD\r\n")
    if path == "/healthz":
        return _response(200, b"ok\n", head_only=method == "HEAD")
    try:
        body = registry.render().encode("utf-8")
    except Exception:
        log.exception("metrics: rendering the registry failed")
        return _response(500, b"rendering metrics failed\n", head_only=method == "HEAD")
    return _response(200, body, content_type=CONTENT_TYPE, head_only=method == "HEAD")


async def _handle(stream: trio.abc.Stream, registry: Registry, max_head: int, linger: float) -> None:
    try:
        head = await _read_head(stream, max_head)
        if head is None:
            return
        method, path = _parse_head(head)
        reply = _answer(registry, method, path)
    except _BadRequest as exc:
        log.debug("metrics: bad request: %s", exc)
        reply = _response(exc.status, f"{exc}\n".encode())
    await stream.send_all(reply)
    # A lingering close: shut our side, then read and drop what the client still sends, so
    # that closing with unread data (an RST) does not destroy the response before it is read.
    if isinstance(stream, trio.SocketStream):
        await stream.send_eof()
        with trio.move_on_after(linger):
            drained = 0
            while drained < 64 * 1024 and (data := await stream.receive_some(16 * 1024)):
                drained += len(data)


async def serve_metrics(
    registry: Registry,
    host: str | None,
    port: int,
    *,
    timeout: float = 5.0,
    max_head: int = MAX_HEAD,
    max_connections: int = 64,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` and ``GET /healthz`` over HTTP/1.1 until cancelled.

    One request per connection, answered and closed. Each connection lives at most ``timeout``
    seconds (a client that never finishes its request is cut off); a request head longer than
    ``max_head`` bytes gets 431; connections past ``max_connections`` are closed at once.
    ``task_status.started(port)`` reports the bound port (useful with ``port=0``; with several
    listeners, e.g. ``host=None`` on a dual-stack machine, the first one's).
    """
    limiter = trio.CapacityLimiter(max_connections)
    linger = min(1.0, timeout / 2)

    async def handler(stream: trio.abc.Stream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            log.warning("metrics: %d connections already open; closing a new one", max_connections)
            return  # serve_tcp closes the stream
        try:
            with trio.fail_after(timeout):
                await _handle(stream, registry, max_head, linger)
        except trio.TooSlowError:
            log.debug("metrics: connection timed out after %.1fs", timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("metrics: connection lost: %r", exc)
        except Exception:
            log.exception("metrics: unexpected error in the connection handler")
        finally:
            limiter.release()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, port, host=host or None))
        bound = listeners[0].socket.getsockname()[1]
        log.info("metrics: serving on %s:%d", host or "*", bound)
        task_status.started(bound)


class CallbackCounter(_Metric):
    """A counter whose value is read from a function at scrape time, for totals that
    another component already keeps as a plain int (messages sent, say): the hot path
    then pays nothing for metrics."""

    _type = "counter"

    def __init__(self, name: str, documentation: str, function: Callable[[], float], *,
                 registry: Registry | None = None) -> None:
        self._function = function
        super().__init__(name, documentation, registry=registry)

    def _new_child(self) -> "_CallbackChild":
        return _CallbackChild(lambda: self._function())

    @property
    def value(self) -> float:
        return float(self._function())


class _CallbackChild:
    __slots__ = ("_function",)

    def __init__(self, function: Callable[[], float]) -> None:
        self._function = function

    def _samples(self, name: str, labels: str) -> Iterator[str]:
        try:
            v = float(self._function())
        except Exception:
            logging.getLogger(__name__).warning("counter callback failed", extra={"metric": name})
            v = float("nan")
        yield f"{name}{labels} {format_value(v)}"
