"""A model of several encoders, one per modality: its routes file and card (``python -m models.routes``).

    python -m models.routes --out models/weights/ours.routes.json --version 2.0.0 \\
        --default models/weights/ours-ae64.onnx --route xray=models/weights/ours-xray-effl0.onnx \\
        [--eval-val DIR] [--eval-test DIR] [--eval-subset DIR] [--set-default]

The routes file (read by :class:`models.runtime.EncoderSet`) names each routed modality's ONNX
encoder and the default one for every other modality, each with the version its card carries, so
an encoder swapped behind the file's back is refused at load. The set's own version is the index's
model version. Beside it, ``<name>.card.md`` is the set's model card: which encoder embeds what, the
set's val and test figures (from ``models.evaluate`` of the routes file), how queries are compared,
and each encoder's limitations. The encoders keep their own cards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from models.card import performance_lines
from models.errors import ConfigError
from models.runtime import ROUTES_SUFFIX, EncoderSet, load_sidecars

logger = logging.getLogger(__name__)

COMPARABILITY = (
    "Distances between two encoders' vectors mean nothing. A query is compared only with the modalities "
    "its own encoder embeds: with no modality filter, the search is restricted to them; a filter naming "
    "a modality of another encoder is refused (INVALID_ARGUMENT). Offline evaluation ranks the same way, "
    "so modality P@20 of a routed modality is 100 % by construction."
)
INTENDED_USE = (
    "Similar-case retrieval next to a PACS, within a modality, for the modalities and populations each "
    "encoder's card describes. Research and demonstration use only; not a medical device, not for diagnosis."
)


def routes_card_path(routes_path: str | Path) -> Path:
    """``<name>.card.md`` beside ``<name>.routes.json``."""
    path = Path(routes_path)
    return path.with_name(path.name.removesuffix(ROUTES_SUFFIX) + ".card.md")


def _entry(onnx_path: Path, folder: Path) -> dict[str, str]:
    if onnx_path.resolve().parent != folder.resolve():
        raise ConfigError(f"{onnx_path} must sit in {folder}, beside the routes file")
    card, _ = load_sidecars(onnx_path)
    return {"file": onnx_path.name, "version": str(card.get("version", "unknown"))}


def write_routes(
    out: str | Path,
    *,
    version: str,
    default: str | Path,
    routes: dict[str, str | Path],
    metrics: dict[str, Any] | None = None,
    note: str = "",
    evaluated: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``out`` (a ``.routes.json``) and its card, after loading the set to check it.

    ``evaluated`` maps each evaluation file the metrics come from to the model version it
    evaluated; any other version than this set's is refused (figures of another model).
    """
    out = Path(out)
    if not out.name.endswith(ROUTES_SUFFIX):
        raise ConfigError(f"a routes file's name ends with {ROUTES_SUFFIX}, got {out.name}")
    name = out.name.removesuffix(ROUTES_SUFFIX)
    document: dict[str, Any] = {
        "name": name,
        "version": version,
        "date": dt.date.today().isoformat(),
        "default": _entry(Path(default), out.parent),
        "modalities": {m: _entry(Path(p), out.parent) for m, p in sorted(routes.items())},
        "comparability": COMPARABILITY,
        "intended_use": INTENDED_USE,
        "metrics": metrics or {},
    }
    if note:
        document["note"] = note
    tmp = out.with_name(f".{out.name}.tmp{ROUTES_SUFFIX}")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    try:
        encoders = EncoderSet.load(tmp, device="cpu")  # the same checks the services make
        foreign = {where: v for where, v in (evaluated or {}).items() if v != encoders.version}
        if foreign:
            raise ConfigError(
                f"the figures are not of this set ({encoders.version}): "
                + ", ".join(f"{where} evaluated {v}" for where, v in sorted(foreign.items()))
            )
        text = card_markdown(document, encoders)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    card_tmp = routes_card_path(tmp)
    card_tmp.write_text(text)
    os.replace(card_tmp, routes_card_path(out))
    os.replace(tmp, out)
    logger.info("wrote %s (%s) and %s", out, version, routes_card_path(out).name)
    return document


