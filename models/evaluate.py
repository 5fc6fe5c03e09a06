"""Retrieval evaluation (``cbmir evaluate`` / ``python -m models.evaluate``).

    python -m models.evaluate --data ../shared/data --queries test --database train,val --out runs/eval

``--data DIR`` holds a ``manifest.csv`` in the shared format (paths relative to DIR or
absolute). Queries come from the ``--queries`` splits, the database from the ``--database``
splits; an item in both is never its own neighbour. Each query's top ``depth`` database items
are asked from a :class:`models.retrieval.Retriever`; metrics are defined in
:mod:`models.metrics`. Writes ``metrics.json``, ``report.md``, ``pr_curves.png``,
``query_grid.jpg`` and ``embedding_map.png`` to ``--out``.

The ranking step is pluggable. :func:`evaluate_retriever` takes any object with
``index(items)`` and ``search(item, k) -> list of database keys`` (optionally
``search_many(items, k)``); :func:`run_evaluation` uses the offline
:class:`~models.retrieval.NumpyRetriever` unless given another retriever, e.g. one that ingests
the database into the service and searches over gRPC, which must give the same numbers::

    from models.evaluate import run_evaluation
    run_evaluation(data_dir, ["test"], ["train", "val"], out_dir, retriever=MyServiceRetriever(...))
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models import data as data_mod
from models.metrics import FINDING_KS, MODALITY_KS, retrieval_metrics
from models.retrieval import NumpyRetriever, Retriever

logger = logging.getLogger(__name__)

METRICS_DEPTH = max(*MODALITY_KS, *FINDING_KS)
RECALL_GRID = np.linspace(0.0, 1.0, 21)


def evaluate_retriever(
    retriever: Retriever,
    queries: Sequence[data_mod.Record],
    database: Sequence[data_mod.Record],
    depth: int = METRICS_DEPTH,
    index: bool = True,
) -> tuple[dict[str, Any], np.ndarray]:
    """Index ``database``, search every query, return (metrics, rankings as database indices)."""
    if index:
        retriever.index(list(database))
    depth = max(depth, METRICS_DEPTH)
    position = {r.key: i for i, r in enumerate(database)}
    if isinstance(retriever, NumpyRetriever) and retriever.keys == [r.key for r in database]:
        # fast path, same result as search_many: indices instead of keys
        rankings = retriever.search_indices(
            [q.key for q in queries],
            retriever.embed_items(list(queries)),
            depth,
            [q.modality for q in queries],
        )
    else:
        if hasattr(retriever, "search_many"):
            ranked_keys = retriever.search_many(list(queries), depth)
        else:
            ranked_keys = [retriever.search(q, depth) for q in queries]
        width = max((len(r) for r in ranked_keys), default=0)
        rankings = np.full((len(queries), width), -1, dtype=np.int64)
        for q, keys in enumerate(ranked_keys):
            rankings[q, : len(keys)] = [position[k] for k in keys]
    for q, query in enumerate(queries):
        own = position.get(query.key)
        if own is not None and (rankings[q] == own).any():
            raise ValueError(f"retriever returned the query itself ({query.key})")
    metrics = retrieval_metrics(
        [q.modality for q in queries],
        [q.label for q in queries],
        [d.modality for d in database],
        [d.label for d in database],
        [row[row >= 0][:METRICS_DEPTH] for row in rankings],
        [position.get(q.key) for q in queries],
    )
    return metrics, rankings


def pr_curves(
    queries: Sequence[data_mod.Record],
    database: Sequence[data_mod.Record],
    rankings: np.ndarray,
    query_in_db: Sequence[int | None],
) -> dict[str, np.ndarray]:
    """Finding-level interpolated precision at ``RECALL_GRID`` per modality (mean over queries)."""
    db_find = np.array([d.finding for d in database])
    counts = {f: int((db_find == f).sum()) for f in set(db_find.tolist())}
    curves: dict[str, list[np.ndarray]] = {}
    for q, query in enumerate(queries):
        relevant = counts.get(query.finding, 0) - (
            1 if query_in_db[q] is not None and db_find[query_in_db[q]] == query.finding else 0
        )
        if relevant <= 0:
            continue
        row = rankings[q][rankings[q] >= 0]
        hits = (db_find[row] == query.finding).astype(np.float64)
        cum = np.cumsum(hits)
        precision = cum / np.arange(1, len(hits) + 1)
        recall = cum / relevant
        interp = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at >= this rank's recall
        values = np.array([interp[recall >= r].max() if (recall >= r).any() else 0.0 for r in RECALL_GRID])
        curves.setdefault(query.modality, []).append(values)
    return {m: np.mean(v, axis=0) for m, v in curves.items()}


def _plot_pr(curves: dict[str, np.ndarray], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for modality, values in sorted(curves.items()):
        ax.plot(RECALL_GRID, values, marker="o", ms=3, label=modality)
    ax.set(
        xlabel="recall (finding level)",
        ylabel="interpolated precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=title,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_grid(
    queries: Sequence[data_mod.Record],
    database: Sequence[data_mod.Record],
    rankings: np.ndarray,
    path: Path,
    eeg_render: str,
    per_modality: int = 2,
    seed: int = 0,
) -> None:
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    chosen = []
    for modality in data_mod.MODALITIES:
        idx = [i for i, q in enumerate(queries) if q.modality == modality]
        chosen += sorted(rng.choice(idx, min(per_modality, len(idx)), replace=False).tolist()) if idx else []
    if not chosen:
        return
    fig, axes = plt.subplots(len(chosen), 6, figsize=(12, 2.1 * len(chosen)), squeeze=False)
    for row, q in enumerate(chosen):
        items = [queries[q]] + [database[i] for i in rankings[q][:5] if i >= 0]
        for col in range(6):
            ax = axes[row][col]
            ax.axis("off")
            if col >= len(items):
                continue
            item = items[col]
            ax.imshow(data_mod.load_picture(item.path, item.modality, eeg_render=eeg_render), cmap="gray")
            match = item.finding == queries[q].finding
            colour = "black" if col == 0 else ("green" if match else "red")
            ax.set_title(("query: " if col == 0 else f"#{col}: ") + item.finding, fontsize=7, color=colour)
    fig.suptitle("queries (left) and their top 5 (green: same finding, red: different)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80, pil_kwargs={"quality": 80})
    plt.close(fig)


def _map_points(x: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """2-D map of the rows of ``x``: t-SNE when asked and available, else PCA."""
    if method == "tsne" and len(x) > 30:
        try:
            from sklearn.manifold import TSNE

            return TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(
                x
            ), "t-SNE"
        except ImportError:
            pass
    centred = x - x.mean(0)
    _, _, vh = np.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:2].T, "pca"


def _plot_map(
    embeddings: np.ndarray,
    findings: Sequence[str],
    path: Path,
    method: str,
    seed: int = 0,
    max_points: int = 2500,
    groups: Sequence[tuple[str, np.ndarray]] | None = None,
) -> str:
    """One map per group of rows (``(title, row indices)``; default: one of all rows). A model of
    several encoders gets one map per encoder, since distances across encoders mean nothing."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    groups = list(groups) if groups else [("", np.arange(len(embeddings)))]
    groups = [(title, rows) for title, rows in groups if len(rows)]
    share = max(1, max_points // len(groups))
    fig, axes = plt.subplots(1, len(groups), figsize=(8 * len(groups), 6.5), squeeze=False)
    cmap = plt.get_cmap("tab20")
    colours = {f: cmap(i % 20) for i, f in enumerate(sorted(set(findings)))}
    used = "pca"
    for ax, (title, rows) in zip(axes[0], groups, strict=True):
        idx = np.sort(rng.choice(rows, share, replace=False)) if len(rows) > share else np.asarray(rows)
        points, used = _map_points(embeddings[idx].astype(np.float64), method, seed)
        finding_of = np.asarray(findings)[idx]
        for finding in sorted(set(finding_of.tolist())):
            mask = finding_of == finding
            ax.scatter(points[mask, 0], points[mask, 1], s=4, color=colours[finding], label=finding)
        ax.set_title(f"{title + ': ' if title else ''}embeddings ({used}, {len(idx)} points)")
        ax.legend(fontsize=6, markerscale=3, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return used


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f}" if pct else f"{value:.4f}"


def write_report(path: Path, metrics: dict[str, Any], plots: dict[str, str]) -> None:
    model = metrics["model"]
    lines = [f"# Retrieval evaluation: {model.get('name')} {model.get('version')}", ""]
    if not model.get("trained", True):
        lines += [
            (
                "> **UNTRAINED MODEL.** Random weights for wiring tests; these numbers are not a "
                "retrieval result and must not be reported as one."
            ),
            "",
        ]
    info = metrics["data"]
    lines += [
        f"- date: {metrics['date']}",
        f"- data: `{info['dir']}` (manifest sha256 `{info['manifest_sha256'][:16]}…`)",
        f"- queries: {info['n_queries']} from {info['queries']}; database: {info['n_database']} "
        f"from {info['database']}" + (f"; subset {info['subset']} per finding" if info.get("subset") else ""),
        f"- retriever: {metrics['retriever']}; model `{model.get('path')}` on {model.get('providers')}",
        "",
        "## Modality level (relevant = same modality)",
        "",
        "| | " + " | ".join(f"@{k}" for k in MODALITY_KS) + " |",
        "|---|" + "---|" * len(MODALITY_KS),
    ]
    mod = metrics["modality"]
    for name in ("accuracy", "precision", "recall"):
        lines.append(
            f"| {name} (%) | " + " | ".join(_fmt(mod[f"{name}@{k}"], True) for k in MODALITY_KS) + " |"
        )
    lines += [
        "",
        "Per modality, precision@20 (%): "
        + ", ".join(f"{m} {_fmt(v['precision@20'], True)}" for m, v in mod["per_modality"].items()),
        "",
        "## Finding level (relevant = same modality and finding, whole database ranked)",
        "",
        "| modality | queries | "
        + " | ".join(f"P@{k}" for k in FINDING_KS)
        + " | "
        + " | ".join(f"mAP@{k}" for k in FINDING_KS)
        + " |",
        "|---|---|" + "---|" * (2 * len(FINDING_KS)),
    ]
    for modality, entry in metrics["finding"].items():
        n = entry.get("n_queries", "")
        skipped = entry.get("queries_without_relevant")
        n_text = f"{n}" + (f" (+{skipped} without relevant)" if skipped else "")
        lines.append(
            f"| {modality} | {n_text} | "
            + " | ".join(_fmt(entry[f"precision@{k}"]) for k in FINDING_KS)
            + " | "
            + " | ".join(_fmt(entry[f"map@{k}"]) for k in FINDING_KS)
            + " |"
        )
    lines += [
        "",
        (
            "Definitions: see `models/metrics.py` (precision@k = hits/k; recall@k = hits/|relevant "
            "in database|; accuracy@k = top-k majority vote; AP@k normalised by min(k, R); queries "
            "whose finding is absent from the database are excluded from finding-level means)."
        ),
        "",
    ]
    for title, name in plots.items():
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    path.write_text("\n".join(lines))


def run_evaluation(
    data_dir: str | Path,
    query_splits: Sequence[str],
    database_splits: Sequence[str],
    out_dir: str | Path,
    model_path: str | Path | None = None,
    device: str = "auto",
    retriever: Retriever | None = None,
    subset: int | None = None,
    seed: int = 0,
    plots: bool = True,
    map_method: str = "tsne",
    pr_depth: int | None = None,
) -> dict[str, Any]:
    """Evaluate and write ``metrics.json`` / ``report.md`` / plots; returns the metrics dict."""
    from models.runtime import EncoderSet

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    queries = data_mod.read_manifest(data_dir, splits=query_splits)
    database = data_mod.read_manifest(data_dir, splits=database_splits)
    if subset:
        from models.train import select_subset

        queries = select_subset(queries, subset, seed)
        database = select_subset(database, subset, seed + 1)
    if not queries or not database:
        raise ValueError(f"no queries ({len(queries)}) or no database items ({len(database)}) in {data_dir}")
    encoder = EncoderSet.load(model_path, device=device)
    if not encoder.trained:
        logger.warning("model %s is UNTRAINED: numbers are for wiring checks only", encoder.model_path.name)
    retriever = retriever or NumpyRetriever(encoder, progress=True)
    depth = len(database) if pr_depth is None else max(pr_depth, METRICS_DEPTH)
    metrics, rankings = evaluate_retriever(retriever, queries, database, depth)
    position = {r.key: i for i, r in enumerate(database)}
    query_in_db = [position.get(q.key) for q in queries]
    from models.data import sha256_file

    metrics.update(
        {
            "model": {
                "name": encoder.card.get("name"),
                "version": encoder.version,
                "trained": encoder.trained,
                "path": str(encoder.model_path),
                "sha256": sha256_file(encoder.model_path),
                "encoders": {
                    m.model_path.name: {"version": m.version, "sha256": sha256_file(m.model_path)}
                    for m in encoder.members()
                },
                "routes": {m: e.model_path.name for m, e in encoder.by_modality.items()},
                "providers": encoder.providers,
                "dim": encoder.dim,
            },
            "data": {
                "dir": str(data_dir),
                "manifest_sha256": data_mod.manifest_sha256(data_dir),
                "queries": list(query_splits),
                "database": list(database_splits),
                "subset": subset,
                "n_queries": len(queries),
                "n_database": len(database),
            },
            "retriever": type(retriever).__name__,
            "ranking": "exact Euclidean distance (float64), ties by database order",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
    )
    plot_files: dict[str, str] = {}
    if plots:
        import matplotlib as mpl

        mpl.use("Agg")
        curves = pr_curves(queries, database, rankings, query_in_db)
        _plot_pr(curves, out_dir / "pr_curves.png", f"{encoder.card.get('name')}: finding-level PR")
        plot_files["Precision-recall per modality (finding level)"] = "pr_curves.png"
        metrics["pr_curves"] = {"recall": RECALL_GRID.tolist(), **{m: v.tolist() for m, v in curves.items()}}
        _plot_grid(queries, database, rankings, out_dir / "query_grid.jpg", encoder.eeg_render, seed=seed)
        plot_files["Queries and their top 5"] = "query_grid.jpg"
        db_emb = (
            retriever.embeddings
            if isinstance(retriever, NumpyRetriever)
            else (NumpyRetriever(encoder).embed_items(database))
        )
        groups = [
            (
                member.model_path.name,
                np.array([i for i, d in enumerate(database) if encoder.for_modality(d.modality) is member]),
            )
            for member in encoder.members()
        ]
        used = _plot_map(
            db_emb,
            [d.finding for d in database],
            out_dir / "embedding_map.png",
            map_method,
            seed,
            groups=groups if encoder.routed else None,
        )
        plot_files[f"Database embeddings, 2-D map ({used})"] = "embedding_map.png"
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(out_dir / "report.md", metrics, plot_files)
    logger.info("wrote %s", out_dir / "report.md")
    return metrics


def cross_site_evaluation(
    data_dir: str | Path,
    model_path: str | Path | None = None,
    device: str = "auto",
    database_splits: Sequence[str] = ("train", "val"),
    subset: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Finding-level mAP@10 on sources the encoder never trained on, per modality.

    For every modality whose manifest rows come from more than one ``source``: the training
    sources are those with rows in the ``train`` split; the database is their rows in
    ``database_splits`` (this modality only); the queries are every row of each other source
    (held out), and, as the in-site reference, the training sources' ``val`` rows. Modalities
    with one source are listed under ``single_source``: the data cannot test them off site.
    """
    from models.runtime import EncoderSet

    data_dir = Path(data_dir)
    records = data_mod.read_manifest(data_dir)
    encoder = EncoderSet.load(model_path, device=device)
    result: dict[str, Any] = {
        "model": {"version": encoder.version, "sha256": data_mod.sha256_file(encoder.model_path)},
        "manifest_sha256": data_mod.manifest_sha256(data_dir),
        "database": list(database_splits),
        "subset": subset,
        "ranking": "exact Euclidean within the modality, ties by database order",
        "modalities": {},
        "single_source": {},
    }
    for modality in sorted({r.modality for r in records}):
        rows = [r for r in records if r.modality == modality]
        sources = sorted({r.source for r in rows})
        trained_on = sorted({r.source for r in rows if r.split == "train"})
        if len(sources) < 2:
            result["single_source"][modality] = sources[0] if sources else ""
            continue
        database = [r for r in rows if r.source in trained_on and r.split in database_splits]
        groups = {"in-site (val)": [r for r in rows if r.source in trained_on and r.split == "val"]}
        groups.update(
            {
                source: [r for r in rows if r.source == source]
                for source in sources
                if source not in trained_on
            }
        )
        if subset:
            from models.train import select_subset

            database = select_subset(database, subset, seed + 1)
            groups = {name: select_subset(group, subset, seed) for name, group in groups.items()}
        retriever = NumpyRetriever(encoder)
        retriever.index(database)
        entry: dict[str, Any] = {"training_sources": trained_on, "n_database": len(database), "queries": {}}
        for name, queries in groups.items():
            if not queries:
                continue
            metrics, _ = evaluate_retriever(retriever, queries, database, index=False)
            finding = metrics["finding"][modality]
            entry["queries"][name] = {
                "n_queries": finding["n_queries"],  # the queries with a relevant item in the database
                "map@10": finding["map@10"],
                "precision@10": finding["precision@10"],
                "queries_without_relevant": finding["queries_without_relevant"],
            }
        result["modalities"][modality] = entry
    return result


def cross_site_lines(result: dict[str, Any]) -> list[str]:
    """The cross-site result as printable lines."""
    lines = []
    for modality, entry in result["modalities"].items():
        trained = ", ".join(entry["training_sources"])
        for name, figures in entry["queries"].items():
            value = figures["map@10"]
            shown = "n/a" if value is None else f"{value:.3f}"
            lines.append(
                f"{modality}: trained on {trained}; queries {name} ({figures['n_queries']}) mAP@10 {shown}"
            )
    lines += [
        f"{modality}: one source only ({source}); no off-site check possible with these data"
        for modality, source in result["single_source"].items()
    ]
    return lines


def summary_line(metrics: dict[str, Any]) -> str:
    finding = metrics["finding"]
    parts = [f"modality P@20 {100 * metrics['modality']['precision@20']:.2f}%"]
    parts += [
        f"{m} mAP@10 {finding[m]['map@10']:.3f}"
        for m in data_mod.MODALITIES
        if m in finding and finding[m]["map@10"] is not None
    ]
    return ", ".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with manifest.csv (default: $CBMIR_SHARED_DATA or ../shared/data)",
    )
    parser.add_argument("--queries", default="test", help="comma-separated query splits (default: test)")
    parser.add_argument("--database", default="train,val", help="comma-separated database splits")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--model", type=Path, default=None, help="ONNX encoder (default: the shipped default)"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--subset", type=int, default=None, help="at most N items per finding (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--map", default="tsne", choices=["tsne", "pca"], help="2-D map method")
    parser.add_argument(
        "--pr-depth", type=int, default=None, help="ranking depth for PR curves (default: the whole database)"
    )
    parser.add_argument(
        "--cross-site",
        action="store_true",
        help="also write cross_site.json: each modality's held-out sources against its training sources",
    )


def run(
    args: argparse.Namespace, retriever: Retriever | None = None, default_pr_depth: int | None = None
) -> int:
    """Evaluate as the arguments say (offline, or with another ``retriever``); print the summary.

    ``default_pr_depth`` is the ranking depth for PR curves when ``--pr-depth`` is not given
    (None: the whole database).
    """
    data_dir = args.data or data_mod.shared_data_dir()
    metrics = run_evaluation(
        data_dir,
        args.queries.split(","),
        args.database.split(","),
        args.out,
        model_path=args.model,
        device=args.device,
        retriever=retriever,
        subset=args.subset,
        seed=args.seed,
        plots=not args.no_plots,
        map_method=args.map,
        pr_depth=args.pr_depth or default_pr_depth,
    )
    print(summary_line(metrics))
    if getattr(args, "cross_site", False):
        cross = cross_site_evaluation(
            data_dir, args.model, args.device, args.database.split(","), args.subset
        )
        (Path(args.out) / "cross_site.json").write_text(json.dumps(cross, indent=2) + "\n")
        print("\n".join(cross_site_lines(cross)))
    if not metrics["model"]["trained"]:
        print("WARNING: untrained model; not a retrieval result")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
