"""What one `python -m data_pipeline` run is asked to do, checked before anything starts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from base.errors import UserError

IMAGE_FORMATS = ("png", "jpg")


@dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...]
    output: str
    resolution: int = 128
    shard_size: int = 1000  # at most this many faces per shard
    image_format: str = "png"
    min_prob: float = 0.95
    margin: float = 0.4
    overwrite: bool = False
    run_name: str = ""  # labels the pipeline's metrics; "" means the output folder's name
    # sources.inputs_fingerprint of the listed inputs (None: not listed yet), compared on a rerun
    inputs_fingerprint: dict | None = None

    def __post_init__(self):
        if not self.run_name:
            object.__setattr__(self, "run_name", Path(self.output).resolve().name)
        if not self.inputs:
            raise UserError("give at least one --input")
        if not 4 <= self.resolution <= 1024 or self.resolution & (self.resolution - 1):
            raise UserError(f"--resolution must be a power of two from 4 to 1024, not {self.resolution}")
        if self.shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, not {self.shard_size}")
        if self.image_format not in IMAGE_FORMATS:
            raise UserError(f"--format must be one of {', '.join(IMAGE_FORMATS)}, not {self.image_format}")
        if not 0 < self.min_prob <= 1:
            raise UserError(f"--min-prob must be in (0, 1], not {self.min_prob}")
        if not 0 <= self.margin <= 4:
            raise UserError(f"--margin must be from 0 to 4, not {self.margin}")
