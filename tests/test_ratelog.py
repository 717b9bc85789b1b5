"""The rate-limited log of rejections: a bounded number of lines a second, client text clipped,
and a count of what was left out (no clocks: the limiter's time is set by the test)."""

import logging

from memory_server import ratelog
from memory_server.ratelog import CLIP_CHARS, RateLimitedLog, clip


def test_clip_keeps_short_text_and_says_how_long_long_text_was():
    assert clip("short") == "short"
    clipped = clip("x" * 1000)
    assert clipped.startswith("x" * CLIP_CHARS) and clipped.endswith("(1000 characters)")
    assert len(clipped) < CLIP_CHARS + 40


def test_at_most_n_lines_a_second_then_a_count_of_the_rest(monkeypatch, caplog):
    now = [100.0]
    monkeypatch.setattr(ratelog.time, "monotonic", lambda: now[0])
    log = RateLimitedLog(logging.getLogger("test.ratelog"), per_second=3)
    with caplog.at_level(logging.INFO, logger="test.ratelog"):
        for i in range(10):
            log("rejected %s (id %d)", "y" * 5000, i)
        assert len(caplog.records) == 3 and log.suppressed_total == 7
        assert all(len(r.getMessage()) < 300 for r in caplog.records)
        now[0] += 1.0
        log("rejected %s (id %d)", "z", 10)
        assert caplog.records[-1].getMessage() == (
            "rejected z (id 10) (and 7 similar lines not logged: at most 3 a second)")
        log("rejected %s (id %d)", "z", 11)
        log("rejected %s (id %d)", "z", 12)
        log("rejected %s (id %d)", "z", 13)  # the fourth this second
        log.flush()
        assert caplog.records[-1].getMessage() == "1 similar lines not logged (at most 3 a second)"
