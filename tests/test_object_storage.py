"""Shards and runs on object storage: a real S3 server (SeaweedFS on 127.0.0.1, tests/s3.py), the
data pipeline's CLI writing to s3://, workers streaming their shares from the bucket, and
launch.py training with its checkpoints, logs and samples there, then resuming from the bucket.

The AWS_* variables are set in this process before the module's Ray cluster starts, so its nodes
(and every worker they start) reach the bucket the way nodes of a real cluster do: through the
standard variables (or a machine role), never through anything the project writes down.
"""
import hashlib
import itertools
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY_OVERRIDES, copy_test_photos, make_shards
from s3 import SeaweedS3

CLUSTER_NODES = 2
BUCKET = "faces"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The S3 server, its variables in this process's environment for the module's duration."""
    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        saved = dict(os.environ)
        os.environ.update(server.environ())
        # where the pipeline builds an s3:// output before uploading it (default: ~/.cache)
        os.environ["DATA_PIPELINE_WORK_DIR"] = str(tmp_path_factory.mktemp("pipeline-work"))
        server.make_bucket(BUCKET)
        try:
            yield server
        finally:
            os.environ.clear()
            os.environ.update(saved)


@pytest.fixture(scope="module")
def cluster(s3, cluster):
    """The module's Ray cluster, started once the AWS variables are set (its nodes inherit them)."""
    yield cluster


@pytest.fixture(scope="module")
def s3_shards(s3, cluster, faces_dir, tmp_path_factory):
    """(photos folder, shards URL): 16x16 shards of the usual 64 photos, made straight into the bucket."""
    photos = copy_test_photos(faces_dir, tmp_path_factory.mktemp("photos"))
    url = f"s3://{BUCKET}/shards16"
    make_shards(photos, url, cluster.cluster.address)
    return photos, url


def object_names(s3, url: str) -> dict[str, dict]:
    """{path below url: S3 info} of every object under url."""
    prefix = url.removeprefix("s3://").rstrip("/") + "/"
    return {name[len(prefix):]: info for name, info in s3.filesystem().find(prefix, detail=True).items()}


def test_pipeline_writes_shards_manifest_and_rejects_to_the_bucket(s3, s3_shards):
    from data_pipeline.manifest import all_shards, read_manifest, shard_files

    _, url = s3_shards
    manifest = read_manifest(url)
    assert manifest is not None and manifest["resolution"] == 16
    assert [level["resolution"] for level in manifest["levels"]] == [4, 8]  # the pyramid goes up too
    objects = object_names(s3, url)
    assert set(objects) == set(shard_files(manifest)) | {"manifest.json", "rejects.jsonl"}  # nothing half-done left
    for shard in all_shards(manifest):
        assert objects[shard["file"]]["size"] == shard["bytes"]
    assert manifest["counts"]["faces_kept"] == sum(shard["samples"] for shard in manifest["shards"]) > 32
    assert not (REPO / "s3:").exists()  # the old bug: a local folder named after the URL's scheme
    assert not any(os.scandir(os.environ["DATA_PIPELINE_WORK_DIR"]))  # the local build is gone once uploaded


