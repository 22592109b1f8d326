"""Frechet Inception distance (FID) with torch-fidelity's InceptionV3: the TensorFlow 2015-12-05
Inception graph that the FID authors' code (bioinf-jku/TTUR) uses, converted to PyTorch, with
TensorFlow-1.x-exact bilinear resizing to 299x299. Its 2048 pool features of both image sets give
a mean and a covariance each; FID = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), computed
by torch-fidelity's own functions.

Nothing is downloaded: the weights file is named by the caller.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from base.errors import UserError

INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
FEATURE_LAYER = "2048"      # the pool features FID is defined on
PAPER_NUM_IMAGES = 50000    # the paper's FID (and the official 'metric-fid-50k')
INCEPTION_BATCH = 64        # images through InceptionV3 at once: its 299x299 activations bound the memory


class InceptionWeightsError(UserError):
    """Missing or unusable Inception weights; str() is one line saying what to get and where."""


def _weights_hint() -> str:
    return f"FID needs {INCEPTION_WEIGHTS_FILE} (torch-fidelity's InceptionV3), from {INCEPTION_WEIGHTS_URL}"


def load_inception(weights_path: str | Path | None, device: str | torch.device = "cpu") -> FeatureExtractorInceptionV3:
    """torch-fidelity's InceptionV3 feature extractor with the weights in `weights_path`, in eval
    mode on `device`. The file is first read with `weights_only=True`, so a file that could run code
    when unpickled is refused before torch-fidelity (which loads it without that guard) sees it."""
    if weights_path is None:
        raise InceptionWeightsError(f"{_weights_hint()}; pass it with --inception-weights PATH")
    path = Path(weights_path)
    if not path.is_file():
        raise InceptionWeightsError(f"Inception weights {path}: no such file; {_weights_hint()}")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InceptionWeightsError(f"Inception weights {path}: unreadable ({type(exc).__name__}); "
                                    f"{_weights_hint()}") from None
    try:
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE_LAYER],
                                                feature_extractor_weights_path=str(path))
    except RuntimeError as exc:  # load_state_dict: other keys or shapes
        raise InceptionWeightsError(f"Inception weights {path}: not torch-fidelity's InceptionV3 "
                                    f"({str(exc).splitlines()[0][:100]}); {_weights_hint()}") from None
    return extractor.to(device)


@torch.no_grad()
def inception_features(extractor: FeatureExtractorInceptionV3, images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW RGB images (any size; resized to 299x299 inside) -> (N, 2048) float32 on the CPU."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 NCHW RGB images, got {images.dtype} {tuple(images.shape)}")
    device = next(extractor.parameters()).device
    return torch.cat([extractor(part.to(device))[0].cpu() for part in images.split(INCEPTION_BATCH)])


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two sets of (N, 2048) Inception features (float64 statistics)."""
    if features_a.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sets of different shapes: {tuple(features_a.shape)} and {tuple(features_b.shape)}")
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError("FID needs at least 2 images per set (a covariance)")
    stats_a = fid_features_to_statistics(features_a.double())
    stats_b = fid_features_to_statistics(features_b.double())
    return float(fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID])
