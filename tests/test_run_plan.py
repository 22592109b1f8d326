"""RunPlan.begin and the STOP request (issue 25): `mkdir RUN/STOP` then --resume gave an
IsADirectoryError traceback. No Ray here: begin() only touches the run folder."""
import os

import pytest

from base.errors import UserError
from progan.model.config import load_config
from progan.training.run_plan import DEFAULT_CONFIG, RunPlan


def begin(run_dir):
    run_dir.mkdir(exist_ok=True)
    RunPlan(load_config(DEFAULT_CONFIG), run_dir, run_dir, True).begin()


def test_a_stop_file_is_removed(tmp_path):
    (tmp_path / "STOP").touch()
    begin(tmp_path)
    assert not (tmp_path / "STOP").exists() and (tmp_path / "config.yaml").is_file()


def test_an_empty_stop_folder_is_removed(tmp_path):
    (tmp_path / "STOP").mkdir()
    begin(tmp_path)
    assert not (tmp_path / "STOP").exists() and (tmp_path / "config.yaml").is_file()


def test_a_stop_folder_with_files_is_one_line_and_kept(tmp_path):
    (tmp_path / "STOP").mkdir()
    (tmp_path / "STOP" / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as error:
        begin(tmp_path)
    assert str(tmp_path / "STOP") in str(error.value) and "\n" not in str(error.value)
    assert (tmp_path / "STOP" / "notes.txt").read_text() == "mine"


def test_a_stop_pipe_is_one_line(tmp_path):
    os.mkfifo(tmp_path / "STOP")
    with pytest.raises(UserError, match="neither a file nor a folder"):
        begin(tmp_path)
