"""Retrieval metrics on rankings (pure numpy).

Inputs are, per query, its modality and finding label, and the ranked list of database items
(best first) with theirs, plus how many database items are relevant to it. The query itself
must not be in its own ranking.

**Modality level** (relevant = same modality), k in 20, 40, 60, 80, 100. The paper's formulas
can be read several ways; we use:

* ``precision@k`` -- standard IR precision: hits in the top k divided by k, averaged over
  queries. A ranking shorter than k counts the missing places as misses.
* ``recall@k`` -- standard IR recall: hits in the top k divided by the number of relevant items
  in the database, averaged over queries. At modality level the database holds thousands of
  items per modality, so this is bounded by k / |relevant| and is small by construction; it is
  reported as defined rather than redefined into a second precision.
* ``accuracy@k`` -- top-k majority vote: a query counts as correct when the most frequent
  modality among its top k is its own (ties go to the modality ranked first). The literal
  (TP + TN) / N reading is dominated by true negatives and says nothing, so we use the
  classification reading, which answers "does the top k identify the query's modality?".

**Finding level** (relevant = same modality *and* same label; the ranking is over the whole
database, so a neighbour from another modality is a miss), k in 5, 10, 20:

* ``precision@k`` as above;
* ``map@k`` -- mean over queries of AP@k = (1 / min(k, R)) * sum_{i<=k} P@i * rel_i, with R the
  number of relevant items in the database (a perfect top k scores 1);
* queries with R = 0 (a finding absent from the database, e.g. OCT DME/DRUSEN in test) have no
  defined AP; they are left out of the finding-level means and counted in
  ``queries_without_relevant``.

Every metric is given per modality (mean over that modality's queries) and ``overall`` (mean
over all queries). Finding level also has ``macro`` (mean of the four modality values).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

MODALITY_KS = (20, 40, 60, 80, 100)
FINDING_KS = (5, 10, 20)


def hits_matrix(
    query_values: Sequence[Any] | np.ndarray, ranked_values: Sequence[Sequence[Any]], depth: int
) -> np.ndarray:
    """bool ``(Q, depth)``: ranked item i of query q has the query's value (padded with False)."""
    hits = np.zeros((len(query_values), depth), dtype=bool)
    for q, (value, ranked) in enumerate(zip(query_values, ranked_values, strict=True)):
        row = list(ranked[:depth])
        hits[q, : len(row)] = [item == value for item in row]
    return hits


def precision_at(hits: np.ndarray, k: int) -> np.ndarray:
    return hits[:, :k].sum(axis=1) / float(k)


def recall_at(hits: np.ndarray, k: int, n_relevant: np.ndarray) -> np.ndarray:
    n_relevant = np.asarray(n_relevant, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n_relevant > 0, hits[:, :k].sum(axis=1) / n_relevant, np.nan)


def average_precision_at(hits: np.ndarray, k: int, n_relevant: np.ndarray) -> np.ndarray:
    """AP@k per query, normalised by min(k, R); NaN where R = 0."""
    top = hits[:, :k].astype(np.float64)
    if top.shape[1] < k:
        top = np.pad(top, ((0, 0), (0, k - top.shape[1])))
    precision_i = np.cumsum(top, axis=1) / np.arange(1, k + 1)
    n_relevant = np.asarray(n_relevant, dtype=np.float64)
    denom = np.minimum(k, n_relevant)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, (precision_i * top).sum(axis=1) / denom, np.nan)


def majority_vote_correct(
    query_values: Sequence[Any] | np.ndarray, ranked_values: Sequence[Sequence[Any]], k: int
) -> np.ndarray:
    """bool per query: the most frequent value in the top k is the query's (ties: ranked first)."""
    correct = np.zeros(len(query_values), dtype=bool)
    for q, (value, ranked) in enumerate(zip(query_values, ranked_values, strict=True)):
        top = list(ranked[:k])
        if not top:
            continue
        counts: dict = {}
        for item in top:
            counts[item] = counts.get(item, 0) + 1
        best = max(counts.values())
        winner = next(item for item in top if counts[item] == best)
        correct[q] = winner == value
    return correct


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)] if values.dtype.kind == "f" else values
    return float(np.mean(values)) if values.size else None


