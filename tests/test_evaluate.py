"""progan.metrics (SWD, FID) and python -m progan.evaluate, on real aligned faces.

The faces (498 CelebA crops) are centre-cropped, resized to 32x32 and written as two shard folders
of disjoint halves (even and odd files), with data_pipeline.shards and a manifest as the pipeline
writes them; no Ray, no face detection. Checkpoints are plain dicts saved with save_checkpoint, as
the training loop writes them. FID runs with a randomly initialised InceptionV3 saved to a file:
the real weights are not downloaded in tests, the code path is the same.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import REPO, square_photo, tiny_config
from data_pipeline.manifest import FORMAT_VERSION, MANIFEST_NAME, write_json
from data_pipeline.shards import Sample, shard_name, write_shard
from progan import evaluate
from progan.model.checkpoint import save_checkpoint
from progan.model.ema import ema_beta, make_ema, update_ema
from progan.model.losses import WGANGP
from progan.metrics import fid, swd
from progan.model.networks import Discriminator, Generator
from progan.training.training_step import make_optimizer, train_step

STORED = 32
SHARD_SIZE = 100


# ---------------------------------------------------------------- data and checkpoints

def write_face_shards(folder: Path, photos: list[Path], size: int) -> Path:
    """`photos` as PNG face shards at `size` px with a complete manifest, as the pipeline writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, len(photos), SHARD_SIZE)):
        samples = []
        for path in photos[start:start + SHARD_SIZE]:
            data = square_photo(path, size)
            samples.append(Sample(hashlib.sha1(data).hexdigest(), data, "{}"))
        shards.append(asdict(write_shard(folder / shard_name(index), samples, "png")))
    write_json(folder / MANIFEST_NAME, {"format_version": FORMAT_VERSION, "resolution": size, "image_format": "png",
                                        "counts": {"faces_kept": len(photos)}, "shards": shards})
    return folder


@pytest.fixture(scope="module")
def halves(tmp_path_factory, faces_dir) -> tuple[Path, Path]:
    """Two shard folders at 32 px of disjoint halves of the aligned faces (even / odd files)."""
    photos = sorted((faces_dir / "aligned").glob("*.jpg"))
    root = tmp_path_factory.mktemp("faces")
    return write_face_shards(root / "even", photos[0::2], STORED), write_face_shards(root / "odd", photos[1::2], STORED)


def read_shards(shard_dir: Path, count: int, resolution: int = STORED) -> torch.Tensor:
    """`count` uint8 NCHW faces from shards, through the evaluation's own reader."""
    batches = evaluate.real_batches(str(shard_dir), resolution, mirror=False, seed=0, batch=count,
                                    device=torch.device("cpu"))
    return next(batches)


def small_config(*overrides):
    """The 16x16 test network of conftest, a little wider (64-d latents, 32 maps)."""
    return tiny_config("model.latent_size=64", "model.fmap_base=256", "model.fmap_max=32", *overrides)


