"""Manifest reading, picture loading and cached model inputs (numpy only, no torch).

A data folder holds ``manifest.csv`` with the columns ``path, modality, label, split`` (plus
``source, patient, sha256``, optional); ``path`` is relative to the folder or absolute. Pictures
are loaded with :func:`load_picture`: image files through
:func:`models.preprocess.load_image_file`, EEG text files through
:func:`models.eeg.render_eeg` with the render the model's contract names.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from models import eeg
from models.errors import ConfigError
from models.preprocess import PreprocessContract, load_image_file, to_model_input

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO_ROOT / "runs" / "cache"
# The modalities of the corpus the encoders are trained on (services/core/vocabulary.py adds "other").
XRAY, MRI, OCT, EEG = "xray", "mri", "oct", "eeg"
MODALITIES = (XRAY, MRI, OCT, EEG)
CACHE_FORMAT = 1


def shared_data_dir() -> Path:
    """``$CBMIR_SHARED_DATA``, else ``<repo>/../shared/data`` (may not exist)."""
    env = os.environ.get("CBMIR_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@dataclasses.dataclass(frozen=True)
class Record:
    """One manifest row. ``key`` is the manifest ``path`` string, unique within a manifest."""

    key: str
    path: Path
    modality: str
    label: str
    split: str
    patient: str = ""
    source: str = ""

    @property
    def finding(self) -> str:
        """Finding label qualified by modality, e.g. ``xray/normal``."""
        return f"{self.modality}/{self.label}"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_sha256(data_dir: str | Path) -> str:
    return hashlib.sha256((Path(data_dir) / "manifest.csv").read_bytes()).hexdigest()


def read_manifest(
    data_dir: str | Path, splits: Iterable[str] | None = None, modalities: Iterable[str] | None = None
) -> list[Record]:
    """Rows of ``<data_dir>/manifest.csv`` (optionally filtered), in file order."""
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"no manifest.csv in {data_dir}")
    wanted_splits = set(splits) if splits is not None else None
    wanted_modalities = set(modalities) if modalities is not None else None
    records = []
    with manifest.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if wanted_splits is not None and row["split"] not in wanted_splits:
                continue
            if wanted_modalities is not None and row["modality"] not in wanted_modalities:
                continue
            path = Path(row["path"])
            records.append(
                Record(
                    key=row["path"],
                    path=path if path.is_absolute() else data_dir / path,
                    modality=row["modality"],
                    label=row["label"],
                    split=row["split"],
                    patient=row.get("patient", "") or "",
                    source=row.get("source", "") or "",
                )
            )
    return records


def load_picture(path: str | Path, modality: str | None = None, *, eeg_render: str) -> np.ndarray:
    """A data file -> 2-D uint8 picture (EEG ``.txt`` files are drawn by ``eeg_render`` at the Bonn rate).

    ``eeg_render`` has no default on purpose: it must be the one of the model's contract."""
    path = Path(path)
    if modality == EEG or path.suffix.lower() == ".txt":
        return eeg.render_eeg(eeg.read_bonn_txt(path), eeg.BONN_SAMPLING_HZ, eeg_render)
    return load_image_file(path)


def model_inputs(
    records: Sequence[Record], contract: PreprocessContract, progress: bool = False
) -> np.ndarray:
    """float32 ``(N, 1, S, S)`` inputs for ``records`` (no cache)."""
    size = contract.input_size
    out = np.empty((len(records), 1, size, size), dtype=np.float32)
    iterator: Iterable = enumerate(records)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(records), desc="preprocess", unit="img", leave=False)
    for i, record in iterator:
        out[i] = to_model_input(
            load_picture(record.path, record.modality, eeg_render=contract.eeg_render), contract
        )
    return out


def eeg_view_inputs(
    records: Sequence[Record], contract: PreprocessContract, count: int, polarity: bool, seed: int
) -> np.ndarray:
    """float32 ``(N, count, 1, S, S)``: ``count`` random training views (:func:`models.eeg.training_view`)
    of each EEG record, drawn as the contract draws, seeded."""
    from tqdm import tqdm

    size = contract.input_size
    out = np.empty((len(records), count, 1, size, size), dtype=np.float32)
    rng = np.random.default_rng([seed, count])
    for i, record in enumerate(tqdm(records, desc="EEG views", unit="segment", leave=False)):
        if record.modality != EEG:
            raise ConfigError(f"EEG views of a {record.modality} record: {record.path}")
        samples = eeg.read_bonn_txt(record.path)
        for view in range(count):
            picture = eeg.render_eeg(
                eeg.training_view(samples, rng, polarity), eeg.BONN_SAMPLING_HZ, contract.eeg_render
            )
            out[i, view] = to_model_input(picture, contract)
    return out


def cached_model_inputs(
    records: Sequence[Record],
    contract: PreprocessContract,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    progress: bool = True,
) -> np.ndarray:
    """Like :func:`model_inputs`, memoised in ``cache_dir`` (an ignored folder) as ``.npy``."""
    if cache_dir is None:
        return model_inputs(records, contract, progress)
    digest = hashlib.sha256(
        json.dumps(
            {
                "format": CACHE_FORMAT,
                "contract": contract.to_dict(),
                "eeg": [
                    eeg.RENDER_RATE_HZ,
                    eeg.DURATION_S,
                    eeg.AMPLITUDE_UV,
                    eeg.ROWS,
                    eeg.WIDTH,
                    eeg.HEIGHT,
                    *(
                        [eeg.SPEC_WINDOW, eeg.SPEC_FRAMES, eeg.SPEC_BINS, eeg.SPEC_DB_MIN, eeg.SPEC_DB_MAX]
                        if contract.eeg_render != eeg.TRACE
                        else []
                    ),
                ],
                "files": [
                    [str(r.path), os.stat(r.path).st_size, int(os.stat(r.path).st_mtime)] for r in records
                ],
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:20]
    cache_dir = Path(cache_dir)
    target = cache_dir / f"inputs-{contract.input_size}-{digest}.npy"
    if target.is_file():
        logger.info("using cached inputs %s", target)
        return np.load(target)
    arrays = model_inputs(records, contract, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, arrays)
    os.replace(tmp, target)
    return arrays
