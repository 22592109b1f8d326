"""The benchmarks' JSON lines as one short table: `python -m bench.table FILE [FILE ...]` (or stdin).

Lines that are not JSON objects from a benchmark (Ray's and the pipeline's own output) are skipped.
"""
from __future__ import annotations

import argparse
import json
import sys


def _pct(fraction) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


NETS = {(1024, 512, 8192, 512): "paper", (32, 128, 512, 128): "demo"}  # configs/paper_celeba, demo.yaml


def _nets(r: dict) -> str:
    widths = (r["max_resolution"], r["latent_size"], r["fmap_base"], r["fmap_max"])
    return NETS.get(widths, "max_resolution {}, latent {}, fmap_base {}, fmap_max {}".format(*widths))


def train_step(r: dict) -> tuple[str, str]:
    what = f"train step {r['resolution']}x{r['resolution']}, batch {r['batch']}, {_nets(r)} nets, {r['device']}"
    return what, (f"{r['img_per_s']} img/s, {r['step_s'] * 1e3:.0f} ms/step, {r['gflop_per_s']} GFLOP/s "
                  f"= {_pct(r['fraction_of_peak'])} of {r['peak_gflop_per_s']} measured peak")


def loader(r: dict) -> tuple[str, str]:
    what = f"loader {r['resolution']}x{r['resolution']}, batch {r['batch']}, {r['loader_workers']} workers"
    return what, (f"{r['loader_images_per_s']} img/s = {r['loader_ms_per_batch']} ms/batch; CPU train step "
                  f"{r['train_step_ms']:.0f} ms ({r['ratio']}x fed); {r['gpu_step_ms_reference']:.0f} ms GPU "
                  f"step (reference, not measured): {r['gpu_steps_fed']}x fed")


def mtcnn(r: dict) -> tuple[str, str]:
    what = f"MTCNN, {r['photos']} photos, {r['threads']} thread"
    return what, (f"plain {r['plain_images_per_s']} img/s; batched {r['batched_speedup']}x, "
                  f"+channels-last {r['batched_channels_last_speedup']}x, +pyramid 0.6 {r['pipeline_speedup']}x "
                  f"({r['pipeline_images_per_s']} img/s, decisions agree {_pct(r['pipeline_agreement'])})")


def metrics_overhead(r: dict) -> tuple[str, str]:
    what = f"metrics per step, {r['resolution']}x{r['resolution']} batch {r['batch']}"
    return what, (f"{r['metrics_us']:.0f} us per step = {100 * r['overhead']:.3f}% of a {r['step_s'] * 1e3:.0f} ms "
                  f"CPU step, {100 * r['overhead_of_gpu_step']:.2f}% of a {r['gpu_step_ms_reference']:.0f} ms GPU "
                  f"step (reference, not measured)")


ROWS = {"train_step": train_step, "loader": loader, "mtcnn": mtcnn, "metrics_overhead": metrics_overhead}


def results(lines) -> list[dict]:
    found = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("bench") in ROWS:
            found.append(record)
    return found


def table(records: list[dict]) -> str:
    rows = [ROWS[r["bench"]](r) for r in records]
    width = max((len(what) for what, _ in rows), default=0)
    return "\n".join(f"{what:<{width}}  {figures}" for what, figures in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="files of JSON lines (default: stdin)")
    args = parser.parse_args(argv)
    lines = [line for name in args.files for line in open(name)] if args.files else sys.stdin
    print(table(results(lines)))


if __name__ == "__main__":
    main()
