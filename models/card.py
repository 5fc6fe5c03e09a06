"""The model card a hospital's governance board reads: training population and a Markdown view.

``<name>.card.json`` is the machine-readable card (written by :mod:`models.export`);
``<name>.card.md`` is the same card for people, rendered by :func:`card_markdown`. The training
population is counted from the training manifest (:func:`training_population`), and each
public source it names is described once, in :data:`SOURCES`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.data import MODALITIES, Record

logger = logging.getLogger(__name__)

# What each source of the shared corpus is, who is in it, and its licence (data/README.md).
SOURCES: dict[str, dict[str, str]] = {
    "kermany-cxr": {
        "what": "paediatric chest X-rays (anterior-posterior), Guangzhou Women and Children's Medical Center",
        "who": "children aged 1 to 5 years, one hospital; splits grouped by patient",
        "licence": "CC BY 4.0 (Kermany et al. 2018)",
    },
    "brain-tumor-mri": {
        "what": "brain MRI slices, a mix of the Figshare, SARTAJ and Br35H collections",
        "who": "unstated ages and sites; no patient key, so splits are not grouped by patient "
        "(near-duplicates across train and test were removed)",
        "licence": "public research collections (Figshare CC BY 4.0; SARTAJ, Br35H as published)",
    },
    "retinal-oct-c8": {
        "what": "retinal OCT B-scans (CNV and normal) drawn from the training part of Kermany OCT2017",
        "who": "adult patients of the Kermany OCT2017 centres (Shiley Eye Institute and partners)",
        "licence": "CC BY 4.0 (Kermany et al. 2018)",
    },
    "kermany-oct-test": {
        "what": "retinal OCT B-scans, Kermany OCT2017's official test split",
        "who": "patients disjoint from the training part; same centres",
        "licence": "CC BY 4.0 (Kermany et al. 2018)",
    },
    "kermany-oct-sample": {
        "what": "retinal OCT B-scans, a small sample of Kermany OCT2017 with DME and drusen",
        "who": "same centres as kermany-oct-test",
        "licence": "CC BY 4.0 (Kermany et al. 2018)",
    },
    "bonn-eeg": {
        "what": "single-channel EEG segments of 23.6 s at 173.61 Hz (University of Bonn sets Z, O, N, F, S)",
        "who": "5 healthy volunteers (surface EEG, eyes open and closed) and 5 epilepsy patients "
        "(intracranial EEG, interictal and seizure); one centre",
        "licence": "public research data (Andrzejak et al. 2001)",
    },
}


def training_population(records: Sequence[Record]) -> dict[str, Any]:
    """Per modality: sources (with their description) and image counts per split and finding."""
    population: dict[str, Any] = {}
    for modality in sorted({r.modality for r in records}, key=lambda m: (m not in MODALITIES, m)):
        rows = [r for r in records if r.modality == modality]
        sources = sorted({r.source for r in rows if r.source})
        by_split = Counter(r.split for r in rows)
        by_label: dict[str, dict[str, int]] = {}
        for r in rows:
            by_label.setdefault(r.label, {}).setdefault(r.split, 0)
            by_label[r.label][r.split] += 1
        population[modality] = {
            "sources": {
                s: {
                    **SOURCES.get(s, {"what": "not described"}),
                    "images": dict(sorted(Counter(r.split for r in rows if r.source == s).items())),
                }
                for s in sources
            },
            "images": dict(sorted(by_split.items())),
            "findings": dict(sorted(by_label.items())),
        }
    return population


def _figure(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def card_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown: what it is for, who it was trained on, how well it does, its limits."""
    lines = [f"# Model card: {card.get('name', 'encoder')} {card.get('version', '')}".rstrip(), ""]
    if not card.get("trained", False):
        lines += [f"**{card.get('warning', 'UNTRAINED: not for retrieval.')}**", ""]
    lines += ["## Intended use", "", card.get("intended_use", ""), ""]
    contract = card.get("input_contract", {})
    size = contract.get("input_size")
    architecture = card.get("architecture", {}).get("summary", "")
    eeg_render = contract.get("eeg_render", "trace")
    lines += [
        "## What it is",
        "",
        f"- Architecture: {architecture}; {card.get('embedding_dim')}-d embedding, Euclidean distance.",
        (
            f"- Input: greyscale {size}×{size}, per-image min-max, resize '{contract.get('resize')}'; "
            f"EEG drawn as '{eeg_render}' (see models/README.md)."
        ),
        f"- ONNX sha256 `{card.get('onnx', {}).get('sha256', '')}`, exported {card.get('exported_at', '')}.",
        "",
    ]
    population = card.get("training", {}).get("population")
    if population:
        lines += ["## Training and evaluation population", ""]
        lines += ["| modality | source | who | images (train / val / test) |", "|---|---|---|---|"]
        for modality, entry in population.items():
            for source, about in entry["sources"].items():
                images = about.get("images", entry["images"])
                counts = " / ".join(str(images.get(s, 0)) for s in ("train", "val", "test"))
                lines.append(
                    f"| {modality} | {source}: {about.get('what', '')} | {about.get('who', '')} | {counts} |"
                )
        lines += [""]
    lines += performance_lines(card.get("metrics", {}))
    lines += ["## Limitations", "", card.get("limitations", ""), ""]
    if card.get("note"):
        lines += ["## Note", "", card["note"], ""]
    return "\n".join(lines)


