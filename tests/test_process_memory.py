"""base.process_memory.TreeMemory on real processes: a parent whose child holds 200 MB."""
from __future__ import annotations

import subprocess
import sys
import time

from base.process_memory import TreeMemory

# The parent starts a child that fills 200 MB (touched, so resident), holds it for 1.5 s and ends;
# then the parent itself fills 120 MB and holds it.
SCRIPT = """
import subprocess, sys, time
subprocess.run([sys.executable, "-c", "import time; b = bytearray(200 * 2**20); time.sleep(1.5)"], check=True)
held = bytearray(120 * 2**20)
time.sleep(1.0)
"""


def test_peaks_of_a_tree_hold_the_child_and_the_root():
    process = subprocess.Popen([sys.executable, "-c", SCRIPT])
    with TreeMemory(process.pid, interval_s=0.1) as memory:
        assert process.wait(timeout=60) == 0
    peaks = memory.peaks
    assert memory.samples >= 10, memory.samples
    assert peaks["processes"] == 2, peaks
    assert peaks["tree_pss_mb"] >= 200 and peaks["tree_rss_mb"] >= 200, peaks  # the child's bytes count
    assert 120 <= peaks["root_private_mb"] < 200, peaks  # the root's own heap, not the child's
    assert peaks["root_rss_mb"] >= peaks["root_private_mb"], peaks


def test_record_sees_every_sample_and_an_ended_root_stops_sampling():
    seen = []

    class Recording(TreeMemory):
        def record(self, readings):
            seen.append([reading.is_root for reading in readings])

    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)"])
    with Recording(process.pid, interval_s=0.05) as memory:
        process.wait(timeout=60)
        process_ended_samples = memory.samples
        time.sleep(0.3)  # six more intervals with the root gone
    assert seen and len(seen) == memory.samples
    assert all(flags == [True] for flags in seen)  # the root alone, flagged as the root
    assert memory.samples <= process_ended_samples + 1  # a reaped root gives no readings