def save_generator(folder: Path, cfg, G: Generator, resolution: int, G_ema: Generator | None = None,
                   alpha: float = 1.0, images_seen: int = 0) -> Path:
    """A checkpoint with the keys the training loop writes (those evaluation reads, at least)."""
    m = cfg.model
    D = Discriminator(m.max_resolution, m.fmap_base, m.fmap_max, m.num_channels, m.mbstd_group_size)
    state = {"config": cfg.to_dict(), "generator": G.state_dict(), "generator_ema": (G_ema or G).state_dict(),
             "discriminator": D.state_dict(), "resolution": resolution, "alpha": alpha,
             "images_seen": images_seen, "step": images_seen // 16}
    return save_checkpoint(state, folder)


def untrained_generator(cfg) -> Generator:
    torch.manual_seed(cfg.data.seed)
    m = cfg.model
    return Generator(m.max_resolution, m.latent_size, m.fmap_base, m.fmap_max, m.num_channels)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder with one checkpoint of an untrained 16x16 generator."""
    run = tmp_path_factory.mktemp("run")
    cfg = small_config()
    save_generator(run / "checkpoint_000001", cfg, untrained_generator(cfg), 16)
    return run


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- SWD maths

def mirror_convolve_reference(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """scipy.ndimage.convolve(mode='mirror') of a 2-D image by loops (the official pyramid's filter)."""
    h, w = image.shape
    reflect = lambda i, n: -i if i < 0 else 2 * (n - 1) - i if i >= n else i  # noqa: E731
    out = np.zeros_like(image)
    for y in range(h):
        for x in range(w):
            out[y, x] = sum(kernel[dy + 2, dx + 2] * image[reflect(y + dy, h), reflect(x + dx, w)]
                            for dy in range(-2, 3) for dx in range(-2, 3))
    return out


def test_pyramid_filters_match_the_official_mirror_convolution():
    image = torch.rand(1, 1, 12, 10) * 255
    kernel = swd.BINOMIAL_5X5.numpy()
    blurred = mirror_convolve_reference(image[0, 0].numpy(), kernel)
    np.testing.assert_allclose(swd.pyr_down(image)[0, 0].numpy(), blurred[::2, ::2], rtol=1e-5, atol=1e-4)
    spread = np.zeros((12, 10), np.float32)
    spread[::2, ::2] = image[0, 0, :6, :5].numpy()
    np.testing.assert_allclose(swd.pyr_up(image[:, :, :6, :5])[0, 0].numpy(),
                               mirror_convolve_reference(spread, kernel * 4), rtol=1e-5, atol=1e-4)


def test_laplacian_pyramid_levels_add_back_to_the_image():
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    pyramid = swd.laplacian_pyramid(images, 3)
    assert [level.shape[-1] for level in pyramid] == [64, 32, 16]
    rebuilt = pyramid[-1]
    for level in pyramid[-2::-1]:
        rebuilt = swd.pyr_up(rebuilt) + level
    torch.testing.assert_close(rebuilt, images.float(), rtol=0, atol=1e-3)


def test_levels_run_from_the_image_resolution_down_to_16():
    assert swd.pyramid_resolutions(128) == [128, 64, 32, 16]
    assert swd.pyramid_resolutions(16) == [16]
    assert swd.pyramid_resolutions(8) == [8]  # below 16: one level, the image itself
    with pytest.raises(ValueError, match="at least 8x8"):
        swd.pyramid_resolutions(4)


def test_neighbourhoods_are_7x7_patches_away_from_the_border():
    level = torch.randn(2, 3, 20, 24)
    patches = swd.neighbourhoods(level, 5, torch.Generator().manual_seed(0))
    assert patches.shape == (10, 3, 7, 7)
    same = torch.Generator().manual_seed(0)  # the same draws, in the same order
    ys = torch.randint(3, 17, (10, 1, 1, 1), generator=same).flatten().tolist()
    xs = torch.randint(3, 21, (10, 1, 1, 1), generator=same).flatten().tolist()
    for i, (y, x) in enumerate(zip(ys, xs)):
        torch.testing.assert_close(patches[i], level[i // 5, :, y - 3:y + 4, x - 3:x + 4])


def test_descriptors_are_normalised_per_channel_over_the_set():
    descriptors = torch.rand(500, 3, 7, 7) * torch.tensor([1.0, 5.0, 20.0]).view(1, 3, 1, 1) + 7
    flat = swd.normalize_descriptors(descriptors.clone()).view(500, 3, 49)
    torch.testing.assert_close(flat.mean(dim=(0, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(dim=(0, 2), correction=0), torch.ones(3), atol=1e-5, rtol=0)


def test_sliced_wasserstein_of_a_shift_is_the_mean_projected_shift():
    """B = A + s: every sorted projection moves by <s, d>, so the distance is mean |<s, d>|."""
    a = torch.randn(4000, 147)
    shift = torch.zeros(147)
    shift[0] = 0.5
    distance = swd.sliced_wasserstein(a, a + shift, torch.Generator().manual_seed(1))
    same = torch.Generator().manual_seed(1)
    expected = sum((0.5 * swd.random_directions(147, 128, same)[0]).abs().mean().item() for _ in range(4)) / 4
    assert distance == pytest.approx(expected, rel=1e-4)
    assert swd.sliced_wasserstein(a, a, torch.Generator()) == 0.0


# ---------------------------------------------------------------- SWD on faces

def test_swd_real_vs_real_is_small_real_vs_noise_large_and_reproducible(halves):
    even, odd = (read_shards(half, 249) for half in halves)
    noise = torch.randint(0, 256, even.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    real_real = swd.sliced_wasserstein_distance(even, odd, seed=0)
    real_noise = swd.sliced_wasserstein_distance(even, noise, seed=0)
    print(f"SWD x1e3, 249 vs 249 faces at 32x32: real vs real {real_real}, real vs noise {real_noise}")
    assert list(real_real.levels) == [32, 16]
    assert real_real.avg == pytest.approx(sum(real_real.levels.values()) / 2)
    assert real_real.avg < 0.25 * real_noise.avg
    assert all(real_real.levels[res] < 0.35 * real_noise.levels[res] for res in (32, 16))
    again = swd.sliced_wasserstein_distance(even, odd, seed=0)
    assert again == real_real  # the same call, the same numbers
    other_seed = swd.sliced_wasserstein_distance(even, odd, seed=1)
    assert other_seed != real_real and other_seed.avg == pytest.approx(real_real.avg, rel=0.3)


def test_reals_are_faded_like_the_generator_during_a_fade_in(halves):
    """At alpha 0 a checkpoint's generator paints the half-resolution image, nearest upsampled: the
    reals it is compared with are blended the same way, as in training."""
    sharp = read_shards(halves[0], 8)
    faded = next(evaluate.real_batches(str(halves[0]), STORED, mirror=False, seed=0, batch=8,
                                       device=torch.device("cpu"), alpha=0.0))
    blocks = torch.nn.functional.avg_pool2d(sharp.float(), 2).round()
    torch.testing.assert_close(faded.float(), blocks.repeat_interleave(2, 2).repeat_interleave(2, 3), atol=1, rtol=0)


def train_briefly(cfg, reals: torch.Tensor, steps: int) -> tuple[Generator, Generator]:
    """Plain-torch training directly at 16x16 (no growing, no Ray): the project's train_step on random
    minibatches of 16, with an EMA of half-life 0.5 kimg. Returns (G, its EMA)."""
    m = cfg.model
    G = untrained_generator(cfg)
    D = Discriminator(m.max_resolution, m.fmap_base, m.fmap_max, m.num_channels, m.mbstd_group_size)
    G_ema = make_ema(G)
    opt_g, opt_d = (make_optimizer(net, 0.003, 0.0, 0.99, 1e-8) for net in (G, D))
    loss, picks = WGANGP(), torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = reals[torch.randint(0, len(reals), (16,), generator=picks)]
        train_step(G, D, D, opt_g, opt_d, loss, batch, 16, 1.0, m.latent_size)
        update_ema(G_ema, G, ema_beta(16, half_life_kimg=0.5))
    return G, G_ema


def test_briefly_trained_generator_scores_at_least_2x_lower_than_untrained(halves, tmp_path, capsys):
    torch.manual_seed(0)
    cfg = small_config()
    reals = read_shards(halves[0], 249, resolution=16).float().div(127.5).sub(1)
    untrained = untrained_generator(cfg)
    _, G_ema = train_briefly(cfg, reals, steps=300)
    save_generator(tmp_path / "untrained", cfg, untrained, 16)
    save_generator(tmp_path / "trained", cfg, untrained_generator(cfg), 16, G_ema=G_ema, images_seen=300 * 16)
    scores = {}
    for name in ("untrained", "trained"):  # scored against the other half of the faces
        code, out, err = run_cli(capsys, "--checkpoint", tmp_path / name, "--data", halves[1], "--num-images", 256, "--json")
        assert code == 0, err
        scores[name] = json.loads(out)["avg"]
    print(f"SWD x1e3 at 16x16, 256 images: untrained {scores['untrained']:.1f}, after 300 steps {scores['trained']:.1f}")
    assert scores["trained"] < 0.5 * scores["untrained"], scores


# ---------------------------------------------------------------- FID

@pytest.fixture(scope="module")
def random_inception(tmp_path_factory) -> Path:
    """torch-fidelity's InceptionV3 with random weights (He-initialised so the features keep a
    useful scale through its 90-odd layers), saved as a weights file."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        net = inception.FeatureExtractorInceptionV3("random", ["2048"])
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_fid_of_a_set_with_itself_is_zero_and_noise_ranks_as_expected(halves, random_inception):
    extractor = fid.load_inception(random_inception)
    faces = read_shards(halves[0], 16)
    noisy = lambda sigma: (faces.float() + sigma * torch.randn(faces.shape, generator=torch.Generator().manual_seed(0))  # noqa: E731
                           ).round().clamp(0, 255).to(torch.uint8)
    features = {sigma: fid.inception_features(extractor, noisy(sigma) if sigma else faces) for sigma in (0, 20, 80)}
    assert features[0].shape == (16, 2048)
    itself = fid.frechet_distance(features[0], features[0])
    slightly, heavily = (fid.frechet_distance(features[0], features[s]) for s in (20, 80))
    print(f"FID (random InceptionV3, 16 faces): itself {itself:.3g}, noise 20: {slightly:.4g}, noise 80: {heavily:.4g}")
    assert abs(itself) < 1e-6 * heavily
    assert 0 < slightly < heavily


def test_missing_inception_weights_say_which_file_and_where(tmp_path):
    with pytest.raises(fid.InceptionWeightsError) as error:
        fid.load_inception(tmp_path / "nowhere.pth")
    message = str(error.value)
    assert "\n" not in message and fid.INCEPTION_WEIGHTS_FILE in message and fid.INCEPTION_WEIGHTS_URL in message
    assert message.startswith(f"Inception weights {tmp_path / 'nowhere.pth'}: no such file")


# ---------------------------------------------------------------- the command line

def test_cli_prints_a_table_writes_json_and_prints_one_json_line(run_dir, halves, random_inception, capsys):
    checkpoint_dir = run_dir / "checkpoint_000001"
    code, out, err = run_cli(capsys, "--checkpoint", run_dir, "--data", halves[0], "--num-images", 16)
    assert code == 0, err
    assert "SWD x 1e3 of" in out and "16x16" in out and "average" in out
    assert f"wrote {checkpoint_dir / 'metrics-swd.json'}" in out
    assert "note: the shards hold" not in err  # 16 < 249: no repeats
    written = json.loads((checkpoint_dir / "metrics-swd.json").read_text())
    assert written["metric"] == "swd" and written["resolution"] == 16 and written["num_images"] == 16
    assert list(written["levels"]) == ["16"] and written["avg"] == written["levels"]["16"] > 0

    code, out, err = run_cli(capsys, "--checkpoint", checkpoint_dir / "checkpoint.pt", "--data", halves[0],
                             "--num-images", 16, "--json", "--metric", "swd", "--metric", "fid",
                             "--inception-weights", random_inception)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2  # one JSON line per metric, nothing else on stdout
    swd_line, fid_line = (json.loads(line) for line in lines)
    assert swd_line == {**written, "seconds": swd_line["seconds"]}  # the same seed, the same numbers
    assert fid_line["metric"] == "fid" and fid_line["fid"] > 0 and fid_line["num_images"] == 16
    assert json.loads((checkpoint_dir / "metrics-fid.json").read_text())["fid"] == fid_line["fid"]


def test_reals_repeat_when_the_shards_hold_fewer_images(run_dir, tmp_path, faces_dir, capsys):
    few = write_face_shards(tmp_path / "few", sorted((faces_dir / "aligned").glob("*.jpg"))[:10], STORED)
    code, out, err = run_cli(capsys, "--checkpoint", run_dir, "--data", few, "--num-images", 24, "--json")
    assert code == 0, err
    assert "note: the shards hold 10 images, so the 24 real images repeat them" in err
    assert json.loads(out)["real_images_in_shards"] == 10


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("python -m progan.evaluate: error: "), err
    return lines[0]


def test_bad_input_gives_one_line_and_exit_code_2(run_dir, halves, tmp_path, capsys):
    checkpoint = run_dir / "checkpoint_000001"
    cases = {
        "not found": ["--checkpoint", tmp_path / "missing" / "checkpoint.pt", "--data", halves[0]],
        "at least 2": ["--checkpoint", run_dir, "--data", halves[0], "--num-images", 1],
        "no complete face shards": ["--checkpoint", run_dir, "--data", tmp_path],
        "no such file": ["--checkpoint", run_dir, "--data", halves[0], "--metric", "fid",
                         "--inception-weights", tmp_path / "inception.pth"],
        "--inception-weights PATH": ["--checkpoint", run_dir, "--data", halves[0], "--metric", "fid"],
    }
    corrupt = tmp_path / "corrupt" / "checkpoint.pt"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not a checkpoint at all")
    cases["unreadable"] = ["--checkpoint", corrupt, "--data", halves[0]]
    cases[f"Inception weights {corrupt}: unreadable"] = ["--checkpoint", run_dir, "--data", halves[0],
                                                          "--metric", "fid", "--inception-weights", corrupt]
    cfg = small_config("model.max_resolution=64")
    big = save_generator(tmp_path / "at64", cfg, untrained_generator(cfg), 64)
    cases["stored at 32x32, below the checkpoint's 64x64"] = ["--checkpoint", big, "--data", halves[0]]
    tiny = save_generator(tmp_path / "at4", cfg, untrained_generator(cfg), 4)
    cases["SWD needs images of at least 8x8"] = ["--checkpoint", tiny, "--data", halves[0]]
    if not torch.cuda.is_available():
        cases["no usable CUDA GPU"] = ["--checkpoint", run_dir, "--data", halves[0], "--device", "cuda"]
    for expected, args in cases.items():
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and out == "", (expected, out, err)
        assert expected in one_error_line(err), (expected, err)


def test_unwritable_output_is_refused_before_the_work(halves, tmp_path, capsys, monkeypatch):
    cfg = small_config()
    checkpoint = save_generator(tmp_path / "checkpoint_000001", cfg, untrained_generator(cfg), 16)
    (checkpoint.parent / "metrics-swd.json").mkdir()  # as root, a read-only folder would not stop a write
    monkeypatch.setattr(evaluate, "feed", mock.Mock(side_effect=AssertionError("evaluated anyway")))
    code, out, err = run_cli(capsys, "--checkpoint", checkpoint, "--data", halves[0])
    assert code == 2 and out == ""
    assert f"cannot write {checkpoint.parent / 'metrics-swd.json'}: a folder" in one_error_line(err)


def test_the_module_runs_as_a_command_and_fails_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "progan.evaluate", "--checkpoint", tmp_path / "none",
                             "--data", tmp_path], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "none: not found" in one_error_line(result.stderr)


@pytest.mark.parametrize("args, message", [(["--num-images", 10_000_000], "at most 1000000"),
                                           (["--seed", 2 ** 64], "must be in 0..")])
def test_counts_have_an_upper_bound(args, message, tmp_path, capsys):
    """Refused before the checkpoint (missing here) or the data are read."""
    code = evaluate.main(["--checkpoint", str(tmp_path / "missing"), "--data", str(tmp_path)] + list(map(str, args)))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_a_damaged_manifest_or_shards_that_never_decode_give_one_line(run_dir, faces_dir, tmp_path, capsys):
    """Issue 25: a string where a count belongs gave a traceback; a manifest naming another image
    format than its members hold made evaluate loop for ever after one warning."""
    photos = sorted((faces_dir / "aligned").glob("*.jpg"))[:6]
    folder = write_face_shards(tmp_path / "shards", photos, 16)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    good = json.loads(json.dumps(manifest))
    manifest["shards"][0]["samples"] = "6"
    write_json(folder / MANIFEST_NAME, manifest)
    code, out, err = run_cli(capsys, "--checkpoint", run_dir, "--data", folder, "--num-images", 8)
    assert code == 2 and "field shards[0].samples must be a non-negative integer" in one_error_line(err), err

    write_json(folder / MANIFEST_NAME, {**good, "image_format": "jpg"})  # the members are PNGs
    code, out, err = run_cli(capsys, "--checkpoint", run_dir, "--data", folder, "--num-images", 8)
    lines = [line for line in err.splitlines() if line.strip()]  # the note, progress, a warning, then the error
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("python -m progan.evaluate: error: ") and str(folder) in lines[-1], err
    assert "no usable image in a full pass" in lines[-1] and "jpg" in lines[-1], err