def modality_metrics(
    query_modalities: Sequence[str],
    ranked_modalities: Sequence[Sequence[str]],
    n_relevant: Sequence[int] | np.ndarray,
    ks: Sequence[int] = MODALITY_KS,
) -> dict[str, Any]:
    """Modality-level accuracy/precision/recall@k, overall and ``per_modality``."""
    modality_of = np.asarray(query_modalities)
    relevant = np.asarray(n_relevant)
    hits = hits_matrix(modality_of, ranked_modalities, max(ks))
    per_query = {}
    for k in ks:
        per_query[f"accuracy@{k}"] = majority_vote_correct(modality_of, ranked_modalities, k).astype(float)
        per_query[f"precision@{k}"] = precision_at(hits, k)
        per_query[f"recall@{k}"] = recall_at(hits, k, relevant)
    result: dict[str, Any] = {name: _mean(values) for name, values in per_query.items()}
    result["n_queries"] = len(modality_of)
    result["per_modality"] = {}
    for modality in sorted(set(modality_of.tolist())):
        mask = modality_of == modality
        entry = {name: _mean(values[mask]) for name, values in per_query.items()}
        entry["n_queries"] = int(mask.sum())
        result["per_modality"][modality] = entry
    return result


def finding_metrics(
    query_modalities: Sequence[str],
    query_findings: Sequence[str],
    ranked_findings: Sequence[Sequence[str]],
    n_relevant: Sequence[int] | np.ndarray,
    ks: Sequence[int] = FINDING_KS,
) -> dict[str, Any]:
    """Finding-level P@k and mAP@k per modality, ``overall`` and ``macro``.

    ``query_findings`` / ``ranked_findings`` must be modality-qualified (``"xray/normal"``) so
    that equal labels in different modalities never match.
    """
    modality_of = np.asarray(query_modalities)
    relevant = np.asarray(n_relevant)
    hits = hits_matrix(query_findings, ranked_findings, max(ks))
    eligible = relevant > 0
    per_query = {}
    for k in ks:
        per_query[f"precision@{k}"] = np.where(eligible, precision_at(hits, k), np.nan)
        per_query[f"map@{k}"] = average_precision_at(hits, k, relevant)

    def summary(mask: np.ndarray) -> dict[str, Any]:
        entry = {name: _mean(values[mask]) for name, values in per_query.items()}
        entry["n_queries"] = int((mask & eligible).sum())
        entry["queries_without_relevant"] = int((mask & ~eligible).sum())
        return entry

    result: dict[str, Any] = {}
    modalities = sorted(set(modality_of.tolist()))
    for modality in modalities:
        result[modality] = summary(modality_of == modality)
    result["overall"] = summary(np.ones(len(modality_of), dtype=bool))
    macro = {}
    for name in per_query:
        values = [result[m][name] for m in modalities if result[m][name] is not None]
        macro[name] = float(np.mean(values)) if values else None
    result["macro"] = macro
    return result


def retrieval_metrics(
    query_modalities: Sequence[str],
    query_labels: Sequence[str],
    database_modalities: Sequence[str],
    database_labels: Sequence[str],
    rankings: Sequence[Sequence[int]],
    query_in_database: Sequence[int | None] | None = None,
) -> dict[str, Any]:
    """Both levels from index rankings into the database.

    ``rankings[q]`` lists database indices, best first, at least 100 deep where the database
    allows, never containing the query itself. ``query_in_database[q]`` is the database index of
    the query when the query is also a database item (it is then not counted as relevant), else
    None.
    """
    db_mod = np.asarray(database_modalities)
    db_find = np.asarray([f"{m}/{lab}" for m, lab in zip(database_modalities, database_labels, strict=True)])
    q_find = [f"{m}/{lab}" for m, lab in zip(query_modalities, query_labels, strict=True)]
    mod_count = {m: int((db_mod == m).sum()) for m in set(db_mod.tolist())}
    find_count = {f: int((db_find == f).sum()) for f in set(db_find.tolist())}
    n_rel_mod = np.array([mod_count.get(m, 0) for m in query_modalities])
    n_rel_find = np.array([find_count.get(f, 0) for f in q_find])
    if query_in_database is not None:
        for q, idx in enumerate(query_in_database):
            if idx is not None:
                n_rel_mod[q] -= int(db_mod[idx] == query_modalities[q])
                n_rel_find[q] -= int(db_find[idx] == q_find[q])
    ranked_mod = [db_mod[np.asarray(r, dtype=np.int64)].tolist() for r in rankings]
    ranked_find = [db_find[np.asarray(r, dtype=np.int64)].tolist() for r in rankings]
    return {
        "modality": modality_metrics(query_modalities, ranked_mod, n_rel_mod),
        "finding": finding_metrics(query_modalities, q_find, ranked_find, n_rel_find),
    }
