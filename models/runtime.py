"""Serving-side encoder: one onnxruntime session, no torch.

A model is ``<name>.onnx`` plus two sidecars beside it: ``<name>.card.json`` (model card) and
``<name>.preprocess.json`` (:class:`~models.preprocess.PreprocessContract`). The input is named
``image``, float32 ``(N, 1, S, S)`` with a dynamic batch axis; the output ``embedding`` is float32
``(N, dim)``. ``models/weights/default.json`` names the model the workers load by default.

A model may also be a set of encoders, one per modality: a routes file ``<name>.routes.json`` beside
the ONNX files names the encoder of each routed modality and the default one for the rest
(:class:`EncoderSet`). Services load either kind with :meth:`EncoderSet.load`.

Typical use::

    enc = OnnxEncoder()                       # default model, CUDA if usable, else CPU
    x = np.stack([to_model_input(img, enc.contract) for img in images])
    vectors = enc.embed(x)                    # (N, enc.dim) float32
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.data import EEG, MODALITIES
from models.errors import ConfigError, InvalidInput, NotFound
from models.preprocess import PreprocessContract

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_POINTER = WEIGHTS_DIR / "default.json"
INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
DEVICES = ("auto", "cpu", "cuda")
ROUTES_SUFFIX = ".routes.json"


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


def is_routes_file(path: str | Path) -> bool:
    """Whether ``path`` names an encoder set (``<name>.routes.json``) rather than one ONNX file."""
    return Path(path).name.endswith(ROUTES_SUFFIX)


def default_onnx_path() -> Path:
    """The default model's ONNX file: the model itself, or its default encoder when it is a set."""
    path = default_model_path()
    if not is_routes_file(path):
        return path
    return path.with_name(read_routes(path)[1]["default"][0])


