"""Weighted kNN: a hand-computed case, any number of queries and classes, and the CLI."""
import json
import math
import pickle

import torch

from eval import knn
from common.features import knn_accuracy, knn_predict
from tests.test_eval_datasets import one_thread, random_run, unchecked, write_cifar  # noqa: F401  (fixtures)

# Cosine similarities to the query (1, 0): 1 (class 0), 0 (class 1), 1/sqrt(2) (class 1), -1 (class 0).
BANK = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]])
LABELS = torch.tensor([0, 1, 1, 0])
QUERY = torch.tensor([[5.0, 0.0]])


def test_votes_match_a_hand_computed_case():
    r = 1 / math.sqrt(2)
    scores = knn_predict(BANK, LABELS, QUERY, num_classes=3, k=3, temperature=0.07)
    expected = torch.tensor([[math.exp(1 / 0.07), math.exp(r / 0.07) + math.exp(0.0), 0.0]])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)
    # A high temperature flattens the weights and the two class-1 neighbours outvote the nearest.
    scores = knn_predict(BANK, LABELS, QUERY, num_classes=3, k=3, temperature=10.0)
    torch.testing.assert_close(scores, torch.tensor([[math.exp(0.1), math.exp(r / 10) + 1.0, 0.0]]))
    assert scores.argmax().item() == 1
    # k = 1: only the nearest votes.
    assert knn_predict(BANK, LABELS, QUERY, 3, k=1).argmax().item() == 0


def test_three_queries_more_classes_than_seen_and_k_above_the_bank():
    queries = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.05]])
    scores = knn_predict(BANK, LABELS, queries, num_classes=7, k=20)
    assert scores.shape == (3, 7) and (scores[:, 2:] == 0).all()
    assert knn_accuracy(BANK, LABELS, queries, torch.tensor([0, 1, 0]), num_classes=7, k=2) == 100.0
    assert knn_predict(BANK, LABELS, queries[:0], num_classes=7).shape == (0, 7)


def test_knn_cli_on_three_test_images(tmp_path, unchecked):
    write_cifar(tmp_path / "data", 10)
    batch = tmp_path / "data" / "cifar-10-batches-py" / "test_batch"
    test = pickle.loads(batch.read_bytes())
    batch.write_bytes(pickle.dumps({"data": test["data"][:3], "labels": test["labels"][:3]}))
    run = random_run(tmp_path)
    knn.main(["--checkpoint", str(run / "backbone.pth"), "--dataset", "cifar10", "--data-root", str(tmp_path / "data")])
    result = json.loads((run / "results" / "knn-cifar10-center-s0.json").read_text())
    assert result["eval"] == "knn" and result["num_test"] == 3 and result["num_classes"] == 10
    assert result["protocol"]["k"] == 20 and result["protocol"]["temperature"] == 0.07
    correct = result["accuracy"] * 3 / 100
    assert 0 <= correct <= 3 and abs(correct - round(correct)) < 1e-4
