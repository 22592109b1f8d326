import subprocess
import sys

import pytest

from progan.model.config import Config, ConfigError, load_config, save_config
from progan.model.schedule import batch_shares, build_phases, phase_at

REPO_CONFIGS = ["configs/paper_celeba.yaml", "configs/demo.yaml"]


def test_defaults_are_the_papers():
    c = Config()
    assert (c.optimizer.lr, c.optimizer.beta1, c.optimizer.beta2, c.optimizer.eps) == (0.001, 0.0, 0.99, 1e-8)
    assert (c.loss.kind, c.loss.gp_lambda, c.loss.drift_epsilon) == ("wgan_gp", 10.0, 0.001)
    assert (c.model.max_resolution, c.model.latent_size, c.model.mbstd_group_size) == (1024, 512, 4)
    assert c.optimizer.ema_beta == 0.999
    assert (c.schedule.stabilize_kimg, c.schedule.fade_kimg) == (600, 600)


@pytest.mark.parametrize("path", REPO_CONFIGS)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_overrides_are_typed():
    cfg = load_config("configs/demo.yaml", ["schedule.fade_kimg=3", "loss.kind=logistic_r1",
                                            "schedule.minibatch={4: 8, 8: 4}", "cluster.use_gpu=false"])
    assert cfg.schedule.fade_kimg == 3.0 and isinstance(cfg.schedule.fade_kimg, float)
    assert cfg.loss.kind == "logistic_r1"
    assert cfg.schedule.minibatch == {4: 8, 8: 4}
    assert cfg.cluster.use_gpu is False


@pytest.mark.parametrize("override, message", [
    ("model.max_resolution=100", "model.max_resolution: got 100, allowed: a power of two in 4..1024"),
    ("model.latent_sise=3", "model.latent_sise: unknown key; allowed: max_resolution, latent_size"),
    ("optimizer.lr=fast", "optimizer.lr: got 'fast', expected a number"),
    ("optimizer.beta2=1.5", "optimizer.beta2: got 1.5, allowed: 0 <= beta2 < 1"),
    ("loss.kind=hinge", "loss.kind: got 'hinge', allowed: wgan_gp, logistic_r1, least_squares"),
    ("model.precision=fp16", "model.precision: got 'fp16', allowed: fp32, bf16"),
    ("schedule.minibatch={4: 0}", "schedule.minibatch[4]: got 0, allowed: >= 1"),
    ("schedule.start_resolution=64", "schedule.start_resolution: got 64, allowed: a power of two in 4..model.max_resolution (32)"),
    ("data.mirror=3", "data.mirror: got 3, expected true or false"),
    ("cluster.use_gpu=maybe", "cluster.use_gpu: got 'maybe', expected true, false or auto"),
    ("cluster.min_workers=0", "cluster.min_workers: got 0, allowed: >= 1"),
    ("cluster.address=true", "cluster.address: got True, expected a string"),
    ("nonsense", "override 'nonsense': expected key.sub=value"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("written, value", [("auto", None), ("null", None), ("true", True), ("'false'", False)])
def test_auto_true_false_fields_hold_a_bool_or_none(written, value):
    """`auto` (and configs saved when these fields were strings: 'false') read as None / bools."""
    cfg = load_config("configs/demo.yaml", [f"cluster.use_gpu={written}", f"monitoring.prometheus={written}"])
    assert cfg.cluster.use_gpu is value and cfg.monitoring.prometheus is value


def test_bad_config_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {max_resolution: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_official_schedule():
    phases = build_phases(Config())
    assert [(p.resolution, p.fading) for p in phases[:4]] == [(4, False), (8, True), (8, False), (16, True)]
    assert phases[0].end_kimg == 600 and phases[1].end_kimg == 1200
    # 1024 fully faded in at 600 + 8 * 1200 = 10,200 kimg, then stable until 12,000
    assert phases[-2].end_kimg == 10_200 - 600 and phases[-1].end_kimg == 12_000
    fade8 = phase_at(phases, 900.0)
    assert fade8.resolution == 8 and fade8.alpha(900.0) == pytest.approx(0.5)
    assert phase_at(phases, 1300.0).alpha(1300.0) == 1.0
    # minibatch and lr keyed by the new resolution, already during its fade-in
    assert fade8.batch == 256 and phase_at(phases, 9700).lr == 0.003
    assert [batch_shares(64, w) for w in (1, 2, 3, 4)] == [[64], [32, 32], [22, 21, 21], [16, 16, 16, 16]]


def test_summary_cli_prints_23_1m():
    out = subprocess.run([sys.executable, "-m", "progan.summary", "--resolution", "1024"],
                         capture_output=True, text=True, check=True).stdout
    assert "23,071,507  (23.1M)" in out and "23,077,137  (23.1M)" in out


@pytest.mark.parametrize("override", [
    "model.max_resolution=²",                   # str.isdigit() is true for it; int() raised ValueError
    "model.max_resolution=١٢",                  # Arabic-Indic digits
    "schedule.minibatch={4: 16, ²: 4}",         # a key written as a string
    "schedule.total_kimg=" + "9" * 400,         # an integer no float holds: float() raised OverflowError
    "schedule.total_kimg=" + "9" * 5000,        # over Python's 4300-digit limit: YAML's int() raised
])
def test_overrides_that_look_like_integers_are_one_line(override):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message and len(message) < 200 and override.split("=")[0] in message
