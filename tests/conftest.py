import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FACES = REPO.parent / "shared" / "faces"


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    if not (FACES / "aligned").is_dir():
        pytest.fail(f"{FACES} is missing: the tests need ../shared/faces beside the repo")
    return FACES


# Keep every Ray node a test starts on loopback (ray-2.60-facts.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
