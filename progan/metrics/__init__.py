"""Image-quality metrics of generated images against real ones: functions of image tensors that
know nothing of checkpoints or command lines, so that training can call them too.

- `progan.metrics.swd`: the paper's multi-scale sliced Wasserstein distance.
- `progan.metrics.fid`: Frechet Inception distance (torch-fidelity's InceptionV3).
"""
