"""A trained generator as one standalone file: python -m progan.export

    python -m progan.export --checkpoint CKPT --format torchscript --out generator.pt [--resolution R] [--raw]
    python -m progan.export --checkpoint CKPT --format onnx --out generator.onnx [--resolution R] [--raw]

The file maps latents z (float32, [N, latent_size], drawn from N(0, I)) to images (float32,
[N, channels, R, R], NCHW, RGB, clamped to [-1, 1]; uint8 pixels are round((x + 1) * 127.5)).
One resolution (default: the checkpoint's) and its fade-in alpha are baked in, and only the
layers up to that resolution are kept. The batch size is free. The EMA weights by default
(--raw: the trained G's). Loading it needs torch (TorchScript) or onnxruntime (ONNX), not this
project:

    g = torch.jit.load("generator.pt", _extra_files={"meta.json": ""})       # meta: the dict below
    s = onnxruntime.InferenceSession("generator.onnx")                       # input "z", output "images"
    meta = s.get_modelmeta().custom_metadata_map                             # values are JSON text

Metadata (TorchScript: the extra file meta.json; ONNX: metadata_props, one JSON-encoded value
per key): latent_size, resolution, alpha, channels, output_range, layout, weights (ema or raw),
images_seen, checkpoint, input, output.

The file is written under a temporary name beside --out, loaded back and checked there, and only
then renamed to --out, so an interrupted or failed export (a full disk) leaves no partial file and
an earlier file whole. An existing --out is replaced only with --overwrite, and never when it is
the checkpoint being read (compared as resolved files, links and hard links included).

After writing, the file is loaded back (torch.jit.load or onnxruntime) and its images are compared
with the live generator's for the same latents; a mismatch is an error. Mistakes give one line on
stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from base.errors import OneLineParser, UserError, run_cli
from base.storage import atomic_path
from progan.generate import check_output_file, seeded_latents
from progan.model.layers import LeakyReLU
from progan.model.networks import Generator
from progan.model.trained import TrainedGenerator, add_generator_args, load_trained_generator

PROG = "python -m progan.export"
FORMATS = ("torchscript", "onnx")
META_FILE = "meta.json"   # the TorchScript extra file holding the metadata
CHECK_LATENTS = 8         # latents the written file and the live generator are compared on
CHECK_ATOL = 1e-4         # on images in [-1, 1]


class StandaloneGenerator(nn.Module):
    """z [N, latent_size] -> images [N, C, R, R] in [-1, 1], with one resolution and alpha fixed."""

    def __init__(self, generator: Generator, resolution: int, alpha: float):
        super().__init__()
        self.generator = generator
        self.resolution = resolution
        self.alpha = alpha

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z, self.resolution, self.alpha).clamp(-1.0, 1.0)


def stage_generator(trained: TrainedGenerator, resolution: int) -> StandaloneGenerator:
    """The layers up to `resolution` (a Generator built for that maximum: the same shapes, as the
    feature counts depend on fmap_base/fmap_max only), on the CPU, in eval mode."""
    trained.check_resolution(resolution)
    m = trained.config.model
    G = Generator(resolution, m.latent_size, m.fmap_base, m.fmap_max, m.num_channels)
    wanted = G.state_dict().keys()
    G.load_state_dict({k: v.cpu() for k, v in trained.generator.state_dict().items() if k in wanted})
    use_plain_layers(G)
    return StandaloneGenerator(G.eval().requires_grad_(False), resolution, trained.alpha_at(resolution))


def use_plain_layers(module: nn.Module) -> None:
    """Swaps the training-speed layers for their textbook equals, which trace and export to
    standard operators: nn.LeakyReLU for the project's LeakyReLU."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, LeakyReLU):
                setattr(parent, name, nn.LeakyReLU(child.negative_slope))


def export_metadata(trained: TrainedGenerator, resolution: int, raw: bool) -> dict:
    m = trained.config.model
    return {
        "latent_size": m.latent_size, "resolution": resolution, "alpha": trained.alpha_at(resolution),
        "channels": m.num_channels, "output_range": [-1.0, 1.0], "layout": "NCHW",
        "weights": "raw" if raw else "ema", "images_seen": trained.images_seen, "checkpoint": str(trained.path),
        "input": f"z: float32 [N, {m.latent_size}] from N(0, I)",
        "output": f"images: float32 [N, {m.num_channels}, {resolution}, {resolution}] clamped to [-1, 1]; "
                  "uint8 = round((x + 1) * 127.5)",
        "producer": PROG,
    }


