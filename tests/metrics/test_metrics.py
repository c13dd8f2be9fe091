"""nodeagent.metrics: exact exposition text, and the scrape server over real sockets."""

from __future__ import annotations

import math
import threading

import pytest
import trio

from nodeagent.metrics import (
    CONTENT_TYPE,
    FSYNC_BUCKETS,
    Counter,
    Gauge,
    Histogram,
    Registry,
    format_value,
    serve_metrics,
)

# --------------------------------------------------------------------------- rendering


def test_counter_render_exact():
    reg = Registry()
    c = reg.counter("raft_proposals_total", "Proposals made by this node.")
    c.inc()
    c.inc(2.5)
    assert reg.render() == (
        "# HELP raft_proposals_total Proposals made by this node.\n"
        "# TYPE raft_proposals_total counter\n"
        "raft_proposals_total 3.5\n"
    )
    assert c.value == 3.5
    with pytest.raises(ValueError):
        c.inc(-1)


def test_labelled_counter_render_exact_in_creation_order():
    reg = Registry()
    c = reg.counter("rpc_total", "RPCs.", ["peer", "kind"])
    c.labels(peer="n2", kind="append").inc()
    c.labels("n3", "vote").inc(2)
    c.labels(kind="append", peer="n2").inc()  # same child, names in any order
    assert reg.render() == (
        "# HELP rpc_total RPCs.\n"
        "# TYPE rpc_total counter\n"
        'rpc_total{peer="n2",kind="append"} 2.0\n'
        'rpc_total{peer="n3",kind="vote"} 2.0\n'
    )
    c.remove(peer="n2", kind="append")
    assert 'peer="n2"' not in reg.render()
    with pytest.raises(ValueError):
        c.inc()  # a labelled parent has no value of its own
    with pytest.raises(ValueError):
        c.labels(peer="n2")  # missing label
    with pytest.raises(ValueError):
        c.labels("n2", kind="x")  # mixed


def test_labelled_metric_without_children_renders_header_only():
    reg = Registry()
    reg.gauge("peer_lag", "Lag.", ["peer"])
    assert reg.render() == "# HELP peer_lag Lag.\n# TYPE peer_lag gauge\n"


def test_gauge_render_exact_and_set_function():
    reg = Registry()
    g = reg.gauge("raft_term", "Current term.")
    g.set(7)
    g.inc(3)
    g.dec()
    assert reg.render() == "# HELP raft_term Current term.\n# TYPE raft_term gauge\nraft_term 9.0\n"
    state = {"term": 12}
    g.set_function(lambda: state["term"])
    state["term"] = 13  # read at scrape time, not at set_function time
    assert reg.render().endswith("\nraft_term 13.0\n")
    g.set_function(None)
    assert reg.render().endswith("\nraft_term 9.0\n")

    lab = reg.gauge("load", "Load.", ["node"])
    lab.labels(node="a").set_function(lambda: 0.25)
    lab.labels(node="b").set(-1e-3)
    assert reg.render().endswith(
        '# HELP load Load.\n# TYPE load gauge\nload{node="a"} 0.25\nload{node="b"} -0.001\n'
    )


def test_gauge_function_that_raises_reads_nan_and_scrape_survives(caplog):
    reg = Registry()
    g = reg.gauge("broken", "Broken.")
    g.set_function(lambda: 1 / 0)
    reg.counter("ok_total", "Fine.").inc()
    text = reg.render()
    assert "broken NaN\n" in text
    assert "ok_total 1.0\n" in text
    assert any("broken" in r.getMessage() for r in caplog.records)


def test_histogram_render_exact():
    reg = Registry()
    h = reg.histogram("fsync_seconds", "WAL fsync latency.", buckets=(0.001, 0.01, 0.1))
    for v in (0.0005, 0.001, 0.005, 0.05, 3.0):
        h.observe(v)
    assert reg.render() == (
        "# HELP fsync_seconds WAL fsync latency.\n"
        "# TYPE fsync_seconds histogram\n"
        'fsync_seconds_bucket{le="0.001"} 2\n'
        'fsync_seconds_bucket{le="0.01"} 3\n'
        'fsync_seconds_bucket{le="0.1"} 4\n'
        'fsync_seconds_bucket{le="+Inf"} 5\n'
        "fsync_seconds_sum 3.0565\n"
        "fsync_seconds_count 5\n"
    )


