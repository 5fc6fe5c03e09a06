"""The CUDA path of the encoder (runs only where onnxruntime-gpu really has a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from models.errors import ConfigError
from models.runtime import OnnxEncoder


def _cuda_encoder():
    try:
        return OnnxEncoder(device="cuda")
    except ConfigError as exc:  # onnxruntime without CUDA, or CUDA listed but falling back to CPU
        pytest.skip(f"no usable CUDA provider: {exc}")


@pytest.mark.gpu
def test_cuda_embeddings_match_cpu():
    gpu = _cuda_encoder()
    assert gpu.providers[0] == "CUDAExecutionProvider"
    cpu = OnnxEncoder(device="cpu")
    batch = np.random.default_rng(0).random((8, *cpu.input_shape), dtype=np.float32)
    assert np.allclose(gpu.embed(batch), cpu.embed(batch), atol=1e-3)


def test_asking_for_cuda_without_it_is_a_clear_error():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this runtime lists CUDA")
    with pytest.raises(ConfigError, match="CUDA"):
        OnnxEncoder(device="cuda")
    assert OnnxEncoder(device="auto").providers == ["CPUExecutionProvider"]


@pytest.mark.gpu
def test_training_step_on_cuda(tmp_path):
    """`cbmir train --device cuda`: a few optimiser steps on the GPU lower the loss and checkpoint."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA GPU")
    from tests.test_models_train import make_trainer

    trainer = make_trainer(tmp_path, epochs=3, device="cuda")
    assert next(trainer.model.parameters()).is_cuda
    assert trainer.fit()
    losses = [h["train_loss"] for h in trainer.history]
    assert losses[-1] < losses[0]
    assert (tmp_path / "best.pt").exists()
