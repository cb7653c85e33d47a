"""MMEB scoring against hand-made similarity matrices whose answers are known by construction."""

import pytest
import torch

from vlm2vec.mmeb_tables import MMEB_EVAL_DATASETS
from vlm2vec.scoring import (
    PAPER_RESULTS,
    aggregate,
    dataset_metrics,
    ground_truth_ranks,
    markdown_table,
    rank_candidates,
)


def test_ranks_and_metrics_of_a_hand_made_matrix():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],  # gt best -> rank 1
            [0.5, 0.6, 0.1, 0.0],  # one better -> rank 2
            [0.1, 0.2, 0.3, 0.4],  # all better -> rank 4
            [0.7, 0.7, 0.1, 0.0],  # tie with one -> strict 2, lenient 1
        ]
    )
    ranks = ground_truth_ranks(scores)
    assert ranks.strict.tolist() == [1, 2, 4, 2]
    assert ranks.lenient.tolist() == [1, 2, 4, 1]
    m = dataset_metrics(ranks)
    assert m["p_at_1"] == pytest.approx(1 / 4)
    assert m["p_at_1_ties_as_hits"] == pytest.approx(2 / 4)
    assert m["n_ties_at_top"] == 1
    assert m["hit_at_5"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 2) / 4)


def test_all_equal_scores_are_never_a_hit():
    """An encoder that maps everything to one vector must score 0, not 100 (the argmax trap)."""
    ranks = ground_truth_ranks(torch.zeros(5, 7))
    m = dataset_metrics(ranks)
    assert m["p_at_1"] == 0.0
    assert m["p_at_1_ties_as_hits"] == 1.0
    assert ranks.strict.tolist() == [7] * 5
    assert m["hit_at_5"] == 0.0


def test_label_sets_of_different_sizes():
    rows = [
        torch.tensor([0.3, 0.1]),  # 2 labels, hit
        torch.tensor([0.2, 0.9, 0.1, 0.5, 0.6, 0.7]),  # 6 labels, rank 5
        torch.tensor([1.0]),  # a single candidate is always rank 1
        torch.tensor([0.4, 0.4, 0.4]),  # three-way tie: strict 3, lenient 1
    ]
    ranks = ground_truth_ranks(rows)
    assert ranks.strict.tolist() == [1, 5, 1, 3]
    assert ranks.lenient.tolist() == [1, 5, 1, 1]
    assert ranks.n_candidates.tolist() == [2, 6, 1, 3]
    m = dataset_metrics(ranks)
    assert (m["n_candidates_min"], m["n_candidates_max"]) == (1, 6)
    assert m["hit_at_5"] == 1.0
    assert m["p_at_1"] == pytest.approx(0.5)


def test_padding_of_short_rows_never_outranks_the_ground_truth():
    """Short rows are padded internally; a negative ground-truth score must not lose to padding."""
    ranks = ground_truth_ranks([torch.tensor([-5.0, -6.0]), torch.tensor([-1.0, -2.0, -3.0, 0.5])])
    assert ranks.strict.tolist() == [1, 2]


def test_rank_candidates_matches_a_dense_reference_on_random_embeddings():
    g = torch.Generator().manual_seed(3)
    n_queries, n_unique, n_cand, dim = 37, 53, 11, 9
    queries = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=g), dim=-1)
    table = torch.nn.functional.normalize(torch.randn(n_unique, dim, generator=g), dim=-1)
    index = torch.randint(0, n_unique, (n_queries, n_cand), generator=g)
    # reference: materialise every query's candidate matrix in float64
    dense = torch.stack([table[index[i]].double() @ queries[i].double() for i in range(n_queries)])
    expected = ground_truth_ranks(dense)
    for budget in (1 << 25, n_cand * dim * 3, 1):  # one chunk, chunks of 3 queries, one query at a time
        got = rank_candidates(queries, table, index, max_gather_elements=budget)
        assert got.strict.tolist() == expected.strict.tolist()
        assert got.lenient.tolist() == expected.lenient.tolist()


def test_rank_candidates_with_ragged_lists_and_duplicate_candidates():
    table = torch.eye(4)
    queries = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    index = [[0, 1, 2], [1, 1, 3, 0, 2], [3, 2]]  # row 1 lists its ground truth twice: a tie
    ranks = rank_candidates(queries, table, index)
    assert ranks.strict.tolist() == [1, 2, 2]
    assert ranks.lenient.tolist() == [1, 1, 2]


def test_bad_scores_and_indices_raise_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        ground_truth_ranks(torch.tensor([[0.1, float("nan")]]))
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        ground_truth_ranks([torch.tensor([0.1]), torch.tensor([])])
    with pytest.raises(ValueError, match="query 1 has an empty candidate list"):
        rank_candidates(torch.ones(2, 3), torch.ones(4, 3), [[0, 1], []])
    with pytest.raises(ValueError, match="out of range"):
        rank_candidates(torch.ones(1, 3), torch.ones(4, 3), [[0, 4]])
    with pytest.raises(ValueError, match="share D"):
        rank_candidates(torch.ones(1, 3), torch.ones(4, 2), [[0, 1]])


