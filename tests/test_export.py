"""python -m progan.export: TorchScript and ONNX generators that load without this project (a
`python -I` in a folder of its own, where `import progan` fails) and draw what the live
generator draws for the same latents."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from checkpoints import make_checkpoint
from progan.export import main
from progan.model.samples import fixed_latents
from progan.model.trained import load_trained_generator

# Runs in a bare interpreter: only torch / onnxruntime / numpy, nothing of this repository.
LOADER = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np
    assert importlib.util.find_spec("progan") is None, "the project is importable here"
    fmt, model, latents, out = sys.argv[1:]
    z = np.load(latents)
    if fmt == "torchscript":
        import torch
        files = {"meta.json": ""}
        g = torch.jit.load(model, map_location="cpu", _extra_files=files)
        meta = json.loads(files["meta.json"])
        with torch.no_grad():
            images = g(torch.from_numpy(z)).numpy()
    else:
        import onnxruntime
        session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
        meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
        images = session.run(None, {"z": z})[0]
    np.save(out, images)
    print(json.dumps(meta))
""")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run at 16x16 in the middle of its fade-in (alpha 0.5)."""
    return make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint_000001", resolution=16, alpha=0.5)


def run_outside_project(tmp_path, fmt: str, model, latents: np.ndarray) -> tuple[np.ndarray, dict]:
    """Loads and runs the export in `python -I` (no PYTHONPATH, no script or working folder on
    sys.path) with tmp_path as its working folder."""
    (tmp_path / "load.py").write_text(LOADER)
    np.save(tmp_path / "z.npy", latents)
    done = subprocess.run([sys.executable, "-I", "load.py", fmt, str(model), "z.npy", "images.npy"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return np.load(tmp_path / "images.npy"), json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt, resolution, raw", [("torchscript", None, False), ("onnx", None, False),
                                                  ("torchscript", 8, True), ("onnx", 4, True)])
def test_export_loads_alone_and_matches_the_live_generator(fmt, resolution, raw, checkpoint, tmp_path, capsys):
    out = tmp_path / ("g.pt" if fmt == "torchscript" else "g.onnx")
    argv = ["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)]
    argv += (["--resolution", str(resolution)] if resolution else []) + (["--raw"] if raw else [])
    assert main(argv) == 0, capsys.readouterr().err
    assert "max difference" in capsys.readouterr().out

    latents = fixed_latents(5, 16, seed=7)  # a batch size other than the one traced with (2)
    images, meta = run_outside_project(tmp_path, fmt, out, latents.numpy())
    trained = load_trained_generator(checkpoint, raw=raw)
    res = resolution or 16
    expected = trained.generate(latents, res).clamp(-1, 1).numpy()
    assert images.shape == (5, 3, res, res)
    np.testing.assert_allclose(images, expected, atol=1e-4, rtol=0)
    assert images.min() >= -1 and images.max() <= 1
    assert meta["latent_size"] == 16 and meta["resolution"] == res and meta["channels"] == 3
    assert meta["output_range"] == [-1.0, 1.0] and meta["layout"] == "NCHW"
    assert meta["alpha"] == (0.5 if res == 16 else 1.0)
    assert meta["weights"] == ("raw" if raw else "ema")


def test_export_mistakes_give_one_line_and_exit_2(checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for argv in (["--resolution", "32", "--out", str(tmp_path / "g.pt")],
                 ["--out", str(tmp_path / "file" / "g.pt")],
                 ["--out", str(tmp_path)]):
        assert main(["--checkpoint", str(checkpoint), "--format", "torchscript", *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("python -m progan.export: error:"), err
    assert main(["--checkpoint", str(tmp_path / "none"), "--format", "onnx", "--out", str(tmp_path / "g.onnx")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not list(tmp_path.glob("g.*"))


def test_export_never_replaces_a_file_unasked_nor_the_checkpoint_it_reads(checkpoint, tmp_path, capsys):
    """Issue 25: --out overwrote anything, the checkpoint being read included."""
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"the user's own file")
    base = ["--checkpoint", str(checkpoint), "--format", "torchscript"]
    assert main([*base, "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "already exists" in err and "--overwrite" in err, err
    assert mine.read_bytes() == b"the user's own file"

    link = tmp_path / "link.pt"
    (tmp_path / "hard.pt").hardlink_to(checkpoint)
    link.symlink_to(checkpoint)
    before = checkpoint.read_bytes() if checkpoint.is_file() else (checkpoint / "checkpoint.pt").read_bytes()
    ckpt_file = checkpoint if checkpoint.is_file() else checkpoint / "checkpoint.pt"
    for out in (ckpt_file, link, tmp_path / "hard.pt", ckpt_file.parent / ".." / ckpt_file.parent.name / ckpt_file.name):
        assert main([*base, "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "is the checkpoint being exported" in err, err
    assert ckpt_file.read_bytes() == before

    assert main([*base, "--out", str(mine), "--overwrite"]) == 0, capsys.readouterr().err
    assert mine.read_bytes() != b"the user's own file" and mine.stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_export_leaves_no_partial_file_and_the_old_one_whole(checkpoint, tmp_path, capsys, monkeypatch):
    """Issue 25: on a full disk the export left 0-byte files (and a C++ stack)."""
    import torch

    def full_disk(module, path, _extra_files=None):
        with open(path, "wb") as file:
            file.write(b"\0" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
                           "file write failed\nframe #0: c10::Error::Error(...)")

    monkeypatch.setattr(torch.jit, "save", full_disk)
    base = ["--checkpoint", str(checkpoint), "--format", "torchscript"]
    assert main([*base, "--out", str(tmp_path / "new.pt")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot write" in err and "PytorchStreamWriter" in err, err
    old = tmp_path / "old.pt"
    old.write_bytes(b"old export")
    assert main([*base, "--out", str(old), "--overwrite"]) == 2
    capsys.readouterr()
    assert old.read_bytes() == b"old export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt"]