def test_a_rerun_on_the_bucket_is_a_quick_no_op(s3, s3_shards, cluster):
    photos, url = s3_shards
    before = {name: info["LastModified"] for name, info in object_names(s3, url).items()}
    rerun = subprocess.run([sys.executable, "-m", "data_pipeline", "--input", str(photos), "--output", url,
                            "--resolution", "16", "--shard-size", "16", "--address", cluster.cluster.address],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "is already complete" in rerun.stdout
    after = {name: info["LastModified"] for name, info in object_names(s3, url).items()}
    assert after == before  # nothing rewritten


def test_overwrite_on_the_bucket_replaces_the_output_and_drops_extra_shards(s3, s3_shards, cluster):
    """--overwrite over a complete earlier output (other settings, one shard more): the manifest goes
    first, the new shards, rejects and manifest arrive, and the old output's extra shard (one its
    manifest lists) is removed; a file of the user's there, which no manifest names, stays (issue 25)."""
    from data_pipeline.manifest import read_manifest, shard_files

    photos, url = s3_shards
    target = f"s3://{BUCKET}/overwritten"
    fs = s3.filesystem()
    old = {**{key: value for key, value in read_manifest(url).items() if key != "levels"}, "resolution": 32}
    for shard in old["shards"]:
        fs.copy(f"{url.split('://', 1)[1]}/{shard['file']}", f"{BUCKET}/overwritten/{shard['file']}")
    extra = b"an earlier output's shard"
    old["shards"] = [*old["shards"], {"file": "shard-000999.tar", "samples": 1, "bytes": len(extra),
                                      "sha256": hashlib.sha256(extra).hexdigest()}]
    fs.pipe_file(f"{BUCKET}/overwritten/shard-000999.tar", extra)
    fs.pipe_file(f"{BUCKET}/overwritten/shard-mydata.tar", b"the user's own")
    fs.pipe_file(f"{BUCKET}/overwritten/manifest.json", json.dumps(old).encode())
    assert read_manifest(target) is not None  # a complete earlier output
    make_shards(photos, target, cluster.cluster.address, "--overwrite", "--shard-size", "32")
    manifest = read_manifest(target)
    assert manifest["resolution"] == 16 and manifest["config"]["shard_size"] == 32
    assert set(object_names(s3, target)) == set(shard_files(manifest)) | {
        "manifest.json", "rejects.jsonl", "shard-mydata.tar"}


def pipeline_on(photos, url: str, address: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline", "--input", str(photos), "--output", url,
                           "--resolution", "16", "--shard-size", "16", "--address", address],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_files_of_the_users_under_the_prefix_stop_the_pipeline_and_stay(s3, s3_shards, cluster):
    """A prefix holding files the pipeline did not write, a shard-000000.tar among them (a name the
    pipeline would upload over): one line naming the first, exit 2, nothing written or removed."""
    photos, _ = s3_shards
    url = f"s3://{BUCKET}/users-own"
    fs = s3.filesystem()
    fs.pipe_file(f"{BUCKET}/users-own/shard-000000.tar", b"the user's own shard")
    fs.pipe_file(f"{BUCKET}/users-own/notes.txt", b"the user's notes")
    before = {name: info["ETag"] for name, info in object_names(s3, url).items()}
    run = pipeline_on(photos, url, cluster.cluster.address)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        f"error: --output {url}: {url}/notes.txt is not this pipeline's output, and the pipeline writes only under "
        f"an empty prefix or its own earlier output; move it away, give another --output, or pass --overwrite"), run.stderr
    assert {name: info["ETag"] for name, info in object_names(s3, url).items()} == before
    assert fs.cat_file(f"{BUCKET}/users-own/shard-000000.tar") == b"the user's own shard"


def test_an_upload_cut_short_is_finished_by_the_rerun(s3, s3_shards, cluster):
    """The shards uploaded before the manifest, then the upload stopped: the local build folder
    still holds the complete output, so its shards under the prefix are the pipeline's own and
    the same command uploads the rest (the manifest last)."""
    from data_pipeline.manifest import read_manifest, shard_files
    from data_pipeline.shards import build_folder

    photos, done = s3_shards
    url = f"s3://{BUCKET}/cut-short"
    fs = s3.filesystem()
    manifest = read_manifest(done)
    build = build_folder(url)
    build.mkdir(parents=True)
    for name in [*shard_files(manifest), "rejects.jsonl", "manifest.json"]:
        fs.get_file(f"{done.split('://', 1)[1]}/{name}", str(build / name))  # the complete local build
    first = shard_files(manifest)[0]
    fs.copy(f"{done.split('://', 1)[1]}/{first}", f"{BUCKET}/cut-short/{first}")  # what got up before the stop
    run = pipeline_on(photos, url, cluster.cluster.address)
    assert run.returncode == 0, run.stderr
    assert read_manifest(url) == manifest
    assert set(object_names(s3, url)) == set(shard_files(manifest)) | {"manifest.json", "rejects.jsonl"}
    assert not build.exists()


