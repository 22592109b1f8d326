"""The run folder's logs: the progress line a person reads, and the repeated-error policy."""
import json

import pytest

from progan.training.run_log import RunLog, error_signature, format_duration, progress_line, repeated_error

STATS = {"resolution": 16, "phase": "fade-in", "alpha": 0.25, "kimg": 11.5, "img_per_s": 50.0,
         "loss_d": -0.5, "loss_g": 1.25, "grad_penalty": 0.01}


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.6, "1m00s"), (250, "4m10s"), (3900, "1h05m")])
def test_durations_read_as_a_person_writes_them(seconds, text):
    assert format_duration(seconds) == text


def test_progress_line_says_how_far_and_when_the_run_ends():
    line = progress_line(STATS, total_kimg=23.0)
    # 11.5 kimg left at 50 img/s: 230 s
    assert "16x16 fade-in alpha 0.25" in line and "kimg 11.50/23 (50%) ETA 3m50s" in line
    assert "50.0 img/s" in line and "loss_d -0.5000" in line
    assert "ETA ?" in progress_line({**STATS, "img_per_s": 0.0}, total_kimg=23.0)
    assert "(100%) ETA 0s" in progress_line({**STATS, "kimg": 23.0}, total_kimg=23.0)


def test_stats_lines_go_to_the_file_and_the_console(tmp_path, capsys):
    log = RunLog(tmp_path, enabled=True, total_kimg=23.0)
    log.stats({**STATS, "time": 1.0})
    log.event("phase", index=3)
    assert json.loads((tmp_path / "stats.jsonl").read_text())["kimg"] == 11.5
    assert json.loads((tmp_path / "events.jsonl").read_text())["event"] == "phase"
    assert "kimg 11.50/23 (50%)" in capsys.readouterr().out
    RunLog(tmp_path / "other", enabled=False).stats(STATS)  # ranks other than 0 write nothing
    assert not (tmp_path / "other").exists() and capsys.readouterr().out == ""


def test_the_same_error_in_the_last_two_attempts_is_found(tmp_path):
    events = tmp_path / "events.jsonl"
    same = error_signature(ValueError("bad shard at step 12"))
    assert same == error_signature(ValueError("bad shard at step 345")) == "ValueError: bad shard at step #"

    def write(*records):
        events.write_text("".join(json.dumps(r) + "\n" for r in records))

    write({"event": "start"}, {"event": "worker_error", "signature": same})
    assert repeated_error(events) is None  # one attempt
    write({"event": "start"}, {"event": "worker_error", "signature": same},
          {"event": "resume"}, {"event": "worker_error", "signature": "OSError: disk full"})
    assert repeated_error(events) is None  # two different errors
    write({"event": "start"}, {"event": "worker_error", "signature": same},
          {"event": "resume"}, {"event": "worker_error", "signature": same})
    assert repeated_error(events) == same