def read_routes(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """A routes file and its entries ``{"default" | modality: (file, version)}``, checked for shape
    (a malformed file is a ConfigError naming it; the encoders are not opened)."""
    routes = _read_json(path, "encoder routes")
    if not isinstance(routes, dict):
        raise ConfigError(f"{path}: a routes file is a JSON object, got {type(routes).__name__}")
    if not isinstance(routes.get("version"), str) or not routes["version"]:
        raise ConfigError(f"{path}: the routes file names no version")
    modalities = routes.get("modalities", {})
    if not isinstance(modalities, dict):
        raise ConfigError(f"{path}: 'modalities' must map a modality to an encoder, got {modalities!r}")
    entries: dict[str, tuple[str, str]] = {}
    for role, entry in (("default", routes.get("default")), *modalities.items()):
        what = "the default encoder" if role == "default" else f"the {role} encoder"
        if not isinstance(entry, dict) or not entry.get("file") or not entry.get("version"):
            raise ConfigError(f"{path}: {what} must be {{'file': ..., 'version': ...}}, got {entry!r}")
        name = str(entry["file"])
        if Path(name).name != name or not name.endswith(".onnx"):
            raise ConfigError(f"{path}: {what} must be an .onnx file beside the routes file, got {name!r}")
        entries[role] = (name, str(entry["version"]))
    return routes, entries


def routes_version(path: Path) -> str:
    """The model version a routes file gives the index: its own version and a digest of what it
    routes (each encoder's file name, version and content), so a member swapped under an unchanged
    version is another model, whose vectors the index refuses until a reindex."""
    from models.data import sha256_file

    routes, entries = read_routes(path)
    identity = {}
    for role, (name, version) in sorted(entries.items()):
        file = path.with_name(name)
        if not file.is_file():
            raise ModelNotFound(f"ONNX model missing: {file} ({path} names it)")
        identity[role] = [name, version, sha256_file(file)]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{routes['version']}+{digest}"


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


def model_version(model_path: str | Path | None = None) -> str:
    """The version a model (an ONNX file or a routes file) writes into the index, read from its
    card or routes file without loading any session."""
    path = Path(model_path) if model_path is not None else default_model_path()
    if is_routes_file(path):
        return routes_version(path)
    return str(load_sidecars(path)[0].get("version", "unknown"))


def model_eeg_render(model_path: str | Path | None = None) -> str:
    """How a model (an ONNX file or a routes file) draws an EEG, read from the contract of the
    encoder that embeds EEG, without loading any session."""
    path = Path(model_path) if model_path is not None else default_model_path()
    if is_routes_file(path):
        entries = read_routes(path)[1]
        path = path.with_name(entries.get(EEG, entries["default"])[0])
    return load_sidecars(path)[1].eeg_render


def model_files(model_path: str | Path | None = None) -> list[Path]:
    """Every file a model needs (its routes file, each ONNX file and its two sidecars), without
    opening any; a missing one is ModelNotFound."""
    path = Path(model_path) if model_path is not None else default_model_path()
    onnx_files = (
        [path] if not is_routes_file(path) else [path.with_name(n) for n, _ in read_routes(path)[1].values()]
    )
    files = [path] if is_routes_file(path) else []
    for onnx_file in dict.fromkeys(onnx_files):
        files += [onnx_file, *sidecar_paths(onnx_file)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelNotFound(f"model files missing: {', '.join(missing)}")
    return files


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

        self.model_path = Path(model_path) if model_path is not None else default_onnx_path()
        if not self.model_path.is_file():
            raise ModelNotFound(f"ONNX model missing: {self.model_path}")
        self.card, self.contract = load_sidecars(self.model_path)
        self.version = str(self.card.get("version", "unknown"))
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # ONNX Runtime's pool threads spin on a core between runs by default. A worker or query
        # service shares its cores with the DICOM listener and the index: spinning took a third of
        # the encoder's CPU and slowed the listener beside it (benchmarks/pipeline.py, 2026-12-01).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


class EncoderSet:
    """The model a service runs: one ONNX encoder for every modality, or one per routed modality.

    A routes file ``<name>.routes.json`` (beside its ONNX files) reads::

        {"name": "ours", "version": "2.0.0",
         "default": {"file": "ours-ae64.onnx", "version": "1.2.0"},
         "modalities": {"xray": {"file": "ours-xray-effl0.onnx", "version": "1.0.0"}}}

    Each member keeps its own preprocessing contract and card. All members make vectors of one
    dimension, since one index (partitioned by modality) holds them, and each member's card must
    carry the version the file names. The set's ``version`` (the index's model version) is the
    file's version and a digest of its members (:func:`routes_version`), so it changes with any
    member, even one swapped under an unchanged version. Distances between two members' vectors
    mean nothing: :meth:`comparable` says which modalities a query of one modality may be compared
    with.
    """

    def __init__(
        self,
        default: OnnxEncoder,
        by_modality: dict[str, OnnxEncoder] | None = None,
        *,
        version: str | None = None,
        model_path: Path | None = None,
        card: dict[str, Any] | None = None,
    ):
        self.default = default
        self.by_modality = dict(by_modality or {})
        unknown = sorted(set(self.by_modality) - set(MODALITIES))
        if unknown:
            raise ConfigError(
                f"encoder routes name unknown modalities {unknown}; known: {', '.join(MODALITIES)}"
            )
        dims = {encoder.model_path.name: encoder.dim for encoder in self.members()}
        if len(set(dims.values())) > 1:
            raise ConfigError(f"the encoders of one set must make vectors of one dimension, got {dims}")
        self.dim = default.dim
        self.version = version or default.version
        self.model_path = model_path or default.model_path
        self.card = card if card is not None else default.card
        self.providers = default.providers

    @classmethod
    def load(
        cls, model_path: str | Path | None = None, device: str = "auto", intra_op_threads: int | None = None
    ) -> EncoderSet:
        """The set named by a routes file, or a set of the one encoder an ONNX file holds."""
        path = Path(model_path) if model_path is not None else default_model_path()
        if not is_routes_file(path):
            return cls(OnnxEncoder(path, device=device, intra_op_threads=intra_op_threads))
        routes, entries = read_routes(path)
        loaded: dict[str, OnnxEncoder] = {}
        members: dict[str, OnnxEncoder] = {}
        for role, (name, version) in entries.items():
            if name not in loaded:  # a file routed twice is one session
                loaded[name] = OnnxEncoder(
                    path.with_name(name), device=device, intra_op_threads=intra_op_threads
                )
            if loaded[name].version != version:
                what = "the default encoder" if role == "default" else f"the {role} encoder"
                raise ConfigError(
                    f"{path}: {what} is {name} version {version}, but its card says "
                    f"{loaded[name].version}: the routes and the encoders do not belong together"
                )
            members[role] = loaded[name]
        default = members.pop("default")
        return cls(default, members, version=routes_version(path), model_path=path, card=routes)

    @property
    def routed(self) -> bool:
        """Whether more than one encoder embeds (then queries stay within comparable modalities)."""
        return any(encoder is not self.default for encoder in self.by_modality.values())

    def for_modality(self, modality: str) -> OnnxEncoder:
        """The encoder of a normalised modality (the default one for any modality not routed)."""
        return self.by_modality.get(modality, self.default)

    def members(self) -> list[OnnxEncoder]:
        """Each encoder once, the default first."""
        out = [self.default]
        for encoder in self.by_modality.values():
            if all(encoder is not seen for seen in out):
                out.append(encoder)
        return out

    def comparable(self, modality: str, vocabulary: tuple[str, ...]) -> tuple[str, ...]:
        """The modalities of ``vocabulary`` whose vectors come from the encoder of ``modality``."""
        encoder = self.for_modality(modality)
        return tuple(m for m in vocabulary if self.for_modality(m) is encoder)

    @property
    def trained(self) -> bool:
        """Whether every encoder's card says it was trained (an untrained one only checks wiring)."""
        return all(bool(encoder.card.get("trained", False)) for encoder in self.members())

    @property
    def eeg_render(self) -> str:
        """How the EEG encoder's contract draws a signal (what an EEG becomes before preprocessing)."""
        return self.for_modality(EEG).contract.eeg_render

    def embed_each(
        self,
        inputs: Sequence[np.ndarray],
        modalities: Sequence[str],
        run: Callable[[OnnxEncoder, np.ndarray], np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """The vectors of several items' input rows (each item's own contract), in their order.

        The rows of all items of one encoder go through one ``run(encoder, rows)``
        (default: ``encoder.embed``), so mixed modalities cost one call per encoder.
        """
        run = run or (lambda encoder, rows: encoder.embed(rows))
        out: list[np.ndarray] = [np.zeros((0, self.dim), np.float32) for _ in inputs]
        for encoder in self.members():
            mine = [i for i, m in enumerate(modalities) if self.for_modality(m) is encoder and len(inputs[i])]
            if not mine:
                continue
            vectors = run(encoder, np.concatenate([inputs[i] for i in mine]))
            start = 0
            for i in mine:
                out[i] = vectors[start : start + len(inputs[i])]
                start += len(inputs[i])
        return out

    def __repr__(self) -> str:
        routes = {m: e.model_path.name for m, e in self.by_modality.items()}
        return f"EncoderSet({self.default.model_path.name!r}, routes={routes}, version={self.version!r})"