def performance_lines(metrics: dict[str, Any]) -> list[str]:
    """The card's performance section (val and test rows) and held-out sources section."""
    lines: list[str] = []
    if "val" in metrics or "test" in metrics:
        lines += [
            "## Performance (finding-level mAP@10; modality-level P@20)",
            "",
            (
                "Validation = queries `val` against database `train` (used for every choice); "
                "test = queries `test` against `train,val` (run once, after the choice)."
            ),
            "",
            "| split | modality P@20 | " + " | ".join(MODALITIES) + " | macro |",
            "|---|---|" + "---|" * (len(MODALITIES) + 1),
        ]
        for split in ("val", "test"):
            if split not in metrics:
                continue
            finding = metrics[split]["finding"]
            p20 = metrics[split]["modality"].get("precision@20")
            cells = [
                f"{_figure(finding[m].get('map@10'))} (n={finding[m]['n_queries']})"
                if "n_queries" in finding.get(m, {})
                else _figure(finding.get(m, {}).get("map@10"))
                for m in MODALITIES
            ]
            cells.append(_figure(finding.get("macro", {}).get("map@10")))
            shown = "n/a" if p20 is None else f"{100 * p20:.2f} %"
            lines.append(f"| {split} | {shown} | " + " | ".join(cells) + " |")
        lines += [""]
    cross = metrics.get("cross_site")
    if cross:
        lines += [
            "## Held-out sources",
            "",
            (
                "Queries from a source the model never trained on, against the training sources' items. "
                "In these data that is OCT only, and its held-out sources come from the same centres "
                "(Kermany OCT2017): a check across patients and collections, not across hospitals. "
                "n counts the queries whose finding is in the database (DME and drusen are not)."
            ),
            "",
            "| modality | trained on | queries | n | mAP@10 |",
            "|---|---|---|---|---|",
        ]
        for modality, entry in cross["modalities"].items():
            for name, figures in entry["queries"].items():
                lines.append(
                    f"| {modality} | {', '.join(entry['training_sources'])} | {name} | "
                    f"{figures['n_queries']} | {_figure(figures['map@10'])} |"
                )
        for modality, source in cross["single_source"].items():
            lines.append(f"| {modality} | {source} | no second source in the data | - | - |")
        lines += [""]
    return lines


def refresh_card(
    model_path: str | Path, cross_site: str | Path | None = None, data_dir: str | Path | None = None
) -> dict[str, Any]:
    """Add an off-site check (``cross_site.json`` of ``models.evaluate --cross-site``) and the
    training population to an exported model's card, and rewrite its ``.card.md``.

    The ONNX file and its contract are not touched; the population is counted only when
    ``data_dir``'s manifest is the one the card says the model was trained on.
    """
    from models.data import manifest_sha256, read_manifest
    from models.runtime import sidecar_paths

    card_path, _ = sidecar_paths(model_path)
    card = json.loads(card_path.read_text())
    if cross_site is not None:
        card.setdefault("metrics", {})["cross_site"] = json.loads(
            (Path(cross_site) / "cross_site.json").read_text()
        )
    training = card.setdefault("training", {})
    if data_dir is not None and not training.get("population"):
        if manifest_sha256(data_dir) == training.get("manifest_sha256"):
            training["population"] = training_population(read_manifest(data_dir))
        else:
            logger.warning(
                "%s is not the manifest %s was trained on: no population", data_dir, card_path.name
            )
    for path, text in (
        (card_path, json.dumps(card, indent=2, sort_keys=True) + "\n"),
        (card_path.with_suffix(".md"), card_markdown(card)),
    ):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return card


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m models.card",
        description="Add an off-site check and the population to a card; rewrite its .card.md",
    )
    parser.add_argument("model", type=Path, help="an exported .onnx with its card beside it")
    parser.add_argument("--cross-site", type=Path, help="a models.evaluate --cross-site output folder")
    parser.add_argument("--data", type=Path, help="the training data folder (for the population)")
    args = parser.parse_args(argv)
    refresh_card(args.model, args.cross_site, args.data)
    print(f"wrote {sidecar_paths_md(args.model)}")
    return 0


def sidecar_paths_md(model_path: str | Path) -> Path:
    """``<name>.card.md`` beside ``<name>.onnx``."""
    from models.runtime import sidecar_paths

    return sidecar_paths(model_path)[0].with_suffix(".md")


if __name__ == "__main__":
    sys.exit(main())
