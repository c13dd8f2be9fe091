"""nodeagent.logs: JSON lines, extra fields, node names, and secrets that never reach the output."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
import threading

import pytest
import trio

from nodeagent.logs import (
    JsonFormatter,
    RedactingFilter,
    node_context,
    redact,
    setup_logging,
)

PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
    "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
    "-----END RSA PRIVATE KEY-----"
)
KEY_MATERIAL = "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun"
CERT = "-----BEGIN CERTIFICATE-----\nMIIBpublic\n-----END CERTIFICATE-----"


@pytest.fixture
def capture():
    """A logger whose records go, through the filter and the formatter, into a list of dicts."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(node="n1"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.logs.capture")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)

    def lines() -> list[dict]:
        text = stream.getvalue()
        assert text.endswith("\n")
        return [json.loads(line) for line in text.splitlines()]

    yield logger, lines, stream
    logger.removeHandler(handler)


def test_one_json_object_per_line_with_the_core_fields(capture):
    logger, lines, stream = capture
    logger.info("became leader at term %d", 7)
    logger.warning("multi\nline\nmessage")
    out = lines()
    assert len(out) == 2 and len(stream.getvalue().splitlines()) == 2
    first = out[0]
    assert list(first)[:5] == ["ts", "level", "logger", "node", "msg"]
    assert first["level"] == "info"
    assert first["logger"] == "test.logs.capture"
    assert first["node"] == "n1"
    assert first["msg"] == "became leader at term 7"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    ts = dt.datetime.strptime(first["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)
    assert abs((dt.datetime.now(dt.timezone.utc) - ts).total_seconds()) < 60
    assert out[1]["level"] == "warning" and out[1]["msg"] == "multi\nline\nmessage"


def test_timestamp_is_utc_with_milliseconds():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    record.created = 1714566896.789123  # 2024-05-01T12:34:56.789 UTC
    record.msecs = 789.123
    assert json.loads(JsonFormatter().format(record))["ts"] == "2024-05-01T12:34:56.789Z"


def test_extra_fields_are_included(capture):
    logger, lines, _ = capture
    logger.info("append", extra={"term": 3, "index": 42, "peer": "n2", "ok": True, "lag": 0.5,
                                 "entries": [1, 2], "meta": {"a": None}, "level": "shadowed"})
    out = lines()[0]
    assert out["term"] == 3 and out["index"] == 42 and out["peer"] == "n2"
    assert out["ok"] is True and out["lag"] == 0.5
    assert out["entries"] == [1, 2] and out["meta"] == {"a": None}
    assert out["level"] == "info" and out["level_"] == "shadowed"  # core fields win


def test_non_serializable_values_are_strd(capture):
    class Thing:
        def __str__(self):
            return "a thing"

    class Unprintable:
        def __str__(self):
            raise RuntimeError("no")

    loop: list = []
    loop.append(loop)
    logger, lines, _ = capture
    logger.info("odd", extra={"obj": Thing(), "data": b"\x00bytes", "when": dt.date(2024, 5, 1),
                              "nan": float("nan"), "inf": float("inf"), "by_pair": {(1, 2): "v"},
                              "s": {3}, "bad": Unprintable(), "loop": loop})
    out = lines()[0]
    assert out["obj"] == "a thing"
    assert out["data"] == "b'\\x00bytes'"
    assert out["when"] == "2024-05-01"
    assert out["nan"] == "nan" and out["inf"] == "inf"
    assert out["by_pair"] == {"(1, 2)": "v"}
    assert out["s"] == [3]
    assert out["bad"] == "<unprintable Unprintable>"
    assert isinstance(out["loop"], list)  # a self-referencing list does not recurse forever


def test_node_from_context_and_from_extra(capture):
    logger, lines, _ = capture
    with node_context("n7"):
        logger.info("in context")

        async def task():
            logger.info("in a trio task")
            await trio.to_thread.run_sync(logger.info, "in a worker thread")

        trio.run(task)
    logger.info("after")
    logger.info("explicit", extra={"node": "n9"})
    assert [o["node"] for o in lines()] == ["n7", "n7", "n7", "n1", "n9"]


def test_secret_keys_are_redacted_in_extra_at_any_depth(capture):
    logger, lines, stream = capture
    logger.info(
        "connecting",
        extra={
            "api_key": "k-123",
            "Password": "hunter2",
            "tls": {"ca": "ok", "private_key": "pk", "nested": [{"token": "t-1"}]},
            "AUTH_TOKEN": 5,
            "passphrase": None,
            "secret_sauce": ["a"],
            "peer": "n2",
        },
    )
    out = lines()[0]
    assert out["api_key"] == out["Password"] == out["AUTH_TOKEN"] == "[redacted]"
    assert out["passphrase"] == out["secret_sauce"] == "[redacted]"
    assert out["tls"] == {"ca": "ok", "private_key": "[redacted]", "nested": [{"token": "[redacted]"}]}
    assert out["peer"] == "n2"
    for secret in ("k-123", "hunter2", "pk\"", "t-1"):
        assert secret not in stream.getvalue()


def test_secret_keys_in_message_arguments_are_redacted(capture):
    logger, lines, stream = capture
    logger.info("config %s", {"cluster": "c1", "token": "t-secret"})
    logger.info("user %(user)s password %(password)s", {"user": "bob", "password": "hunter2"})
    logger.info("count %d of %.1f", 3, 2.5)  # numeric formats still work
    msgs = [o["msg"] for o in lines()]
    assert msgs[0] == "config {'cluster': 'c1', 'token': '[redacted]'}"
    assert msgs[1] == "user bob password [redacted]"
    assert msgs[2] == "count 3 of 2.5"
    assert "t-secret" not in stream.getvalue() and "hunter2" not in stream.getvalue()


def test_pem_private_keys_are_redacted_in_msg_extra_and_exception(capture):
    logger, lines, stream = capture
    logger.info("loaded key:\n" + PEM + "\nand cert " + CERT)
    logger.info("loaded %s", PEM)
    logger.info("loaded %s", PEM.encode())  # bytes: str() of it still contains the block
    logger.info("field", extra={"blob": "x " + PEM + " y", "raw": PEM.encode(), "list": [PEM]})
    try:
        raise ValueError("could not parse " + PEM)
    except ValueError:
        logger.exception("tls setup failed")
    logger.info("truncated " + PEM[:80])  # no END line: hidden to the end
    text = stream.getvalue()
    assert KEY_MATERIAL not in text
    assert "BEGIN RSA PRIVATE KEY" not in text
    out = lines()
    assert out[0]["msg"] == "loaded key:\n[redacted private key]\nand cert " + CERT  # certs are public
    assert out[1]["msg"] == "loaded [redacted private key]"
    assert out[3]["blob"] == "x [redacted private key] y" and out[3]["list"] == ["[redacted private key]"]
    exc = out[4]["exc"]
    assert exc.startswith("Traceback") and "ValueError: could not parse [redacted private key]" in exc
    assert out[4]["msg"] == "tls setup failed" and out[4]["level"] == "error"
    assert out[5]["msg"] == "truncated [redacted private key]"


def test_formatter_alone_still_redacts_fields_and_pem():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "key %s", (PEM,), None)
    record.secret = "s3"
    record.cfg = {"password": "p"}
    out = json.loads(JsonFormatter(node="n").format(record))
    assert out["msg"] == "key [redacted private key]"
    assert out["secret"] == "[redacted]" and out["cfg"] == {"password": "[redacted]"}


def test_redact_is_idempotent():
    value = {"a": [PEM, {"token": 1}], "b": (1, 2.5, None, True)}
    once = redact(value)
    assert once == {"a": ["[redacted private key]", {"token": "[redacted]"}], "b": [1, 2.5, None, True]}
    assert redact(once) == once


@pytest.fixture
def clean_root():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def test_setup_logging_to_a_file_appends(tmp_path, clean_root):
    path = tmp_path / "agent.log"
    path.write_text('{"old":"line"}\n')
    setup_logging("n3", level="debug", file=str(path))
    log = logging.getLogger("nodeagent.test")
    log.debug("hello %s", "world", extra={"term": 1, "token": "t"})
    # a second call replaces the first handler instead of doubling every line
    handler = setup_logging("n3", level="INFO", file=str(path))
    log.debug("dropped")
    log.info("second")
    handler.flush()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"old": "line"}
    assert [(o["msg"], o["node"], o["level"]) for o in lines[1:]] == [
        ("hello world", "n3", "debug"),
        ("second", "n3", "info"),
    ]
    assert lines[1]["term"] == 1 and lines[1]["token"] == "[redacted]"
    assert sum(1 for h in clean_root.handlers if getattr(h, "_raftdeck", False)) == 1


def test_setup_logging_to_stderr(capsys, clean_root):
    setup_logging("n4", level=logging.WARNING)
    log = logging.getLogger("nodeagent.test")
    log.info("quiet")
    log.warning("loud", extra={"password": "p"})
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    out = json.loads(err[0])
    assert out["msg"] == "loud" and out["node"] == "n4" and out["password"] == "[redacted]"
    with pytest.raises(ValueError):
        setup_logging("n4", level="verbose")


def test_logging_from_threads_keeps_lines_whole(capture):
    logger, lines, _ = capture

    def work(i):
        for j in range(200):
            logger.info("t%d line %d", i, j, extra={"payload": "x" * 100})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lines()) == 800
