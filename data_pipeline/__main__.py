"""python -m data_pipeline: face photos -> WebDataset shards of square face crops.

    python -m data_pipeline --input PATH [--input PATH ...] --output DIR --resolution 128
        [--shard-size N] [--nodes N | --address ADDR] [--overwrite] [--format png|jpg]
        [--min-prob 0.95] [--margin 0.4] [--run-name NAME] [--quiet]

PATH: a folder (searched recursively for .jpg .jpeg .png .webp .bmp), a glob, or a .zip/.tar of
photos. DIR may be an object-store URL (s3://bucket/prefix; credentials and endpoint from the
standard AWS_* variables): the output is built in a local work folder ($DATA_PIPELINE_WORK_DIR,
default ~/.cache/progan-data-pipeline) and uploaded when complete, manifest.json last. Arguments,
inputs and the output folder are checked before Ray starts: a mistake costs one line on stderr
and exit code 2. An output with a complete manifest.json is left alone unless
--overwrite, and refused (exit code 2) if it was made at another --resolution, --format,
--shard-size, --min-prob, --margin or inputs (names, sizes, times); an interrupted run (Ctrl-C: one line,
exit code 130) is resumed by running the same command again, after the blocks it finished. The pipeline removes or replaces only its own output (what its
manifest or its plan in .partial/ names): any other file in DIR stops it in one line, unless
--overwrite (which replaces the pipeline's names, manifest.json, rejects.jsonl, shard-NNNNNN.tar and
.partial/, and leaves other files alone). Photos read and their outcomes go to Prometheus through Ray's metrics export, labelled
run=NAME (monitoring/).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

from cluster.local import keep_ray_on_loopback
from data_pipeline.config import IMAGE_FORMATS, PrepareConfig
from base import storage
from base.errors import OneLineParser, UserError, run_cli
from data_pipeline.manifest import check_same_settings, ensure_writable_folder, old_shards_note, read_manifest
from data_pipeline.shards import check_own_output, check_own_remote_output
from data_pipeline.sources import check_inputs_exist, inputs_fingerprint, list_sources

PROG = "python -m data_pipeline"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description="Face photos -> WebDataset shards of square face crops.")
    parser.add_argument("--input", action="append", required=True, metavar="PATH",
                        help="folder (recursive), glob, or .zip/.tar of photos; repeatable")
    parser.add_argument("--output", required=True, metavar="DIR", help="a folder, or s3://bucket/prefix")
    parser.add_argument("--resolution", type=int, default=128, help="crop size, a power of two (4..1024)")
    parser.add_argument("--shard-size", type=int, default=1000, metavar="N", help="at most N faces per shard")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--nodes", type=int, metavar="N", help="start a local N-node Ray cluster")
    where.add_argument("--address", metavar="ADDR", help="join a running Ray cluster ('auto' to find it)")
    parser.add_argument("--overwrite", action="store_true", help="redo a complete output")
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="png", dest="image_format")
    parser.add_argument("--min-prob", type=float, default=0.95, help="keep faces detected at least this sure")
    parser.add_argument("--margin", type=float, default=0.4, help="square side = face box side * (1 + margin)")
    parser.add_argument("--run-name", default="", metavar="NAME",
                        help="the `run` label of the pipeline's Prometheus metrics (default: the output folder's name)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.nodes is not None and args.nodes < 1:
        raise UserError(f"--nodes must be at least 1, not {args.nodes}")
    config = PrepareConfig(tuple(args.input), args.output, args.resolution, args.shard_size,
                           args.image_format, args.min_prob, args.margin, args.overwrite, args.run_name)
    check_inputs_exist(list(config.inputs))
    ensure_writable_folder(config.output)
    sources = list_sources(list(config.inputs))  # names and sizes only; compared with a finished output's
    config = dataclasses.replace(config, inputs_fingerprint=inputs_fingerprint(sources))
    finished = None if config.overwrite else read_manifest(config.output)
    if finished is not None:
        check_same_settings(finished, config, config.output)  # other settings: refused, not "done"
        print(f"{config.output} is already complete ({finished['counts']['faces_kept']} faces in "
              f"{len(finished['shards'])} shards): nothing to do (--overwrite redoes it)")
        if note := old_shards_note(config.output, finished):
            print(note, file=sys.stderr)
        return 0
    if not config.overwrite:  # before Ray starts: the pipeline writes only among its own files
        if storage.is_remote(config.output):
            check_own_remote_output(config.output)
        else:
            check_own_output(Path(config.output))
    started = time.monotonic()
    keep_ray_on_loopback(args.address)  # before Ray is first imported, just below
    from data_pipeline.prepare import prepare  # torch and Ray load only once the arguments are good
    from data_pipeline.runtime import ray_session

    with QuietStop(progress_shown=not args.quiet), ray_session(args.address, args.nodes):
        manifest = prepare(config, sources, show_progress=not args.quiet)
    print(summary_line(manifest, config.output, time.monotonic() - started))
    return 0


class QuietStop:
    """Ctrl-C while Ray runs ends in the one line run_cli prints, and nothing else. A terminal's
    Ctrl-C sends SIGINT to every process of the command, but Ray's own processes block it, so it
    is this driver's to stop them. On the first SIGINT this handler (in the main thread, before
    anything unwinds) ignores any further one, so that a second Ctrl-C cannot cut the nodes'
    shutdown short and leave them running, and sends this process's stdout and stderr to
    /dev/null until Ray is down: stopping the pipeline's tasks, Ray reports each task it
    cancels ('(raylet) Task ... submit failed ...'), none of which the user can act on. The
    finished shards stay: the same command resumes after them. A SIGINT the caller ignores
    (a background job of a script) stays ignored."""

    def __init__(self, progress_shown: bool):
        self.progress_shown = progress_shown  # a progress bar's line may be open on stderr
        self.previous = None
        self.saved: list[int] = []  # the real stdout and stderr while muted

    def __enter__(self) -> QuietStop:
        self.previous = signal.getsignal(signal.SIGINT)
        if self.previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, self.interrupt)
        return self

    def interrupt(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()
        if self.progress_shown:
            os.write(2, b"\n")  # the bar stays as last drawn; the one line goes below it
        self.saved = [os.dup(1), os.dup(2)]
        muted = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(muted, fd)
        os.close(muted)
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.saved:  # interrupted: Ray is down now; SIGINT stays ignored until the process ends
            sys.stdout.flush()  # what was written while muted goes where it was meant to: nowhere
            sys.stderr.flush()
            for fd, saved in zip((1, 2), self.saved):
                os.dup2(saved, fd)
                os.close(saved)
            self.saved = []
        elif self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: run(parse_args(argv)), interrupted="interrupted; run the same command again to resume")


def summary_line(manifest: dict, output: str, seconds: float) -> str:
    counts = manifest["counts"]
    rejects = ", ".join(f"{name} {n}" for name, n in counts.items() if name not in ("files_seen", "faces_kept") and n)
    return (f"kept {counts['faces_kept']} faces of {counts['files_seen']} files ({rejects or 'no rejects'}); "
            f"{len(manifest['shards'])} shards at {manifest['resolution']}px in {output} ({seconds:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
