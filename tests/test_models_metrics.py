"""Retrieval metrics on hand-made rankings with known answers."""

import numpy as np
import pytest

from models.metrics import (
    average_precision_at,
    finding_metrics,
    majority_vote_correct,
    modality_metrics,
    retrieval_metrics,
)
from models.retrieval import rank_euclidean


def test_average_precision_known_values():
    hits = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=bool)
    ap = average_precision_at(hits, 5, np.array([2, 3, 10, 1]))
    # q0: (1/1 + 2/3) / min(5, 2); q1: 0; q2: 1; q3: (1/2) / 1
    np.testing.assert_allclose(ap, [(1 + 2 / 3) / 2, 0.0, 1.0, 0.5])
    assert np.isnan(average_precision_at(hits[:1], 5, np.array([0]))[0])


def test_majority_vote_ties_go_to_first_ranked():
    ranked = [["a", "b", "b", "a"], ["b", "a", "a", "b"], ["c", "a", "a"]]
    assert majority_vote_correct(["a", "a", "a"], ranked, 4).tolist() == [True, False, True]


def test_modality_metrics_known_answer():
    queries = ["x", "x", "m"]
    ranked = [["x"] * 20, ["x"] * 10 + ["m"] * 10, ["x"] * 15 + ["m"] * 5]
    result = modality_metrics(queries, ranked, n_relevant=[100, 100, 50], ks=(20,))
    assert result["precision@20"] == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert result["recall@20"] == pytest.approx((20 / 100 + 10 / 100 + 5 / 50) / 3)
    # q1 ties 10/10 -> first ranked 'x' wins (correct); q2 majority 'x' (wrong)
    assert result["accuracy@20"] == pytest.approx(2 / 3)
    assert result["per_modality"]["m"]["precision@20"] == pytest.approx(0.25)
    assert result["per_modality"]["x"]["n_queries"] == 2


def test_finding_metrics_skip_queries_without_relevant_items():
    result = finding_metrics(
        ["oct", "oct", "xray"],
        ["oct/cnv", "oct/dme", "xray/normal"],
        [
            ["oct/cnv"] * 5,
            ["oct/cnv"] * 5,
            ["xray/viral", "xray/normal", "xray/normal", "oct/cnv", "xray/normal"],
        ],
        n_relevant=[10, 0, 3],
        ks=(5,),
    )
    assert result["oct"]["precision@5"] == 1.0 and result["oct"]["map@5"] == 1.0
    assert result["oct"]["n_queries"] == 1 and result["oct"]["queries_without_relevant"] == 1
    assert result["xray"]["precision@5"] == pytest.approx(3 / 5)
    assert result["xray"]["map@5"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    assert result["overall"]["map@5"] == pytest.approx((1 + (1 / 2 + 2 / 3 + 3 / 5) / 3) / 2)
    assert result["macro"]["precision@5"] == pytest.approx((1 + 3 / 5) / 2)


def test_retrieval_metrics_from_indices_excludes_self_from_relevant_counts():
    db_mod = ["xray", "xray", "mri", "mri"]
    db_lab = ["normal", "viral", "glioma", "glioma"]
    # query 0 is database item 2 (mri/glioma): its only other relevant item is 3
    result = retrieval_metrics(["mri"], ["glioma"], db_mod, db_lab, [[3, 0, 1]], query_in_database=[2])
    finding = result["finding"]["mri"]
    assert finding["precision@5"] == pytest.approx(1 / 5)
    assert finding["map@5"] == 1.0  # R = 1 and it is ranked first
    assert result["modality"]["recall@20"] == 1.0


def test_rank_euclidean_excludes_self_and_breaks_ties_by_order():
    db = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    order = rank_euclidean(db[:2], db, k=3, exclude=[0, None])
    assert order[0].tolist() == [1, 2, 3]  # 1 and 2 tie at distance 1: database order
    assert order[1].tolist() == [1, 0, 2]
