"""How the face detector groups a work unit's photos into detect() calls, and that the detector
actor trims the C heap after each unit. Pure functions and stand-ins: no Ray, no MTCNN weights."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from data_pipeline import faces, runtime
from data_pipeline.faces import (
    CPU_BATCH_PIXELS, DETECT_BATCH, MAX_BATCH_PIXELS, FaceDetector, PhotoResult, batch_pixels, detect_in_size_groups,
    size_groups,
)
from data_pipeline.manifest import KEPT


def images(*sizes: tuple[int, int]) -> list[Image.Image]:
    return [Image.new("RGB", size) for size in sizes]


class RecordingDetector:
    """Stands in for MTCNN: records the sizes of the batches detect() gets, finds nothing."""

    def __init__(self, device: str):
        self.device, self.min_face_size, self.batches = device, 20, []

    def detect(self, batch, landmarks=True):
        self.batches.append([image.size for image in batch])
        return [None] * len(batch), [None] * len(batch), [None] * len(batch)


def test_the_cap_bounds_the_pixels_of_each_call_and_keeps_the_units_order():
    small, large = (100, 100), (300, 300)  # 10,000 and 90,000 pixels
    unit = images(small, large, small, large, small, large, small)
    assert size_groups(unit, 20) == [[0, 2, 4, 6], [1, 3, 5]]  # MAX_BATCH_PIXELS: by size alone
    assert size_groups(unit, 20, 200_000) == [[0, 2, 4, 6], [1, 3], [5]]
    assert size_groups(unit, 20, 30_000) == [[0, 2, 4], [6], [1], [3], [5]]
    assert size_groups(unit, 20, 1) == [[0], [2], [4], [6], [1], [3], [5]]  # each alone, never none
    assert size_groups(images((10, 300), small), 20, 1) == [[1]]  # below the smallest face: left out


def test_grouping_depends_only_on_the_images_and_the_device():
    unit = images(*[(418, 512)] * 5, *[(209, 256)] * DETECT_BATCH, (836, 1024), (418, 512))
    for device in ("cpu", "cuda"):
        first, second = RecordingDetector(device), RecordingDetector(device)
        detect_in_size_groups(first, unit)
        detect_in_size_groups(second, list(unit))
        assert first.batches == second.batches
        assert sorted(size for batch in first.batches for size in batch) == sorted(image.size for image in unit)


def test_a_cpu_detector_gets_batches_under_its_cap_and_a_gpu_one_whole_size_groups():
    assert batch_pixels("cpu") == CPU_BATCH_PIXELS < MAX_BATCH_PIXELS
    assert batch_pixels("cuda") == batch_pixels("cuda:1") == MAX_BATCH_PIXELS
    sizes = [(178, 218), (209, 256), (418, 512), (836, 1024)]
    unit = images(*[size for size in sizes for _ in range(DETECT_BATCH)])
    cpu, gpu = RecordingDetector("cpu"), RecordingDetector("cuda")
    detect_in_size_groups(cpu, unit)
    detect_in_size_groups(gpu, unit)
    assert [len(batch) for batch in gpu.batches] == [DETECT_BATCH] * len(sizes)
    expected = []
    for width, height in sizes:  # as many as the cap allows (at least one), the rest in the last
        step = max(1, CPU_BATCH_PIXELS // (width * height))
        expected += [min(step, DETECT_BATCH - start) for start in range(0, DETECT_BATCH, step)]
    assert [len(batch) for batch in cpu.batches] == expected
    assert all(len(batch) == 1 or len(batch) * batch[0][0] * batch[0][1] <= CPU_BATCH_PIXELS for batch in cpu.batches)
    assert [size for batch in cpu.batches for size in batch] == [image.size for image in unit]


def test_the_actor_checks_its_heap_after_each_unit(monkeypatch):
    checks, processed = [], []

    def process_sources(mtcnn, sources, settings):
        processed.append(list(sources))
        return [PhotoResult(name, f"key-{name}", KEPT) for name in sources]

    monkeypatch.setattr(faces, "process_sources", process_sources)
    actor = object.__new__(FaceDetector)  # without its MTCNN and metrics
    actor.trimmer = SimpleNamespace(check=lambda: checks.append(len(processed)) or False)
    actor.mtcnn, actor.settings = None, faces.FaceSettings()
    actor.metrics = SimpleNamespace(count=lambda status: None)
    batch = {"shard": np.array([3, 4]), "sources": np.array([["a.jpg", "b.jpg"], ["c.jpg", "d.jpg"]], dtype=object)}
    out = actor(batch)
    assert out["source"] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"] and out["shard"] == [3, 3, 4, 4]
    assert checks == [1, 2]  # after each unit


def test_the_heap_is_trimmed_first_then_only_past_the_slack(monkeypatch):
    """A process's resident size after each unit (MB); a trim brings it back to 800 MB."""
    resident = [900]
    trims = []

    def trim():
        trims.append(resident[0])
        resident[0] = 800
        return True

    monkeypatch.setattr(runtime, "release_freed_memory", trim)
    trimmer = runtime.HeapTrimmer(slack_bytes=512, resident_bytes=lambda: resident[0])
    after_units = []
    for grown_to in (900, 1200, 1312, 1313, 1000, 1400):
        resident[0] = grown_to
        after_units.append(trimmer.check())
    assert after_units == [True, False, False, True, False, True]
    assert trims == [900, 1313, 1400] and trimmer.trims == 3  # at most the slack above 800 MB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_freed_memory_trims_where_libc_has_malloc_trim_and_is_a_no_op_elsewhere(monkeypatch):
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert runtime.release_freed_memory() is True
    runtime._malloc_trim.cache_clear()
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: SimpleNamespace())  # a libc without it
    try:
        assert runtime.release_freed_memory() is False
    finally:
        runtime._malloc_trim.cache_clear()
