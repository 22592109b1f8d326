"""The run's JSON-lines files after a torn write (a kill or a full disk mid-line): readers skip the
torn last line and say so once, the next append starts a line of its own, and the repeated-error
policy still reads the events, so the run can be resumed (issue 25)."""
import json

import pytest

from base import storage
from base.errors import UserError
from progan.training.run_log import RunLog, repeated_error

TORN = '{"time": 3, "event": "work'  # what a kill leaves of a line: no closing brace, no newline


def lines(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_torn_last_line_is_skipped_and_reported_once(tmp_path, capsys):
    events = tmp_path / "events.jsonl"
    events.write_text(lines({"event": "start"}, {"event": "phase"}) + TORN)
    assert storage.read_jsonl(events) == [{"event": "start"}, {"event": "phase"}]
    assert storage.read_jsonl(events) == [{"event": "start"}, {"event": "phase"}]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(events) in err[0] and "torn" in err[0]


def test_bad_line_in_the_middle_is_an_error(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text(lines({"event": "start"}) + TORN + "\n" + lines({"event": "phase"}))
    with pytest.raises(UserError, match="line 2 is not JSON"):
        storage.read_jsonl(events)


def test_missing_file_has_no_records(tmp_path):
    assert storage.read_jsonl(tmp_path / "events.jsonl") == []


def test_next_append_lands_on_its_own_line(tmp_path, capsys):
    events = tmp_path / "events.jsonl"
    events.write_text(lines({"event": "start"}) + TORN)
    log = RunLog(tmp_path, enabled=True)
    log.event("resume")
    log.event("phase")
    # the torn fragment (no record) is cut off, so the file is whole JSON lines again
    assert [e["event"] for e in storage.read_jsonl(events)] == ["start", "resume", "phase"]
    assert TORN not in events.read_text()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(events) in err[0] and "torn last line" in err[0]


def test_a_whole_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(lines({"event": "start"}) + json.dumps({"event": "phase"}))
    storage.append_text(path, lines({"event": "resume"}), fresh_line=True)
    assert path.read_text() == lines({"event": "start"}, {"event": "phase"}, {"event": "resume"})


def test_append_to_a_whole_file_adds_no_blank_line(tmp_path):
    path = tmp_path / "stats.jsonl"
    storage.append_text(path, lines({"step": 1}), fresh_line=True)
    storage.append_text(path, lines({"step": 2}), fresh_line=True)
    assert path.read_text() == lines({"step": 1}, {"step": 2})


def test_remote_append_after_a_torn_line_starts_a_fresh_line():
    url = "memory://test-jsonl/run/events.jsonl"  # fsspec's in-memory store: the object-storage code path
    storage.write_bytes(url, (lines({"event": "start"}) + TORN).encode())
    storage.append_text(url, lines({"event": "resume"}), fresh_line=True)
    assert storage.read_text(url) == lines({"event": "start"}, {"event": "resume"})
    storage.remove(url)


def test_repeated_error_reads_a_torn_events_file(tmp_path):
    error = {"event": "worker_error", "signature": "RuntimeError: boom at step #"}
    events = tmp_path / "events.jsonl"
    events.write_text(lines({"event": "start"}, error, {"event": "resume"}, error) + TORN)
    assert repeated_error(events) == "RuntimeError: boom at step #"
