"""smog_train/probes.py: weighted kNN against a slow loop oracle, exact percentages, top-k counts, and
the linear probe on cached features (learns, is deterministic, starts and schedules as the protocol says)."""

import math

import pytest
import torch

from smog_train import probes

# ---------------------------------------------------------------- kNN against a slow oracle


def oracle_knn(train_f, train_y, test_f, n_classes, k, T):
    """Plain loops in float64: cosine similarity, k most similar, class votes sum exp(sim / T)."""
    tr = [[float(v) for v in row / row.norm()] for row in train_f.double()]
    preds = []
    for q in test_f.double():
        q = [float(v) for v in q / q.norm()]
        sims = sorted(
            ((sum(a * b for a, b in zip(q, t)), i) for i, t in enumerate(tr)), reverse=True
        )
        votes = [0.0] * n_classes
        for s, i in sims[: min(k, len(tr))]:
            votes[int(train_y[i])] += math.exp(s / T)
        preds.append(max(range(n_classes), key=lambda c: (votes[c], -c)))  # ties: lowest class
    return torch.tensor(preds)


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_knn_predict_matches_loop_oracle(chunk):
    g = torch.Generator().manual_seed(chunk)
    n, m, d, C = 60, 23, 6, 5  # test set larger than every chunk
    train_f, test_f = (
        torch.randn(n, d, generator=g),
        torch.randn(m, d, generator=g) * 3,
    )  # norms vary
    train_y = torch.randint(0, C, (n,), generator=g)
    ks = (1, 3, 10, 20, 60, 200)  # 200 > n: capped at n
    got = probes.knn_predict(train_f, train_y, test_f, C, ks=ks, T=0.07, chunk=chunk)
    for k in ks:
        assert torch.equal(got[k], oracle_knn(train_f, train_y, test_f, C, k, 0.07)), k
    # k=1 is nearest-neighbour classification whatever T is; a huge T is an unweighted majority vote
    assert torch.equal(
        probes.knn_predict(train_f, train_y, test_f, C, ks=(5,), T=1e4, chunk=chunk)[5],
        oracle_knn(train_f, train_y, test_f, C, 5, 1e4),
    )


def test_knn_eval_percentages():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(50, 4, generator=g), torch.randn(31, 4, generator=g)
    train_y, test_y = (
        torch.randint(0, 3, (50,), generator=g),
        torch.randint(0, 3, (31,), generator=g),
    )
    res = probes.knn_eval(train_f, train_y, test_f, test_y, 3, ks=(1, 10), T=0.1)
    for k in (1, 10):
        want = 100.0 * float((oracle_knn(train_f, train_y, test_f, 3, k, 0.1) == test_y).sum()) / 31
        assert res[k] == pytest.approx(want, abs=1e-9)
    assert (
        probes.knn_eval(test_f, test_y, test_f, test_y, 3, ks=(1,))[1] == 100.0
    )  # every point is its own neighbour


def test_topk_correct_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    y = torch.tensor([1, 2, 0])
    # row 0: top-1 hit; row 1: label 2 ranks 3rd; row 2: label 0 ranks 3rd; top-5 capped at 3 classes
    assert probes.topk_correct(logits, y, ks=(1, 2, 5)).tolist() == [1.0, 1.0, 3.0]


# ---------------------------------------------------------------- linear probe on cached features


def _clusters(n, C, d, sep, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, d, generator=torch.Generator().manual_seed(99)) * sep
    y = torch.randint(0, C, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def test_linear_probe_features_learns_and_is_deterministic():
    C = 8
    (trf, trl), (tef, tel) = _clusters(600, C, 16, 1.5, 0), _clusters(300, C, 16, 1.5, 1)
    a = probes.linear_probe_features(trf, trl, tef, tel, C, epochs=15, batch_size=64)
    b = probes.linear_probe_features(trf, trl, tef, tel, C, epochs=15, batch_size=64)
    assert a == b  # seeded: bit-identical reruns
    assert a["top1"] > 90 and a["top5"] >= a["top1"] and a["best_top1"] >= a["top1"]
    assert len(a["top1_history"]) == 15 and a["best_top1"] == max(a["top1_history"])
    # shuffled training labels carry no information: chance level (12.5 %), far from the above
    shuffled = trl[torch.randperm(len(trl), generator=torch.Generator().manual_seed(3))]
    c = probes.linear_probe_features(trf, shuffled, tef, tel, C, epochs=15, batch_size=64)
    assert c["top1"] < 35
    # the layer starts at N(0, 0.01) with zero bias and the lr follows a cosine to 0
    head = probes.new_linear(16, C, seed=0)
    assert torch.all(head.bias == 0) and 0.007 < float(head.weight.detach().std()) < 0.013
    assert probes.cosine_lr(0.3, 0, 100) == 0.3 and probes.cosine_lr(0.3, 50, 100) == pytest.approx(
        0.15
    )
    assert probes.cosine_lr(0.3, 99, 100) < 1e-3