def save_torchscript(model: StandaloneGenerator, meta: dict, path: Path) -> None:
    example = seeded_latents(2, meta["latent_size"], seed=0)
    with warnings.catch_warnings():  # TorchScript's deprecation notice is not the user's concern here
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        try:
            torch.jit.save(traced, str(path), _extra_files={META_FILE: json.dumps(meta)})
        except RuntimeError as exc:  # the C++ writer's failure (a full disk): its first line, as an OSError
            raise OSError(str(exc).strip().splitlines()[0] if str(exc).strip() else "write failed") from None


def load_torchscript_output(path: Path, latents: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(latents).numpy()


def save_onnx(model: StandaloneGenerator, meta: dict, path: Path) -> None:
    import onnx

    example = seeded_latents(2, meta["latent_size"], seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), input_names=["z"], output_names=["images"],
                                    dynamic_shapes={"z": {0: torch.export.Dim("batch")}}, dynamo=True,
                                    verbose=False)
    proto = program.model_proto
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def load_onnx_output(path: Path, latents: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["images"], {"z": latents.numpy()})[0]


SAVERS = {"torchscript": save_torchscript, "onnx": save_onnx}
LOADERS = {"torchscript": load_torchscript_output, "onnx": load_onnx_output}


def check_export(fmt: str, trained: TrainedGenerator, meta: dict, path: Path) -> float:
    """Largest difference between the written file's images and the live generator's (the
    checkpoint's, with its training layers) on fixed latents."""
    latents = seeded_latents(CHECK_LATENTS, meta["latent_size"], seed=1)
    expected = trained.generate(latents, meta["resolution"]).clamp(-1, 1).cpu().numpy()
    got = LOADERS[fmt](path, latents)
    if got.shape != expected.shape:
        raise RuntimeError(f"{path}: the export gives images of shape {got.shape}, the generator {expected.shape}")
    return float(np.abs(got - expected).max())


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description="A checkpoint's generator as a standalone TorchScript or ONNX file.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generator_args(p, "--checkpoint")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, type=Path, help="the file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (never the checkpoint read)")
    add_generator_args(p, "--resolution", "--raw")
    return p.parse_args(argv)


def export(args: argparse.Namespace) -> tuple[dict, float]:
    trained = load_trained_generator(args.checkpoint, raw=args.raw, device="cpu")
    resolution = args.resolution or trained.resolution
    model = stage_generator(trained, resolution)
    check_output_file(args.out)
    check_not_replacing(args.out, trained.path, args.overwrite)
    meta = export_metadata(trained, resolution, args.raw)
    try:
        with atomic_path(args.out) as temporary:
            SAVERS[args.format](model, meta, temporary)
            difference = check_export(args.format, trained, meta, temporary)
    except OSError as exc:
        raise UserError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    return meta, difference


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (resolved links, or one inode: a hard link)."""
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def check_not_replacing(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """UserError when --out is the checkpoint being read (even with --overwrite), or an existing
    file without --overwrite."""
    if same_file(out, checkpoint):
        raise UserError(f"--out {out}: is the checkpoint being exported ({checkpoint}); give another file name")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"--out {out}: already exists; --overwrite replaces it, or give another file name")


def export_and_report(args: argparse.Namespace) -> int:
    meta, difference = export(args)
    if difference > CHECK_ATOL:
        print(f"{PROG}: error: {args.out} gives images up to {difference:.2g} away from the generator's "
              f"(allowed {CHECK_ATOL:g}); the export is wrong", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {args.format}, z [N, {meta['latent_size']}] -> images "
          f"[N, {meta['channels']}, {meta['resolution']}, {meta['resolution']}] in [-1, 1], alpha {meta['alpha']:g}, "
          f"{meta['weights']} weights; reloaded, max difference {difference:.1e}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: export_and_report(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