def card_markdown(document: dict[str, Any], encoders: EncoderSet) -> str:
    """The set's card: intended use, which encoder embeds what, figures, comparability, limitations."""
    lines = [f"# Model card: {document['name']} {document['version']} (one encoder per modality)", ""]
    lines += [
        (
            f"Index model version `{encoders.version}` (the version and a digest of the encoders: a "
            "changed encoder is another model, and the index must be rebuilt)."
        ),
        "",
    ]
    lines += ["## Intended use", "", document.get("intended_use", ""), ""]
    lines += [
        "## Encoders",
        "",
        "| modalities | encoder | version | input | architecture | embedding | card |",
        "|---|---|---|---|---|---|---|",
    ]
    from models.data import MODALITIES

    for encoder in encoders.members():
        served = [m for m in MODALITIES if encoders.for_modality(m) is encoder]
        if encoder is encoders.default:
            served.append("any other")
        size = encoder.contract.input_size
        card_md = encoder.model_path.name.removesuffix(".onnx") + ".card.md"
        lines.append(
            f"| {', '.join(served)} | {encoder.model_path.name} | {encoder.version} | {size}×{size} grey | "
            f"{encoder.card.get('architecture', {}).get('summary', '')} | {encoder.dim}-d, Euclidean | "
            f"[{card_md}]({card_md}) |"
        )
    lines += ["", "## How queries are compared", "", document.get("comparability", ""), ""]
    lines += performance_lines(document.get("metrics", {}))
    lines += ["## Limitations", ""]
    for encoder in encoders.members():
        lines += [f"- **{encoder.model_path.name}**: {encoder.card.get('limitations', '')}"]
    lines += [""]
    if document.get("note"):
        lines += ["## Note", "", document["note"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from models.export import compact_metrics, set_default_model, subset_check

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m models.routes", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="<name>.routes.json beside the encoders")
    parser.add_argument("--version", required=True, help="the set's version (the index's model version)")
    parser.add_argument(
        "--default", type=Path, required=True, help="the encoder of every modality not routed"
    )
    parser.add_argument(
        "--route", action="append", default=[], metavar="MODALITY=ONNX", help="a modality's own encoder"
    )
    parser.add_argument("--eval-val", type=Path, help="models.evaluate folder of the routes file (val)")
    parser.add_argument("--eval-test", type=Path, help="models.evaluate folder of the routes file (test)")
    parser.add_argument("--eval-subset", type=Path, help="models.evaluate --subset folder, for the tests")
    parser.add_argument(
        "--eval-cross-site",
        type=Path,
        help="models.evaluate --cross-site folder of the routes file (cross_site.json)",
    )
    parser.add_argument("--note", default="")
    parser.add_argument("--set-default", action="store_true", help="make the set the default model")
    args = parser.parse_args(argv)
    routes = {}
    for item in args.route:
        modality, _, path = item.partition("=")
        if not path:
            parser.error(f"--route takes MODALITY=ONNX, got {item!r}")
        routes[modality] = path
    metrics: dict[str, Any] = {}
    evaluated: dict[str, str] = {}

    def read(folder: Path, name: str) -> dict[str, Any]:
        result = json.loads((folder / name).read_text())
        evaluated[str(folder / name)] = str(result.get("model", {}).get("version", ""))
        return result

    for key, folder in (("val", args.eval_val), ("test", args.eval_test)):
        if folder is not None:
            metrics[key] = compact_metrics(read(folder, "metrics.json"))
    if args.eval_cross_site is not None:
        metrics["cross_site"] = read(args.eval_cross_site, "cross_site.json")
    if args.eval_subset is not None:
        metrics["subset_check"] = subset_check(read(args.eval_subset, "metrics.json"))
    try:
        write_routes(
            args.out,
            version=args.version,
            default=args.default,
            routes=routes,
            metrics=metrics,
            note=args.note,
            evaluated=evaluated,
        )
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    if args.set_default:
        set_default_model(args.out)
    print(f"wrote {args.out} and {routes_card_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
