"""python -m data_pipeline on real photos (a subset of ../shared/faces) and on broken files.

One local Ray instance serves the module and one preparation run serves most tests; the CLI
tests run subprocesses (bad arguments never start Ray).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from facenet_pytorch import MTCNN
from PIL import Image

from data_pipeline.config import PrepareConfig
from base.errors import UserError
from data_pipeline.faces import Detection, Rejected, crop_square, describe, pick_face
from data_pipeline.loader import BatchReader, FaceStream, decode_image, shard_samples
from data_pipeline.manifest import BELOW_THRESHOLD, NO_FACE, old_shards_note, read_manifest, shards_at
from data_pipeline.prepare import prepare
from data_pipeline.runtime import ray_session
from data_pipeline.shards import WORK_DIR_NAME
from data_pipeline.sources import list_sources
from test_loader import official_lod

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 64
SHARD_SIZE = 4
ALIGNED = [f"{n:06d}.jpg" for n in [*range(1, 5), *range(100, 116)]]  # 4 at 178x218, 16 at 89x109
WILD = ["examples_obama-240p.jpg", "examples_obama-1080p.jpg", "examples_biden.jpg",
        "examples_knn_examples_test_kit_with_rose.jpg"]
EXPECTED_COUNTS = {
    "files_seen": 39, "faces_kept": 34, "no_face": 1, "below_threshold": 0,
    "unreadable": 2, "not_an_image": 1, "duplicate_content": 1,
}
EXPECTED_REJECTS = {
    "in/bad/empty.jpg": "unreadable",
    "in/bad/truncated.jpg": "unreadable",
    "in/bad/text.jpg": "not_an_image",
    "in/bad/flat-grey.png": "no_face",
    "in/bad/copy-of-000100.jpg": "duplicate",
}


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def ray_instance():
    with ray_session():  # one local node, as the CLI without --nodes or --address
        yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, faces_dir) -> tuple[Path, list[str]]:
    """39 files: real photos, the same photos in other modes, broken files, and archives."""
    root = tmp_path_factory.mktemp("photos")
    aligned, wild = faces_dir / "aligned", faces_dir / "wild"
    copy_files(aligned, ALIGNED, root / "in" / "aligned")
    copy_files(wild, WILD, root / "wild")
    write_photo_variants(root / "in" / "modes", aligned, wild)
    write_bad_files(root / "in" / "bad", aligned, wild)
    with zipfile.ZipFile(root / "photos.zip", "w") as archive:
        for name in ["000010.jpg", "000011.jpg"]:
            archive.write(aligned / name, f"zipped/{name}")
    with tarfile.open(root / "photos.tar", "w") as archive:
        for name in ["000012.jpg", "000013.jpg"]:
            archive.add(aligned / name, f"tarred/{name}")
    return root, [str(root / "in"), str(root / "wild" / "*.jpg"), str(root / "photos.zip"), str(root / "photos.tar")]


def copy_files(folder: Path, names: list[str], target: Path) -> None:
    target.mkdir(parents=True)
    for name in names:
        shutil.copy(folder / name, target / name)


def write_photo_variants(target: Path, aligned: Path, wild: Path) -> None:
    target.mkdir(parents=True)
    Image.open(aligned / "000006.jpg").convert("L").save(target / "grey.jpg")
    Image.open(aligned / "000007.jpg").convert("CMYK").save(target / "cmyk.jpg")
    grey16 = np.asarray(Image.open(aligned / "000008.jpg").convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey16).save(target / "sixteen-bit.png")
    shutil.copy(wild / "examples_alex-lacamoire.png", target / "rgba.png")
    # Stored on its side with EXIF orientation 6 ("turn 90 degrees clockwise to view").
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(aligned / "000009.jpg").transpose(Image.Transpose.ROTATE_90).save(target / "rotated.jpg", exif=exif.tobytes())


def write_bad_files(target: Path, aligned: Path, wild: Path) -> None:
    target.mkdir(parents=True)
    (target / "empty.jpg").write_bytes(b"")
    jpeg = (aligned / "000005.jpg").read_bytes()
    (target / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (target / "text.jpg").write_text("this is not a photo\n")
    Image.new("RGB", (300, 300), (128, 128, 128)).save(target / "flat-grey.png")
    shutil.copy(aligned / "000100.jpg", target / "copy-of-000100.jpg")
    Image.open(wild / "examples_obama-240p.jpg").resize((6000, 3372), Image.Resampling.BICUBIC).save(target / "huge.jpg", quality=90)


def config_for(inputs: list[str], output: Path) -> PrepareConfig:
    return PrepareConfig(tuple(inputs), str(output), resolution=RESOLUTION, shard_size=SHARD_SIZE)


@pytest.fixture(scope="module")
def prepared(ray_instance, inputs) -> tuple[Path, dict]:
    root, specs = inputs
    output = root / "out"
    manifest = prepare(config_for(specs, output), show_progress=False)
    return output, manifest


@pytest.fixture(scope="module")
def samples(prepared) -> dict[str, dict]:
    """Every stored sample by its source's name (relative to the folder holding its input)."""
    output, manifest = prepared
    urls = [str(output / shard["file"]) for shard in manifest["shards"]]
    by_source = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        record = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["png"]))
        image.load()
        by_source[record["source"]] = {"key": sample["__key__"], "image": image, "record": record}
    return by_source


