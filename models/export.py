"""Export an encoder to a single-file ONNX model with its card and preprocessing sidecars.

``python -m models.export --checkpoint runs/paper/best.pt --out models/weights/NAME.onnx``
``python -m models.export --untrained --arch paper --out models/weights/NAME.onnx``

The export fails (exit code 1, nothing left behind) unless ``onnx.checker.check_model`` passes and
the onnxruntime output matches torch within ``PARITY_ATOL`` on a random batch whose size differs
from the one traced (this also proves the batch axis is dynamic).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models import data as data_mod
from models.card import card_markdown, training_population
from models.data import sha256_file
from models.errors import CbmirError
from models.preprocess import PreprocessContract
from models.runtime import DEFAULT_POINTER, INPUT_NAME, OUTPUT_NAME, WEIGHTS_DIR, sidecar_paths

if TYPE_CHECKING:  # torch is imported where it is used
    from torch import nn

logger = logging.getLogger(__name__)

PARITY_ATOL = 1e-4
OPSET = 18
INTENDED_USE = (
    "Embedding greyscale medical pictures (paediatric chest X-ray, brain MRI, retinal OCT, and "
    "single-channel EEG drawn as the picture the preprocessing contract names) for similar-case "
    "retrieval next to a PACS, queried within a modality. Research and demonstration use only; "
    "not a medical device, not for diagnosis."
)
LIMITATIONS = (
    "Trained on small public data sets (Kermany CXR/OCT, a brain-tumour MRI mix, Bonn EEG); "
    "other scanners, protocols, body parts or populations are out of distribution. "
    "X-ray: paediatric (1-5 years) chest films from one hospital; the project's issue tracker reports "
    "that on a private hold-out of adult chest X-rays from another hospital, normal-vs-abnormal "
    "retrieval was at chance level (mAP@10 about 0.51; not re-measured with this version), so it "
    "must not be used for adults. MRI: a mix of public collections without patient grouping, "
    "scanner or sequence metadata. OCT: Spectralis B-scans of the Kermany centres; the training "
    "source has no patient key; DME and drusen were never trained on, so such a query gets "
    "neighbours of other findings. EEG: single-channel 23.6 s segments of one centre's research "
    "recordings (10 people, no patient key, so segments of one person can be neighbours and the "
    "EEG figures are likely optimistic); clinical multi-channel EEG is out of distribution. "
    "Nothing is rejected as out of distribution: any picture gets neighbours. The data hold a "
    "second source for OCT only, from the same centres; nothing was tested across hospitals. "
    "A new model version changes every embedding: the index must be rebuilt (cbmir reindex). "
    "Retrieval neighbours carry no diagnostic guarantee."
)

# The card's texts for a run trained on one modality alone (``modalities`` of its config)
ONE_MODALITY_CARD = {
    "eeg": {
        "intended_use": (
            "Embedding single-channel EEG segments, drawn as the picture the preprocessing contract "
            "names, for similar-case retrieval next to a PACS, compared with EEG only. Research and "
            "demonstration use only; not a medical device, not for diagnosis."
        ),
        "limitations": (
            "Trained on one collection: the University of Bonn's single-channel 23.6 s research segments "
            "(Andrzejak et al. 2001, sets Z, O, N, F, S: healthy volunteers with eyes open and with eyes "
            "closed, interictal activity from the hemisphere opposite the focus and from the focus, "
            "seizures), 70 training segments per finding from 10 people. The data have no patient key, so "
            "segments of one person can be neighbours and the EEG figures are likely optimistic. Clinical "
            "multi-channel EEG, other montages, recording set-ups, artefacts and ages are out of "
            "distribution. Training also showed each segment shifted in time and sign-flipped; the "
            "picture's time and amplitude scales are fixed. Its vectors are comparable only with vectors "
            "of this encoder (the service compares an EEG query with EEG only). Nothing is rejected as "
            "out of distribution. A new version changes every embedding: the index must be rebuilt "
            "(cbmir reindex)."
        ),
    }
}


class ExportError(CbmirError):
    """The exported model failed the checker or the parity check."""

    reason = "export-check-failed"


def quiet_exporter_logs() -> None:
    """The torch/onnxscript exporter logs every optimisation pass at INFO; keep only warnings."""
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)


def export_onnx(model: nn.Module, input_size: int, out_path: str | Path, opset: int = OPSET) -> None:
    """Trace ``model.encode`` to one self-contained ``.onnx`` file with a dynamic batch axis."""
    import torch

    from models.network import EncoderOnly

    quiet_exporter_logs()
    wrapper = EncoderOnly(model).eval()
    example = torch.rand(2, 1, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}},
            opset_version=opset,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    if program is None:  # only the legacy (dynamo=False) exporter returns nothing
        raise ExportError("the ONNX exporter returned no program")
    program.save(str(out_path), external_data=False)


def check_onnx(model: nn.Module, onnx_path: str | Path, input_size: int, atol: float | None = None) -> float:
    """Run the ONNX checker and a torch-vs-onnxruntime parity check; return the max abs diff."""
    atol = PARITY_ATOL if atol is None else atol
    import onnx
    import onnxruntime as ort
    import torch

    from models.network import encode

    onnx_path = Path(onnx_path)
    if onnx_path.with_name(onnx_path.name + ".data").exists():
        raise ExportError("export wrote external data; the model must be a single file")
    try:
        onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected {onnx_path}: {exc}") from exc
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    rng = np.random.default_rng(0)
    for n in (1, 5):
        x = rng.random((n, 1, input_size, input_size), dtype=np.float32)
        with torch.no_grad():
            expected = encode(model.eval(), torch.from_numpy(x)).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
        if got.shape != expected.shape:
            raise ExportError(f"shape mismatch: onnx {got.shape} vs torch {expected.shape}")
        worst = max(worst, float(np.max(np.abs(got - expected))))
    if not worst < atol:
        raise ExportError(f"parity check failed: max abs diff {worst:.3g} >= {atol}")
    return worst


def write_model(
    model: nn.Module,
    contract: PreprocessContract,
    out_path: str | Path,
    card: dict[str, Any],
    set_default: bool = False,
) -> dict[str, Any]:
    """Export, check, and write ``<name>.onnx`` + card + preprocess sidecars atomically."""
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ValueError("output path must end with .onnx")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        tmp_onnx = Path(tmp) / out_path.name
        export_onnx(model, contract.input_size, tmp_onnx)
        max_diff = check_onnx(model, tmp_onnx, contract.input_size)
        import onnx

        opset = max(o.version for o in onnx.load(str(tmp_onnx)).opset_import if o.domain in ("", "ai.onnx"))
        card = dict(card)
        card.setdefault("name", out_path.name[: -len(".onnx")])
        card.update(
            {
                "input_contract": contract.to_dict(),
                "onnx": {
                    "file": out_path.name,
                    "sha256": sha256_file(tmp_onnx),
                    "opset": opset,
                    "input": f"{INPUT_NAME}: float32 (N, 1, {contract.input_size}, {contract.input_size})",
                    "output": f"{OUTPUT_NAME}: float32 (N, {card.get('embedding_dim')})",
                    "parity_max_abs_diff": max_diff,
                    "parity_atol": PARITY_ATOL,
                },
                "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
        )
        card.setdefault("intended_use", INTENDED_USE)
        card.setdefault("limitations", LIMITATIONS)
        card_path, contract_path = sidecar_paths(out_path)
        card_md = card_path.with_suffix(".md")
        Path(tmp, card_path.name).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        Path(tmp, card_md.name).write_text(card_markdown(card))
        contract.save(Path(tmp, contract_path.name))
        for name in (card_path.name, card_md.name, contract_path.name, out_path.name):
            os.replace(Path(tmp, name), out_path.parent / name)
    logger.info("exported %s (parity max abs diff %.2e)", out_path, max_diff)
    if set_default:
        set_default_model(out_path)
    return card


def set_default_model(onnx_path: str | Path) -> None:
    """Point ``models/weights/default.json`` at a model inside ``models/weights``."""
    onnx_path = Path(onnx_path).resolve()
    if onnx_path.parent != WEIGHTS_DIR.resolve():
        raise ValueError(f"the default model must live in {WEIGHTS_DIR}")
    DEFAULT_POINTER.write_text(json.dumps({"model": onnx_path.name}, indent=2) + "\n")
    logger.info("default model is now %s", onnx_path.name)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model, checkpoint dict) from a training checkpoint written by ``models.train``."""
    import torch

    from models.network import build_model

    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    model = build_model(ckpt["arch"], **ckpt["arch_kwargs"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def population_of(config: dict[str, Any], manifest_sha: str | None) -> dict[str, Any] | None:
    """The training population counted from the run's manifest, if it is still the one trained on."""
    data_dir = config.get("data")
    if not data_dir or not (Path(data_dir) / "manifest.csv").is_file():
        logger.warning("training data %s not found: the card gets no training population", data_dir)
        return None
    if manifest_sha and data_mod.manifest_sha256(data_dir) != manifest_sha:
        logger.warning("%s changed since training: the card gets no training population", data_dir)
        return None
    return training_population(data_mod.read_manifest(data_dir, modalities=config.get("modalities")))


def card_from_checkpoint(ckpt: dict[str, Any], version: str) -> dict[str, Any]:
    """Model-card fields from a training checkpoint."""
    config = ckpt.get("config", {})
    only = config.get("modalities") or []
    texts = ONE_MODALITY_CARD.get(only[0], {}) if len(only) == 1 else {}
    return {
        **texts,
        "version": version,
        "architecture": {"name": ckpt["arch"], **ckpt["arch_kwargs"], "summary": ckpt.get("summary", "")},
        "embedding_dim": ckpt["embedding_dim"],
        "trained": True,
        "training": {
            "manifest_sha256": ckpt.get("manifest_sha256"),
            "data": config.get("data"),
            "config": config,
            "epoch": ckpt.get("epoch"),
            "best_epoch": ckpt.get("best_epoch"),
            "best_val_loss": ckpt.get("best_val_loss"),
            "population": population_of(config, ckpt.get("manifest_sha256")),
        },
        "metrics": {},
        "date": dt.date.today().isoformat(),
    }


def compact_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The card's summary of a models.evaluate ``metrics.json``."""
    modality = {k: v for k, v in metrics["modality"].items() if "@" in k}
    modality["precision@20_per_modality"] = {
        m: v["precision@20"] for m, v in metrics["modality"]["per_modality"].items()
    }
    finding = {m: dict(entry) for m, entry in metrics["finding"].items()}
    return {
        "queries": metrics["data"]["queries"],
        "database": metrics["data"]["database"],
        "n_queries": metrics["data"]["n_queries"],
        "n_database": metrics["data"]["n_database"],
        "manifest_sha256": metrics["data"]["manifest_sha256"],
        "modality": modality,
        "finding": finding,
    }


def subset_check(metrics: dict[str, Any]) -> dict[str, Any]:
    """What ``tests/test_models_evaluate.py`` reruns to check the shipped model reproduces."""
    data = metrics["data"]
    return {
        "queries": data["queries"],
        "database": data["database"],
        "subset": data["subset"],
        "manifest_sha256": data["manifest_sha256"],
        "modality_precision@20": metrics["modality"]["precision@20"],
        "finding_map@10": {m: v["map@10"] for m, v in metrics["finding"].items() if "map@10" in v},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="training checkpoint (best.pt) to export")
    source.add_argument("--untrained", action="store_true", help="export a randomly initialised encoder")
    parser.add_argument("--arch", default="paper", help="architecture for --untrained")
    parser.add_argument("--input-size", type=int, default=64, help="input size for --untrained")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed for --untrained")
    parser.add_argument("--out", type=Path, required=True, help="output .onnx path")
    parser.add_argument("--version", required=True, help="model version written to the card")
    parser.add_argument("--metrics", type=Path, help="a JSON file to use as the card's metrics section")
    parser.add_argument("--eval-val", type=Path, help="models.evaluate folder (queries val, database train)")
    parser.add_argument(
        "--eval-test", type=Path, help="models.evaluate folder (queries test, database train,val)"
    )
    parser.add_argument(
        "--eval-subset",
        type=Path,
        help="models.evaluate folder of a --subset run, recorded so tests can reproduce it",
    )
    parser.add_argument(
        "--eval-cross-site",
        type=Path,
        help="models.evaluate --cross-site folder (cross_site.json), recorded so tests can reproduce it",
    )
    parser.add_argument("--note", default="", help="free text added to the card")
    parser.add_argument("--set-default", action="store_true", help="make it the default model")


def run(args: argparse.Namespace) -> int:
    import torch

    from models.network import build_model, describe, encode

    try:
        if args.untrained:
            torch.manual_seed(args.seed)
            model = build_model(args.arch, input_size=args.input_size).eval()
            contract = PreprocessContract(input_size=args.input_size)
            with torch.no_grad():
                dim = int(encode(model, torch.zeros(1, 1, args.input_size, args.input_size)).shape[1])
            card = {
                "version": args.version,
                "trained": False,
                "embedding_dim": dim,
                "architecture": {
                    "name": args.arch,
                    "input_size": args.input_size,
                    "summary": describe(model),
                },
                "training": {
                    "manifest_sha256": None,
                    "seed": args.seed,
                    "note": "random initialisation; no training",
                },
                "metrics": {},
                "date": dt.date.today().isoformat(),
                "warning": (
                    "UNTRAINED: random weights for wiring and smoke tests only. Its neighbours "
                    "are meaningless and must never be reported as a retrieval result."
                ),
            }
        else:
            model, ckpt = load_checkpoint(args.checkpoint)
            contract = PreprocessContract.from_dict(ckpt["contract"])
            card = card_from_checkpoint(ckpt, args.version)
        if args.metrics:
            card["metrics"] = json.loads(args.metrics.read_text())
        for name, folder in (("val", args.eval_val), ("test", args.eval_test)):
            if folder:
                card["metrics"][name] = compact_metrics(json.loads((folder / "metrics.json").read_text()))
        if args.eval_subset:
            card["metrics"]["subset_check"] = subset_check(
                json.loads((args.eval_subset / "metrics.json").read_text())
            )
        if args.eval_cross_site:
            card["metrics"]["cross_site"] = json.loads((args.eval_cross_site / "cross_site.json").read_text())
        if args.note:
            card["note"] = args.note
        write_model(model, contract, args.out, card, set_default=args.set_default)
    except ExportError as exc:
        logger.error("%s", exc)
        return 1
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_exporter_logs()
    parser = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