def test_labelled_histogram_render_exact():
    reg = Registry()
    h = reg.histogram("req_seconds", "Request latency.", ["kind"], buckets=(0.5, 1))
    h.labels(kind="put").observe(0.25)
    h.labels(kind="get").observe(2)
    assert reg.render() == (
        "# HELP req_seconds Request latency.\n"
        "# TYPE req_seconds histogram\n"
        'req_seconds_bucket{kind="put",le="0.5"} 1\n'
        'req_seconds_bucket{kind="put",le="1.0"} 1\n'
        'req_seconds_bucket{kind="put",le="+Inf"} 1\n'
        'req_seconds_sum{kind="put"} 0.25\n'
        'req_seconds_count{kind="put"} 1\n'
        'req_seconds_bucket{kind="get",le="0.5"} 0\n'
        'req_seconds_bucket{kind="get",le="1.0"} 0\n'
        'req_seconds_bucket{kind="get",le="+Inf"} 1\n'
        'req_seconds_sum{kind="get"} 2.0\n'
        'req_seconds_count{kind="get"} 1\n'
    )


def test_histogram_buckets_are_cumulative_and_le_is_inclusive():
    h = Histogram("x", "x", buckets=FSYNC_BUCKETS)
    values = [0.0001, 0.0001, 0.0003, 0.001, 0.002, 0.7, 1.0, 1.5, 99.0, 0.0]
    for v in values:
        h.observe(v)
    buckets = h.buckets()
    assert buckets[-1] == (math.inf, len(values))
    for bound, cumulative in buckets:
        assert cumulative == sum(1 for v in values if v <= bound), bound
    counts = [n for _, n in buckets]
    assert counts == sorted(counts)
    assert h.count == len(values)
    assert h.sum == pytest.approx(sum(values))
    h.observe(float("nan"))  # only in +Inf
    assert h.buckets()[-2][1] == counts[-2] and h.buckets()[-1][1] == len(values) + 1


def test_histogram_time_and_bucket_validation():
    h = Histogram("t", "t", buckets=(10.0,))
    with h.time():
        pass
    assert h.count == 1 and 0 <= h.sum < 10
    with pytest.raises(ValueError):
        Histogram("bad", "b", buckets=(1, 1))
    with pytest.raises(ValueError):
        Histogram("bad", "b", buckets=(2, 1))
    with pytest.raises(ValueError):
        Histogram("bad", "b", ["le"])
    assert Histogram("inf", "i", buckets=(1, float("inf"))).buckets() == [(1.0, 0), (math.inf, 0)]


def test_label_value_and_help_escaping():
    reg = Registry()
    c = reg.counter("esc_total", 'Help with \\ backslash\nand "quotes".', ["path"])
    c.labels(path='C:\\dir\n"quoted"').inc()
    text = reg.render()
    assert text == (
        '# HELP esc_total Help with \\\\ backslash\\nand "quotes".\n'
        "# TYPE esc_total counter\n"
        'esc_total{path="C:\\\\dir\\n\\"quoted\\""} 1.0\n'
    )
    assert text.count("\n") == 3  # the newlines inside stayed escaped


def test_value_formatting_like_go():
    assert format_value(1) == "1.0"
    assert format_value(0.25) == "0.25"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(float("-inf")) == "-Inf"
    assert format_value(float("nan")) == "NaN"
    assert format_value(12345678.0) == "1.2345678e+07"
    assert format_value(1e-9) == "1e-09"


def test_names_validated_and_unique_per_registry():
    reg = Registry()
    reg.histogram("lat", "l")
    with pytest.raises(ValueError):
        reg.counter("lat_count", "collides with the histogram's _count")
    with pytest.raises(ValueError):
        reg.gauge("lat", "dup")
    with pytest.raises(ValueError):
        Counter("bad-name", "b")
    with pytest.raises(ValueError):
        Gauge("g", "g", ["__reserved"])
    assert Registry().render() == ""