# ---------------------------------------------------------------------------------------------
# One run over everything


def test_counts_add_up_to_the_files_given(prepared):
    _, manifest = prepared
    assert manifest["counts"] == EXPECTED_COUNTS
    assert sum(shard["samples"] for shard in manifest["shards"]) == EXPECTED_COUNTS["faces_kept"]
    assert all(shard["samples"] <= SHARD_SIZE for shard in manifest["shards"])


def test_every_shard_opens_and_holds_faces_at_the_requested_size(prepared, samples):
    output, manifest = prepared
    assert len(samples) == EXPECTED_COUNTS["faces_kept"]
    for shard in manifest["shards"]:
        assert hashlib.sha256((output / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    for name, sample in samples.items():
        assert sample["image"].size == (RESOLUTION, RESOLUTION) and sample["image"].mode == "RGB", name
        record = sample["record"]
        assert record["probability"] >= 0.95
        assert np.asarray(record["landmarks"]).shape == (5, 2)
        assert len(record["box"]) == 4 and len(record["original_size"]) == 2


def test_keys_are_the_sha1_of_the_source_content(inputs, samples):
    root, _ = inputs
    for name in ["in/aligned/000001.jpg", "wild/examples_biden.jpg", "in/modes/rotated.jpg"]:
        assert samples[name]["key"] == hashlib.sha1((root / name).read_bytes()).hexdigest()


def test_bad_files_are_counted_and_listed_with_their_reason(prepared):
    output, _ = prepared
    rejects = [json.loads(line) for line in (output / "rejects.jsonl").read_text().splitlines()]
    assert {r["path"]: r["reason"] for r in rejects} == EXPECTED_REJECTS
    assert all(r["detail"] for r in rejects)


def test_archives_and_globs_are_read(samples):
    assert {"photos.zip!/zipped/000010.jpg", "photos.zip!/zipped/000011.jpg",
            "photos.tar!/tarred/000012.jpg", "photos.tar!/tarred/000013.jpg"} <= samples.keys()
    assert {f"wild/{name}" for name in WILD} <= samples.keys()


def test_outputs_name_photos_without_this_machines_paths(prepared, inputs):
    """Shard records, rejects.jsonl and the manifest name photos and inputs relative to the folder
    holding each input, so the shards can be shared without the folder layout they were made in."""
    output, manifest = prepared
    root, _ = inputs
    urls = [str(output / shard["file"]) for shard in manifest["shards"]]
    records = [sample["json"].decode() for sample in wds.WebDataset(urls, shardshuffle=False)]
    texts = {"manifest": (output / "manifest.json").read_text(), "rejects": (output / "rejects.jsonl").read_text(),
             **{f"record {n}": record for n, record in enumerate(records)}}
    assert len(records) == EXPECTED_COUNTS["faces_kept"]
    assert [name for name, text in texts.items() if str(root) in text] == []
    assert manifest["config"]["inputs"] == ["in", "wild/*.jpg", "photos.zip", "photos.tar"]


def test_photo_names_are_unique_and_relative_to_the_folder_holding_the_input(tmp_path):
    for name in ["a/photos/x.jpg", "a/photos/sub/y.jpg", "b/photos/x.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"not read when listing")
    a, b = tmp_path / "a", tmp_path / "b"
    assert [s.name for s in list_sources([str(a / "photos")])] == ["photos/sub/y.jpg", "photos/x.jpg"]
    assert [s.name for s in list_sources([str(a / "photos" / "*" / "*.jpg")])] == ["photos/sub/y.jpg"]
    # one file reached through two inputs: listed once, under the name the first input gives it
    assert [s.name for s in list_sources([str(a), str(a / "photos" / "sub")])] == ["a/photos/sub/y.jpg", "a/photos/x.jpg"]
    with pytest.raises(UserError, match="two photos would both be named photos/x.jpg"):
        list_sources([str(a / "photos"), str(b / "photos")])
    assert str(tmp_path) not in describe(FileNotFoundError(2, "No such file or directory", str(a / "x.jpg")))


@pytest.fixture(scope="module")
def checker() -> MTCNN:
    return MTCNN(keep_all=True)


def only_face(checker: MTCNN, image: Image.Image) -> tuple[np.ndarray, float]:
    boxes, probs = checker.detect(image)
    assert boxes is not None, "no face in the crop"
    best = int(np.argmax(probs))
    return boxes[best], float(probs[best])


@pytest.mark.parametrize("name", ["wild/examples_obama-240p.jpg", "wild/examples_obama-1080p.jpg",
                                  "wild/examples_biden.jpg", "in/bad/huge.jpg", "in/modes/rgba.png"])
def test_one_face_photos_give_a_centred_face(samples, checker, name):
    box, prob = only_face(checker, samples[name]["image"])
    centre = (box[:2] + box[2:]) / 2
    assert prob > 0.99
    assert np.all(np.abs(centre - RESOLUTION / 2) < 0.12 * RESOLUTION), centre
    # The square is the face box's longer side * 1.4, so the face fills about 70% of the crop.
    assert 0.5 * RESOLUTION < max(box[2:] - box[:2]) < 0.9 * RESOLUTION


def coarse_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean difference at 16x16 (0..1): sharpness follows the source resolution, framing must not.
    Crops of one photo differ by about 0.04 here, crops of two people by 0.19 or more."""
    a, b = (np.asarray(image.resize((16, 16), Image.Resampling.BOX), dtype=np.float64) for image in (a, b))
    return float(np.abs(a - b).mean() / 255)


def test_one_photo_at_240p_1080p_and_6000px_gives_the_same_crop(samples):
    low = samples["wild/examples_obama-240p.jpg"]
    for name in ["wild/examples_obama-1080p.jpg", "in/bad/huge.jpg"]:
        other = samples[name]
        relative_boxes = [np.asarray(s["record"]["box"]) / np.tile(s["record"]["original_size"], 2) for s in (low, other)]
        assert np.abs(relative_boxes[0] - relative_boxes[1]).max() < 0.02, name
        assert coarse_difference(low["image"], other["image"]) < 0.08, name
    assert samples["in/bad/huge.jpg"]["record"]["original_size"] == [6000, 3372]


def test_other_modes_and_exif_orientation_come_out_upright_rgb(samples, checker):
    assert samples["in/modes/rotated.jpg"]["record"]["original_size"] == [178, 218]
    for name in ["in/modes/grey.jpg", "in/modes/cmyk.jpg", "in/modes/sixteen-bit.png", "in/modes/rotated.jpg"]:
        box, prob = only_face(checker, samples[name]["image"])
        assert prob > 0.99, name
        # Upright: the eyes (first two landmarks) sit above the mouth (last two) in the crop.
        _, _, landmarks = checker.detect(samples[name]["image"], landmarks=True)
        eyes_y, mouth_y = landmarks[0][:2, 1].mean(), landmarks[0][3:, 1].mean()
        assert eyes_y < mouth_y - 0.1 * RESOLUTION, name
    grey = np.asarray(samples["in/modes/sixteen-bit.png"]["image"], dtype=np.float64)
    assert 40 < grey.mean() < 220  # scaled from 16 bits, not clipped to white


# ---------------------------------------------------------------------------------------------
# Reruns


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def cli_args(specs: list[str], output: Path) -> list[str]:
    inputs = [part for spec in specs for part in ("--input", spec)]
    return [*inputs, "--output", str(output), "--resolution", str(RESOLUTION), "--shard-size", str(SHARD_SIZE), "--quiet"]


def test_rerun_of_a_complete_output_is_a_quick_no_op(prepared, inputs):
    output, _ = prepared
    before = {path.name: path.stat().st_mtime_ns for path in output.iterdir()}
    started = time.monotonic()
    result = run_cli(*cli_args(inputs[1], output))
    assert result.returncode == 0, result.stderr
    assert "already complete" in result.stdout
    assert time.monotonic() - started < 15  # no Ray start
    assert {path.name: path.stat().st_mtime_ns for path in output.iterdir()} == before


def test_rerun_at_other_settings_is_refused_in_one_line(prepared, inputs):
    output, _ = prepared
    before = {path.name: path.stat().st_mtime_ns for path in output.iterdir()}
    args = cli_args(inputs[1], output)
    args[args.index("--resolution") + 1] = str(2 * RESOLUTION)
    result = run_cli(*args, "--margin", "0.5")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"--resolution {RESOLUTION} -> {2 * RESOLUTION}, --margin 0.4 -> 0.5" in result.stderr
    assert "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert {path.name: path.stat().st_mtime_ns for path in output.iterdir()} == before


def test_killed_run_resumes_to_the_same_shards(prepared, inputs):
    clean_output, clean_manifest = prepared
    root, specs = inputs
    output = root / "killed"
    process = subprocess.Popen([sys.executable, "-m", "data_pipeline", *cli_args(specs, output)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: any((output / WORK_DIR_NAME).glob("shard-*.json")), timeout=180)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert read_manifest(output) is None, "the run finished before it could be killed"
    written_before_kill = sorted(path.name for path in output.glob("shard-*.tar"))
    assert written_before_kill
    (output / "shard-000005.tar.tmp").write_bytes(b"half a shard")  # as if killed mid-write

    manifest = prepare(config_for(specs, output), show_progress=False)

    assert manifest["shards"] == clean_manifest["shards"]
    assert manifest["levels"] == clean_manifest["levels"]
    assert manifest["counts"] == clean_manifest["counts"]
    assert (output / "rejects.jsonl").read_bytes() == (clean_output / "rejects.jsonl").read_bytes()
    assert not list(output.glob("*.tmp")) and not (output / WORK_DIR_NAME).exists()


# ---------------------------------------------------------------------------------------------
# The resolution pyramid: each face at every lower resolution, exactly the stored face averaged down


def stored_images(output: Path, shards: list[dict], image_format: str, resolution: int) -> dict[str, np.ndarray]:
    """Every image of `shards` by key, in stored order, decoded as the loader decodes them."""
    return {sample["__key__"]: decode_image(sample, image_format, resolution)
            for shard in shards for sample in shard_samples(str(output / shard["file"]), image_format)}


def test_every_level_is_the_stored_face_averaged_down_as_the_official_code_does(prepared):
    """Levels 4..32 of the 64 px shards: the same faces in the same shards and order, each level
    the official dataset_tool's quantised level of detail of the stored face, to the bit."""
    output, manifest = prepared
    assert [(level["resolution"], level["image_format"]) for level in manifest["levels"]] == \
        [(4, "rgb"), (8, "rgb"), (16, "rgb"), (32, "rgb")]
    full = stored_images(output, manifest["shards"], "png", RESOLUTION)
    for level in manifest["levels"]:
        assert [shard["samples"] for shard in level["shards"]] == [shard["samples"] for shard in manifest["shards"]]
        for shard in level["shards"]:
            assert hashlib.sha256((output / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
        stored = stored_images(output, level["shards"], level["image_format"], level["resolution"])
        assert list(stored) == list(full)
        steps = (RESOLUTION // level["resolution"]).bit_length() - 1
        assert np.array_equal(np.stack(list(stored.values())), official_lod(np.stack(list(full.values())), steps))


def test_jpeg_shards_get_levels_of_the_decoded_jpeg(ray_instance, inputs):
    """JPEG is lossy: the levels are made from the face as a reader decodes it, so a phase
    sees the same pixels from a level as from the full-size JPEG; levels above 128 px are PNG."""
    root, _ = inputs
    output = root / "jpeg-512"
    manifest = prepare(PrepareConfig((str(root / "in" / "aligned" / "00000[1-4].jpg"),), str(output), resolution=512,
                                     image_format="jpg"), show_progress=False)
    assert [(level["resolution"], level["image_format"]) for level in manifest["levels"]] == \
        [(4, "rgb"), (8, "rgb"), (16, "rgb"), (32, "rgb"), (64, "rgb"), (128, "rgb"), (256, "png")]
    full = stored_images(output, manifest["shards"], "jpg", 512)
    assert len(full) == 4
    for level in manifest["levels"]:
        stored = stored_images(output, level["shards"], level["image_format"], level["resolution"])
        steps = (512 // level["resolution"]).bit_length() - 1
        assert np.array_equal(np.stack(list(stored.values())), official_lod(np.stack(list(full.values())), steps))


def test_a_phase_reads_its_level_and_gets_the_batches_the_full_size_gives(prepared):
    """FaceStream at a resolution with a level reads only that level's shards; its batches, for a
    resumed position in a pass too, equal those made from the full-size shards."""
    output, manifest = prepared
    for resolution, images_seen in [(8, 0), (32, 45), (RESOLUTION, 7)]:
        streams = [FaceStream(str(output), 0, 1, seed=3, shuffle_buffer=8, images_seen=images_seen, resolution=wanted)
                   for wanted in (resolution, None)]
        assert [stream.resolution for stream in streams] == [resolution, RESOLUTION]
        level_files = {Path(url).name for url, _ in streams[0].shards}
        assert level_files == {shard["file"] for shard in shards_at(manifest, resolution)[0]}
        readers = [BatchReader(stream, mirror=True, seed=5) for stream in streams]
        for batch in (8, 5, 8, 8, 8):  # 37 images: into the next pass
            pyramid, full = (reader.next_batch(batch, resolution) for reader in readers)
            assert torch.equal(pyramid, full)


def test_a_resumed_stream_goes_on_with_the_pass(prepared):
    """A stream opened with images seen (a resume, or a new phase) skips the part of the pass
    already dealt out instead of replaying it: with no shuffling, it continues exactly."""
    output, _ = prepared
    whole = iter(FaceStream(str(output), 0, 1, seed=3, shuffle_buffer=1, resolution=8))
    first_pass = [next(whole) for _ in range(EXPECTED_COUNTS["faces_kept"])]
    later = iter(FaceStream(str(output), 0, 1, seed=3, shuffle_buffer=1, images_seen=13, resolution=8))
    assert all(torch.equal(a, b) for a, b in zip(first_pass[13:], (next(later) for _ in range(21))))


def test_shards_from_before_the_pyramid_still_train_and_say_how_to_rebuild(prepared, inputs, tmp_path):
    """An output written before the pyramid (no levels in its manifest, no level shards): the
    stream reads the full size and gives the same batches, and the launcher's note says in one
    line that it is slow and how to rebuild it; the pipeline's rerun leaves it as it is and
    says so too."""
    output, manifest = prepared
    old = tmp_path / "old-shards"
    old.mkdir()
    for shard in manifest["shards"]:
        shutil.copy(output / shard["file"], old / shard["file"])
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "levels"}))
    assert old_shards_note(output) is None
    note = old_shards_note(old)
    assert note.startswith("warning:") and "\n" not in note
    assert f"python -m data_pipeline --input in --input wild/*.jpg" in note and f"--output {old}" in note
    assert f"--resolution {RESOLUTION} --overwrite" in note
    stream = FaceStream(str(old), 0, 1, seed=3, shuffle_buffer=8, resolution=16)
    assert stream.resolution == RESOLUTION
    new = FaceStream(str(output), 0, 1, seed=3, shuffle_buffer=8, resolution=16)
    old_batches, new_batches = (BatchReader(s, mirror=True, seed=5) for s in (stream, new))
    for _ in range(3):
        assert torch.equal(old_batches.next_batch(8, 16), new_batches.next_batch(8, 16))
    rerun = run_cli(*cli_args(inputs[1], old))
    assert rerun.returncode == 0 and "already complete" in rerun.stdout, rerun.stderr
    assert rerun.stderr.strip() == note


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Mistakes stop at once: one line, exit code 2, before Ray starts


def bad_argument_cases(tmp_path: Path, faces_dir: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    good = ["--input", str(faces_dir / "aligned")]
    return {
        "missing input": (["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o1")], "does not exist"),
        "empty input": (["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o2")], "no photos"),
        "resolution 100": ([*good, "--output", str(tmp_path / "o3"), "--resolution", "100"], "power of two"),
        "unwritable output": ([*good, "--output", str(tmp_path / "a-file" / "out")], "cannot write"),
        "no such format": ([*good, "--output", str(tmp_path / "o4"), "--format", "gif"], "invalid choice"),
    }


@pytest.mark.parametrize("case", ["missing input", "empty input", "resolution 100", "unwritable output", "no such format"])
def test_mistakes_give_one_line_and_exit_code_2(tmp_path, faces_dir, case):
    args, expected = bad_argument_cases(tmp_path, faces_dir)[case]
    started = time.monotonic()
    result = run_cli(*args, timeout=30)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------------------------------------
# Face choice and cropping details


def test_faces_below_the_threshold_are_rejected_and_near_ties_go_to_the_larger_face():
    small, large = [10, 10, 30, 40], [50, 50, 110, 130]
    detection = Detection(boxes=np.array([small, large], dtype=float), probs=np.array([0.9996, 0.9993]),
                          landmarks=np.zeros((2, 5, 2)))
    assert pick_face(detection, 0.95).box.tolist() == large
    with pytest.raises(Rejected) as below:
        pick_face(detection, 0.9999)
    assert below.value.status == BELOW_THRESHOLD
    with pytest.raises(Rejected) as none:
        pick_face(Detection(), 0.95)
    assert none.value.status == NO_FACE


def test_a_square_off_the_image_is_padded_with_edge_pixels():
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    square = crop_square(pixels, left=-2, top=1, side=6)
    assert square.shape == (6, 6, 3)
    assert (square[:3, 2:] == pixels[1:4, :4]).all()
    assert (square[:, 0] == square[:, 2]).all()  # left padding repeats the first column
    assert (square[3:] == square[2]).all()  # bottom padding repeats the last row
