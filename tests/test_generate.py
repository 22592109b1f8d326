"""python -m progan.generate: grids, single images and latent walks from a checkpoint, checked
pixel for pixel against the trained generator; one-line errors with exit code 2."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import make_checkpoint
from progan.generate import main, slerp, walk_latents
from progan.model.samples import fixed_latents, to_uint8
from progan.model.trained import load_trained_generator

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run at 16x16 in the middle of its fade-in (alpha 0.5)."""
    return make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint_000001", resolution=16, alpha=0.5)


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def expected_pixels(checkpoint, num, seed, resolution, raw=False) -> np.ndarray:
    """What the trained generator draws for `seed`: NHWC uint8."""
    trained = load_trained_generator(checkpoint, raw=raw)
    return to_uint8(trained.generate(fixed_latents(num, trained.latent_size, seed), resolution))


def read_singles(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def test_single_images_are_the_ema_generators_at_each_resolution(checkpoint, tmp_path, capsys):
    for resolution in (16, 8, 4):  # 16: the checkpoint's alpha 0.5; below: the finished stages
        out = tmp_path / f"r{resolution}"
        code, stdout, _ = run(capsys, "--checkpoint", checkpoint, "--num", 5, "--seed", 3,
                              "--resolution", resolution, "--single", out)
        assert code == 0 and "wrote" in stdout
        singles = read_singles(out)
        assert singles.shape == (5, resolution, resolution, 3)
        np.testing.assert_array_equal(singles, expected_pixels(checkpoint, 5, 3, resolution))


def test_raw_draws_the_trained_g_not_the_ema(checkpoint, tmp_path, capsys):
    assert run(capsys, "--checkpoint", checkpoint, "--num", 3, "--single", tmp_path, "--raw")[0] == 0
    singles = read_singles(tmp_path)
    np.testing.assert_array_equal(singles, expected_pixels(checkpoint, 3, 0, 16, raw=True))
    assert not np.array_equal(singles, expected_pixels(checkpoint, 3, 0, 16))


def test_grid_is_reproducible_from_the_seed(checkpoint, tmp_path, capsys):
    paths = {name: tmp_path / f"{name}.png" for name in ("a", "b", "other")}
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        assert run(capsys, "--checkpoint", checkpoint.parent.parent, "--num", 16, "--seed", seed,
                   "--out", paths[name])[0] == 0
    grids = {name: np.asarray(Image.open(path)) for name, path in paths.items()}
    assert grids["a"].shape == (256, 256, 3)  # 4 x 4 tiles of 16 px, enlarged to 64
    np.testing.assert_array_equal(grids["a"], grids["b"])
    assert not np.array_equal(grids["a"], grids["other"])
    # the top-left tile is image 0, enlarged 4x by repetition
    first = expected_pixels(checkpoint, 16, 0, 16)[0]
    np.testing.assert_array_equal(grids["a"][:64:4, :64:4], first)


def test_walk_gif_loops_through_the_keyframes(checkpoint, tmp_path, capsys):
    out = tmp_path / "walk.gif"
    assert run(capsys, "--checkpoint", checkpoint, "--interpolate", "--num", 3, "--frames", 9, "--out", out)[0] == 0
    gif = Image.open(out)
    assert gif.n_frames == 9 and gif.size == (64, 64) and gif.info.get("loop") == 0
    frames = []
    for i in range(9):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB"), dtype=np.int16))
    assert all(np.abs(a - b).mean() > 0 for a, b in zip(frames, frames[1:]))  # it moves
    # frame 0 and every third frame are the keyframes (GIF palettes are lossy: compare closely, not exactly)
    keys = expected_pixels(checkpoint, 3, 0, 16).astype(np.int16)
    for k in range(3):
        assert np.abs(frames[3 * k][::4, ::4] - keys[k]).mean() < 8


def test_walk_as_png_strip(checkpoint, tmp_path, capsys):
    out = tmp_path / "walk.png"
    assert run(capsys, "--checkpoint", checkpoint, "--interpolate", "--frames", 6, "--resolution", 8,
               "--out", out)[0] == 0
    assert Image.open(out).size == (6 * 64, 64)


def test_truncation_pulls_toward_one_average_face(checkpoint, tmp_path, capsys):
    def singles(psi):
        out = tmp_path / f"psi{psi}"
        assert run(capsys, "--checkpoint", checkpoint, "--num", 4, "--single", out, "--truncation", psi)[0] == 0
        return read_singles(out).astype(np.int16)

    off, half, zero = singles(1.0), singles(0.5), singles(0.0)
    np.testing.assert_array_equal(off, expected_pixels(checkpoint, 4, 0, 16))
    assert all(np.array_equal(zero[0], img) for img in zero)  # psi 0: every latent gives the average face
    spread = lambda images: np.abs(images - images.mean(0)).mean()  # noqa: E731
    assert spread(off) > spread(half) > spread(zero) == 0


def test_slerp_keeps_endpoints_and_length():
    a, b = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(slerp(a[None], b[None], 0.0)[0], a)
    torch.testing.assert_close(slerp(a[None], b[None], 1.0)[0], b)
    middle = slerp(a[None], b[None], 0.5)[0]
    assert abs(middle.norm() - (a.norm() + b.norm()) / 2) < 0.05 * a.norm()  # a lerp would shrink it ~30%
    torch.testing.assert_close(slerp(a[None], a[None], 0.3)[0], a)  # parallel: no division by zero
    walk = walk_latents(torch.stack([a, b]), 4)
    torch.testing.assert_close(walk[0], a)
    torch.testing.assert_close(walk[2], b)


@pytest.mark.parametrize("case", ["missing", "corrupt", "too_high", "not_trained", "num", "out_is_file_below",
                                  "out_is_folder", "bad_suffix", "not_a_number"])
def test_mistakes_give_one_line_and_exit_2(case, checkpoint, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    (tmp_path / "file").write_text("x")
    args = {
        "missing": ["--checkpoint", tmp_path / "nope", "--out", tmp_path / "g.png"],
        "corrupt": ["--checkpoint", corrupt, "--out", tmp_path / "g.png"],
        "too_high": ["--checkpoint", checkpoint, "--resolution", 32, "--out", tmp_path / "g.png"],
        "not_trained": ["--checkpoint", checkpoint, "--resolution", 12, "--out", tmp_path / "g.png"],
        "num": ["--checkpoint", checkpoint, "--num", 0, "--out", tmp_path / "g.png"],
        "out_is_file_below": ["--checkpoint", checkpoint, "--out", tmp_path / "file" / "g.png"],
        "out_is_folder": ["--checkpoint", checkpoint, "--out", tmp_path],
        "bad_suffix": ["--checkpoint", checkpoint, "--interpolate", "--out", tmp_path / "walk.mp4"],
        "not_a_number": ["--checkpoint", checkpoint, "--seed", "one", "--out", tmp_path / "g.png"],
    }[case]
    code, out, err = run(capsys, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "error" in err and "Traceback" not in err, err
    assert not (tmp_path / "g.png").exists()


def test_the_command_line_itself(checkpoint, tmp_path):
    """The real `python -m progan.generate`: a grid, then a mistake in one line."""
    good = subprocess.run([sys.executable, "-m", "progan.generate", "--checkpoint", str(checkpoint),
                           "--num", "4", "--out", str(tmp_path / "grid.png")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert Image.open(tmp_path / "grid.png").size == (128, 128)
    bad = subprocess.run([sys.executable, "-m", "progan.generate", "--checkpoint", str(checkpoint),
                          "--resolution", "64", "--out", str(tmp_path / "g.png")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("python -m progan.generate: error: resolution 64: "
                                  "this checkpoint has trained 4, 8, 16")


@pytest.mark.parametrize("args", [["--num", 3_000_000, "--out", "g.png"],
                                  ["--num", 1025, "--single", "singles"],
                                  ["--interpolate", "--num", 101, "--out", "walk.gif"],
                                  ["--interpolate", "--frames", 100_000_000, "--out", "walk.gif"]])
def test_counts_have_an_upper_bound(args, tmp_path, capsys):
    """Refused before the checkpoint is read (it does not exist here) and before any output is made."""
    argv = ["--checkpoint", tmp_path / "no-checkpoint"] + [tmp_path / a if a in ("g.png", "singles", "walk.gif")
                                                            else a for a in args]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "at most" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
