"""The agent's log file on a disk that fills: one line on stderr, not a traceback per
record, and the records go out again once there is space (a real, small tmpfs)."""

from __future__ import annotations

import logging
import os

from nodeagent.logs import setup_logging
from tests.smallfs import fill


def test_a_full_disk_under_the_log_file_is_one_line_and_logging_resumes(tmp_path, capsys, small_fs):
    fs = small_fs.mount(tmp_path / "fs", 1)
    log = logging.getLogger("nodeagent.test")
    handler = None
    try:
        handler = setup_logging("n1", file=str(fs / "agent.log"))
        log.info("before")
        fill(fs, 0)
        for i in range(200):
            log.info("while full", extra={"i": i, "pad": "x" * 200})
        err = capsys.readouterr().err
        noisy = "Traceback" in err or "Logging error" in err  # (not `in` in the assert: a
        assert not noisy, err[:2000]  # diff of megabytes of tracebacks takes pytest minutes)
        said = [ln for ln in err.splitlines() if "cannot write the log file" in ln]
        assert len(said) == 1 and "No space left on device" in said[0], err
        assert handler.lost >= 1
        os.unlink(fs / "ballast")
        log.info("after")
        handler.flush()
        text = (fs / "agent.log").read_text()
        assert '"msg":"before"' in text and '"msg":"after"' in text
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