def test_wrong_credentials_stop_the_pipeline_in_one_line_without_the_secret(s3, s3_shards):
    photos, _ = s3_shards
    env = s3.environ({**os.environ})
    env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret-" + "x" * 20
    run = subprocess.run([sys.executable, "-m", "data_pipeline", "--input", str(photos), "--output",
                          f"s3://{BUCKET}/elsewhere", "--resolution", "16"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert f"cannot write to output s3://{BUCKET}/elsewhere" in run.stderr
    assert env["AWS_SECRET_ACCESS_KEY"] not in run.stderr + run.stdout
    assert not (REPO / "s3:").exists()


def first_images(shards: str, rank: int, world_size: int, count: int) -> list:
    from data_pipeline.loader import FaceStream

    stream = FaceStream(shards, rank, world_size, seed=3, shuffle_buffer=8)
    return [image.numpy() for image in itertools.islice(iter(stream), count)]


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_face_stream_reads_the_same_images_from_the_bucket_as_from_a_local_copy(s3, s3_shards, tmp_path,
                                                                                rank, world_size):
    """Each worker streams its share straight from the bucket (no local copy of a shard); what it
    gets is exactly what the same shards give from a local folder."""
    import numpy as np

    _, url = s3_shards
    local = tmp_path / "shards"
    s3.filesystem().get(url.removeprefix("s3://") + "/", str(local), recursive=True)
    count = 40 * world_size  # more than one pass's share: the second pass reopens the shards
    remote_images, local_images = (first_images(source, rank, world_size, count) for source in (url, str(local)))
    assert len(remote_images) == count and remote_images[0].shape == (16, 16, 3)
    assert all(np.array_equal(a, b) for a, b in zip(remote_images, local_images))


def launch(cluster, *args: str, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "launch.py"), "--address", cluster.cluster.address, "--workers", "2",
               "--no-prometheus", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)


def read_events(s3, run_url: str) -> list[dict]:
    text = s3.filesystem().cat_file(run_url.removeprefix("s3://") + "/events.jsonl").decode()
    return [json.loads(line) for line in text.splitlines()]


def test_a_run_on_the_bucket_trains_then_resumes_from_it(s3, s3_shards, cluster, tmp_path):
    """launch.py --data s3://... --storage s3://...: the checkpoints (Ray Train's, through
    RunConfig(storage_path=s3://...)), config.yaml, events.jsonl, stats.jsonl and sample grids all
    land in the bucket and nothing in the local folder; --resume s3://.../NAME goes on from the
    bucket's last checkpoint to the (longer) end."""
    _, shards = s3_shards
    runs, run = f"s3://{BUCKET}/runs", f"s3://{BUCKET}/runs/tiny"
    first = launch(cluster, "--data", shards, "--storage", runs, "--run-name", "tiny",
                   *TINY_OVERRIDES, "schedule.total_kimg=0.384", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"[launch] final sample grid: {run}/samples/" in first.stdout
    objects = object_names(s3, run)
    checkpoints = sorted(name for name in objects if name.endswith("/checkpoint.pt"))
    assert checkpoints and all(name.startswith("checkpoint_") for name in checkpoints)
    assert {"config.yaml", "events.jsonl", "stats.jsonl"} <= set(objects)
    assert any(name.startswith("samples/res008_") and name.endswith(".png") for name in objects)
    events = read_events(s3, run)
    assert events[0]["event"] == "start"
    assert [e["kimg"] for e in events if e["event"] == "checkpoint"][-1] == pytest.approx(0.384)
    assert os.listdir(tmp_path) == []  # no local run folder, no `s3:` folder

    second = launch(cluster, "--resume", run, "--override-config", "schedule.total_kimg=0.64", cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    events = read_events(s3, run)
    resumes = [e for e in events if e["event"] == "resume"]
    assert resumes and resumes[-1]["kimg"] == pytest.approx(0.384)
    assert [e["kimg"] for e in events if e["event"] == "checkpoint"][-1] == pytest.approx(0.64)
    stats = [json.loads(line) for line in s3.filesystem().cat_file(run.removeprefix("s3://") + "/stats.jsonl")
             .decode().splitlines()]
    assert max(s["kimg"] for s in stats) == pytest.approx(0.64) and stats[-1]["resolution"] == 16
    assert any(name.startswith("samples/res016_") for name in object_names(s3, run))

    # a config whose networks do not fit the bucket's newest checkpoint: refused before Ray starts
    other = subprocess.run([sys.executable, str(REPO / "launch.py"), "--resume", run, "--override-config",
                            "model.latent_size=32"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {run}/checkpoint_")
    assert "model.latent_size is 16 there but 32 in the config" in other.stderr


def test_the_same_error_twice_stops_a_run_on_the_bucket(s3, s3_shards, cluster):
    """The repeated-error policy reads events.jsonl back from the bucket, where each failing rank
    logs its error, and the attempt after the repeat stops the run instead of spending all of
    cluster.max_failures. (Ray may kill a rank before it logs: the other rank's line suffices.)"""
    from conftest import tiny_config
    from faults import FaultInjection
    from cluster.local import TRAIN_SLOT
    from progan.training.train_loop import build_trainer

    _, shards = s3_shards
    run = f"s3://{BUCKET}/runs/same-error"
    cfg = tiny_config("cluster.max_failures=5", "cluster.min_workers=2")
    build_trainer(cfg, run, shards, workers=2, train_slot=TRAIN_SLOT,
                  extra_loop_config={"callback": FaultInjection(error_after_kimg=0.09)}).fit()
    events = read_events(s3, run)
    assert [e["event"] for e in events if e["event"] in ("start", "resume")] == ["start", "resume"]
    errors = [e for e in events if e["event"] == "worker_error"]
    assert len(errors) >= 2 and {e["rank"] for e in errors} <= {0, 1}
    assert {e["signature"] for e in errors} == {"ValueError: test hook: the same error on every attempt, at kimg #.#"}
    stopped = [e for e in events if e["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"].startswith("the same error in two attempts in a row")


def test_dataloader_processes_stream_from_the_bucket(s3, s3_shards):
    """data.loader_workers > 0: the shards are opened in forked DataLoader processes, each with its
    own S3 client (fsspec's clients do not survive a fork)."""
    from data_pipeline.loader import BatchReader, FaceStream

    _, url = s3_shards
    reader = BatchReader(FaceStream(url, 0, 1, seed=0, shuffle_buffer=8), mirror=False, seed=0, loader_workers=2)
    try:
        batches = [reader.next_batch(16, 8) for _ in range(6)]  # 96 images: past a pass of the shards
    finally:
        reader.close()
    assert all(batch.shape == (16, 3, 8, 8) and -1 <= batch.min() <= batch.max() <= 1 for batch in batches)


def test_appends_at_the_same_time_keep_every_line(s3):
    """Ranks logging at the same instant each put the object again with their line: a writer
    whose line another put dropped puts it again (a plain read-and-put kept 5 of 20 lines here)."""
    import threading

    from base import storage

    url = f"s3://{BUCKET}/appends/events.jsonl"

    def write_lines(writer: int) -> None:
        for line in range(5):
            storage.append_text(url, f"{writer}-{line}\n")

    threads = [threading.Thread(target=write_lines, args=(writer,)) for writer in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(storage.read_text(url).splitlines()) == sorted(f"{w}-{n}" for w in range(4) for n in range(5))
