"""Serving-side encoder: one onnxruntime session, no torch.

A model is ``<name>.onnx`` plus two sidecars beside it: ``<name>.card.json`` (model card) and
``<name>.preprocess.json`` (:class:`~models.preprocess.PreprocessContract`). The input is named
``image``, float32 ``(N, 1, S, S)`` with a dynamic batch axis; the output ``embedding`` is float32
``(N, dim)``. ``models/weights/default.json`` names the model the workers load by default.

Typical use::

    enc = OnnxEncoder()                       # default model, CUDA if usable, else CPU
    x = np.stack([to_model_input(img, enc.contract) for img in images])
    vectors = enc.embed(x)                    # (N, enc.dim) float32
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ConfigError, InvalidInput, NotFound
from models.preprocess import PreprocessContract

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_POINTER = WEIGHTS_DIR / "default.json"
INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
DEVICES = ("auto", "cpu", "cuda")


class ModelNotFound(NotFound):
    """The ONNX model or one of its sidecars is missing or unreadable."""

    reason = "model-not-found"


def sidecar_paths(model_path: str | Path) -> tuple[Path, Path]:
    """``(card_path, preprocess_path)`` beside ``<name>.onnx``."""
    path = Path(model_path)
    stem = path.name.removesuffix(".onnx")
    return path.with_name(f"{stem}.card.json"), path.with_name(f"{stem}.preprocess.json")


def default_model_path() -> Path:
    """The shipped encoder the workers load by default (named by ``models/weights/default.json``)."""
    try:
        pointer = json.loads(DEFAULT_POINTER.read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"no default model pointer at {DEFAULT_POINTER}: {exc}") from exc
    return WEIGHTS_DIR / pointer["model"]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelNotFound(f"{what} missing: {path}") from None
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"{what} unreadable: {path}: {exc}") from exc


def load_sidecars(model_path: str | Path) -> tuple[dict[str, Any], PreprocessContract]:
    """Read and check a model's card and preprocessing contract."""
    card_path, contract_path = sidecar_paths(model_path)
    card = _read_json(card_path, "model card")
    contract = PreprocessContract.from_dict(_read_json(contract_path, "preprocessing contract"))
    return card, contract


def choose_providers(device: str) -> list[str]:
    """Execution providers to request for ``device`` ("auto" | "cpu" | "cuda")."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got {device!r}")
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        _preload_cuda_libraries(ort)
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ConfigError(f"device='cuda' but onnxruntime offers no CUDA provider (available: {available})")
    return ["CPUExecutionProvider"]


def _preload_cuda_libraries(ort: Any) -> None:
    """Load CUDA and cuDNN from NVIDIA's wheels when they are installed (the GPU Docker image).

    onnxruntime-gpu looks for the CUDA libraries on the system's library path; the wheels put them in
    site-packages instead, and ``onnxruntime.preload_dlls`` (1.21+) loads them from there. Where CUDA is
    a system install, there is nothing to preload and the session finds it as before.
    """
    import importlib.util

    if not hasattr(ort, "preload_dlls") or importlib.util.find_spec("nvidia") is None:
        return
    try:
        ort.preload_dlls(directory="")
    except (OSError, RuntimeError) as exc:
        logger.warning("could not preload CUDA libraries from NVIDIA's wheels: %s", exc)


class OnnxEncoder:
    """An exported encoder: ``embed((N,1,S,S) float32) -> (N, dim) float32``."""

    def __init__(
        self, model_path: str | Path | None = None, device: str = "auto", intra_op_threads: int | None = None
    ):
        import onnxruntime as ort

        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        if not self.model_path.is_file():
            raise ModelNotFound(f"ONNX model missing: {self.model_path}")
        self.card, self.contract = load_sidecars(self.model_path)
        self.version = str(self.card.get("version", "unknown"))
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        requested = choose_providers(device)
        try:
            self.session = ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=requested
            )
        except Exception as exc:  # onnxruntime raises its own, unexported exception types
            raise ModelNotFound(f"cannot load ONNX model {self.model_path}: {exc}") from exc
        self.providers: list[str] = list(self.session.get_providers())
        if device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            raise ConfigError(f"device='cuda' requested but the session runs on {self.providers}")
        if requested[0] == "CUDAExecutionProvider" and self.providers[0] != "CUDAExecutionProvider":
            logger.warning("CUDA provider requested but unavailable; running on %s", self.providers)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self._input_name, self._output_name = inputs[0].name, outputs[0].name
        size = self.contract.input_size
        if list(inputs[0].shape[1:]) != [1, size, size]:
            raise ConfigError(f"model input {inputs[0].shape} does not match contract size {size}")
        dim = outputs[0].shape[-1]
        self.dim = int(dim) if isinstance(dim, int) else int(self.card["embedding_dim"])
        logger.info(
            "loaded encoder %s (version %s, dim %d) on %s",
            self.model_path.name,
            self.version,
            self.dim,
            self.providers[0],
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.contract.input_size
        return (1, size, size)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``(N, 1, S, S)`` -> float32 ``(N, dim)``."""
        batch = np.asarray(batch)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise InvalidInput(
                f"expected a batch of shape (N, {', '.join(map(str, self.input_shape))}), got {batch.shape}"
            )
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        (out,) = self.session.run([self._output_name], {self._input_name: batch})
        return np.asarray(out, dtype=np.float32)

    def __repr__(self) -> str:
        return f"OnnxEncoder({str(self.model_path)!r}, version={self.version!r}, providers={self.providers})"