def test_aggregation_over_the_36_mmeb_datasets():
    """Each dataset gets a distinct score; every group mean is checked against a direct computation."""
    per_dataset = {d.name: (k + 1) / 100 for k, d in enumerate(MMEB_EVAL_DATASETS)}
    meta_task = {d.name: d.meta_task for d in MMEB_EVAL_DATASETS}
    ood = {d.name: d.ood for d in MMEB_EVAL_DATASETS}
    agg = aggregate(per_dataset, meta_task, ood)
    counts = {
        "Classification": 10,
        "VQA": 10,
        "Retrieval": 12,
        "Grounding": 4,
        "IND": 20,
        "OOD": 16,
        "Overall": 36,
    }
    assert {k: v["n"] for k, v in agg.items()} == counts
    assert agg["Overall"]["mean"] == pytest.approx(sum(range(1, 37)) / 36 / 100)
    for task in ("Classification", "VQA", "Retrieval", "Grounding"):
        values = [per_dataset[d.name] for d in MMEB_EVAL_DATASETS if d.meta_task == task]
        assert agg[task]["mean"] == pytest.approx(sum(values) / len(values))
    ind = [per_dataset[d.name] for d in MMEB_EVAL_DATASETS if not d.ood]
    assert agg["IND"]["mean"] == pytest.approx(sum(ind) / 20)
    # overall is the mean over datasets, not the mean of the four meta-task means
    task_means = sum(agg[t]["mean"] for t in ("Classification", "VQA", "Retrieval", "Grounding")) / 4
    assert agg["Overall"]["mean"] != pytest.approx(task_means)


def test_aggregation_of_a_partial_set_and_unknown_datasets():
    agg = aggregate({"ImageNet-1K": 0.5, "ImageNet-A": 0.1, "Emoji": 0.9},
                    {"ImageNet-1K": "Classification", "ImageNet-A": "Classification", "Emoji": None},
                    {"ImageNet-1K": False, "ImageNet-A": True, "Emoji": None})  # fmt: skip
    assert agg["Classification"] == {"mean": pytest.approx(0.3), "n": 2}
    assert agg["IND"] == {"mean": 0.5, "n": 1} and agg["OOD"] == {"mean": 0.1, "n": 1}
    assert agg["Overall"] == {"mean": pytest.approx(0.5), "n": 3}
    assert "VQA" not in agg
    with pytest.raises(ValueError, match="meta-task 'Captioning'"):
        aggregate({"x": 0.1}, {"x": "Captioning"}, {"x": None})


def test_paper_rows_are_consistent_with_their_own_overall():
    """The reference numbers must average to their Overall (10/10/12/4 and 20/16 datasets)."""
    for label, row in PAPER_RESULTS.items():
        by_task = (
            10 * row["Classification"] + 10 * row["VQA"] + 12 * row["Retrieval"] + 4 * row["Grounding"]
        ) / 36
        by_split = (20 * row["IND"] + 16 * row["OOD"]) / 36
        assert by_task == pytest.approx(row["Overall"], abs=0.06), label
        assert by_split == pytest.approx(row["Overall"], abs=0.06), label


def test_markdown_table_layout():
    text = markdown_table({"ours": {"Retrieval": 12.345, "Overall": 50.0}})
    lines = text.strip().splitlines()
    assert lines[0] == "| Model | Classification | VQA | Retrieval | Grounding | IND | OOD | Overall |"
    assert lines[2] == "| ours | - | - | 12.3 | - | - | - | 50.0 |"
    assert len(lines) == 2 + 1 + len(PAPER_RESULTS)
    assert "| 60.1 |" in lines[3]


# ------------------------------------------------------------------ MMEB-V2, as the reference scores it
def test_reference_ranking_breaks_ties_by_candidate_order():
    from vlm2vec.scoring import reference_metrics, reference_ranking

    scores = [[0.5, 0.5, 0.1], [0.2, 0.7, 0.7], [0.3, 0.3, 0.3]]
    assert reference_ranking(scores).tolist() == [[0, 1, 2], [1, 2, 0], [0, 1, 2]]
    names = ["a", "b", "c"]
    preds = [[names[j] for j in row] for row in reference_ranking(scores)]
    # labels: a (tied first -> hit), c (tied with b, after it -> miss), b (three-way tie, after a -> miss)
    m = reference_metrics(preds, [["a"], ["c"], ["b"]], [None, None, None])
    assert m["hit_at_1"] == pytest.approx(1 / 3)
    # binary NDCG@5: 1, 1/log2(3), 1/log2(3)
    assert m["ndcg_at_5"] == m["ndcg_at_5_reference"] == pytest.approx((1 + 2 / 1.5849625) / 3, abs=1e-6)


def test_reference_ndcg_pairs_grades_with_the_deduplicated_label_order():
    from vlm2vec.scoring import reference_metrics

    # labels d1 (grade 2), d2 (grade 1); ranking d2, x, d1
    pred, labels, grades = [["d2", "x", "d1"]], [["d1", "d2"]], [[2.0, 1.0]]
    # correct: DCG = 1/log2(2) + 2/log2(4) = 2.0; IDCG = 2 + 1/log2(3) = 2.6309298
    ours = reference_metrics(pred, labels, grades, label_order=lambda ls: list(ls))
    assert ours["ndcg_at_5"] == ours["ndcg_at_5_reference"] == pytest.approx(2.0 / 2.6309298, abs=1e-6)
    # set() put d2 first: the reference pairs d2 with 2 and d1 with 1: DCG = 2 + 1/2 = 2.5
    swapped = reference_metrics(pred, labels, grades, label_order=lambda ls: list(reversed(ls)))
    assert swapped["ndcg_at_5"] == pytest.approx(2.0 / 2.6309298, abs=1e-6)
    assert swapped["ndcg_at_5_reference"] == pytest.approx(2.5 / 2.6309298, abs=1e-6)
    # the default is the reference's list(set(...)): one of the two, by the process's hash seed
    default = reference_metrics(pred, labels, grades)["ndcg_at_5_reference"]
    assert default in (pytest.approx(2.0 / 2.6309298), pytest.approx(2.5 / 2.6309298))