def test_updates_from_threads_are_not_lost():
    c = Counter("c_total", "c")
    h = Histogram("h", "h", buckets=(1,))

    def work():
        for _ in range(5000):
            c.inc()
            h.observe(0.5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value == 20000 and h.count == 20000


# --------------------------------------------------------------------------- HTTP


async def _exchange(port: int, request: bytes) -> bytes:
    """Send ``request``, read until the server closes, return everything it sent."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        chunks = []
        while data := await stream.receive_some(65536):
            chunks.append(data)
    return b"".join(chunks)


def _parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = response.partition(b"\r\n\r\n")
    assert sep, response
    lines = head.decode("ascii").split("\r\n")
    version, status, _reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    return int(status), headers, body


def _run_server(test, *, registry=None, **kwargs):
    """Run ``await test(port, registry)`` against a fresh server on an ephemeral port."""
    if registry is None:
        registry = Registry()
        registry.counter("scrapes_total", "A counter.").inc(3)

    async def main():
        with trio.fail_after(8):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(lambda task_status: serve_metrics(
                    registry, "127.0.0.1", 0, task_status=task_status, **kwargs))
                assert port > 0
                await test(port, registry)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_get_metrics_over_a_real_socket():
    async def test(port, registry):
        response = await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
        status, headers, body = _parse(response)
        assert status == 200
        assert headers["content-type"] == CONTENT_TYPE
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert body.decode() == registry.render()
        assert b"scrapes_total 3.0\n" in body

        # a query string is ignored; HTTP/1.0 and a bare-LF client are served too
        status, _, body2 = _parse(await _exchange(port, b"GET /metrics?x=1 HTTP/1.0\n\n"))
        assert status == 200 and body2 == body
        # HEAD: the headers of a GET, no body
        head = await _exchange(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        assert f"Content-Length: {len(body)}".encode() in head

    _run_server(test)


def test_healthz_404_405_and_bad_requests():
    async def test(port, _registry):
        status, _, body = _parse(await _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert (status, body) == (200, b"ok\n")
        status, _, _ = _parse(await _exchange(port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == 404
        status, _, _ = _parse(await _exchange(port, b"GET / HTTP/1.1\r\n\r\n"))
        assert status == 404
        status, headers, _ = _parse(await _exchange(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"))
        assert status == 405 and headers["allow"] == "GET, HEAD"
        for bad in (
            b"garbage\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            b"GET /m\xe9trics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n",  # then EOF before the blank line
        ):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(bad)
                await stream.send_eof()
                chunks = []
                while data := await stream.receive_some(65536):
                    chunks.append(data)
            status, _, _ = _parse(b"".join(chunks))
            assert status == 400, bad
        # a client that connects and half-closes without a byte gets nothing, and no error
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_eof()
            assert await stream.receive_some(1024) == b""
        status, _, _ = _parse(await _exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n"))
        assert status == 200

    _run_server(test)


def test_oversized_request_head_gets_431():
    async def test(port, _registry):
        huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n"
        status, _, _ = _parse(await _exchange(port, huge))
        assert status == 431
        # just under the limit is fine
        ok = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 8000 + b"\r\n\r\n"
        status, _, _ = _parse(await _exchange(port, ok))
        assert status == 200

    _run_server(test)


def test_slowloris_is_cut_off_and_others_are_still_served():
    async def test(port, _registry):
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        async with slow:
            await slow.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line
            start = trio.current_time()
            # while the slow client dawdles, a normal scrape is answered at once
            status, _, _ = _parse(await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
            assert status == 200
            for _ in range(5):
                await trio.sleep(0.05)
                try:
                    await slow.send_all(b"X-Drip: 1\r\n")
                except trio.BrokenResourceError:
                    break
            with trio.fail_after(10):
                try:
                    data = await slow.receive_some(1024)
                except trio.BrokenResourceError:  # reset instead of FIN: also cut off
                    data = b""
            assert data == b""  # closed by the server, with no response
            elapsed = trio.current_time() - start
            # cut off by the 0.3 s deadline, not at once; the upper bound is loose
            # for a busy machine
            assert 0.2 <= elapsed < 5, elapsed

    _run_server(test, timeout=0.3)


def test_concurrent_scrapes():
    registry = Registry()
    g = registry.gauge("g", "A gauge.", ["i"])
    for i in range(200):
        g.labels(i=i).set(i)
    expected = registry.render().encode()

    async def test(port, _registry):
        results = []

        async def scrape():
            status, _, body = _parse(await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
            results.append((status, body))

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(scrape)
        assert len(results) == 40
        assert all(r == (200, expected) for r in results)

    _run_server(test, registry=registry)


def test_connections_past_the_limit_are_closed_at_once():
    async def test(port, _registry):
        hold = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await trio.sleep(0.05)  # let the server's handlers take their slots
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(10):  # "at once"; loose for a busy machine
            try:
                assert await extra.receive_some(1024) == b""
            except trio.BrokenResourceError:
                pass
        for s in [*hold, extra]:
            await s.aclose()
        await trio.sleep(0.05)
        status, _, _ = _parse(await _exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n"))
        assert status == 200

    _run_server(test, max_connections=2)
