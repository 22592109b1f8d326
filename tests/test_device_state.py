"""GPU paths of the training loop that this CPU-only machine can check by construction: the
process group's backends and the CUDA generator state in checkpoints (torch.cuda's state
functions stubbed; the loop only chooses when to call them)."""
import torch

from progan.model.checkpoint import load_checkpoint, save_checkpoint
from progan.training.run_state import restore_rng, rng_state
from progan.training.process_group import process_group_backend


def test_gpu_process_group_serves_cpu_and_cuda_collectives():
    assert process_group_backend(use_gpu=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(use_gpu=False) == "gloo"


def test_cuda_rng_state_is_saved_and_restored_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.arange(4, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", state.tolist(), device)))
    gpu = torch.device("cuda", 1)
    assert rng_state(torch.device("cpu"))[1] is None and calls == []
    assert rng_state(gpu)[1].tolist() == [0, 1, 2, 3] and calls == [("get", gpu)]
    cpu = [torch.get_rng_state()] * 2
    state = {"rng_states": cpu, "cuda_rng_states": [torch.tensor([7], dtype=torch.uint8), torch.tensor([9], dtype=torch.uint8)]}
    assert restore_rng(state, 1, 2, gpu)
    assert calls[-1] == ("set", [9], gpu)
    calls.clear()
    assert restore_rng(state, 1, 2, torch.device("cpu"))                         # CPU training: no CUDA state
    assert restore_rng({"rng_states": cpu}, 0, 2, gpu)                            # a checkpoint from before this state
    assert restore_rng({"rng_states": cpu, "cuda_rng_states": [None, None]}, 0, 2, gpu)  # a checkpoint of CPU training
    assert not restore_rng(state, 0, 3, gpu)                                      # another world size: seeded afresh
    assert calls == []


def test_checkpoint_holds_cuda_rng_states(tmp_path):
    """They load with the checkpoint's safe (weights_only) loader, None entries included."""
    states = [torch.tensor([1, 2], dtype=torch.uint8), None]
    save_checkpoint({"cuda_rng_states": states}, tmp_path)
    loaded = load_checkpoint(tmp_path)["cuda_rng_states"]
    assert loaded[0].tolist() == [1, 2] and loaded[1] is None
