"""Reference tests: every loss recomputed by a plain Python loop on tiny tensors, float32 and float64."""

import math

import pytest
import torch

from smse.losses import Objective, PairLoss, TripletLoss, class_balance, make_classification_loss, mine_triplets
from smse.losses.classification import CrossEntropy, FocalLoss, OHEMLoss, ReinforcedFocalLoss

DTYPES = [torch.float32, torch.float64]


def batch(dtype, n=7, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g, dtype=dtype)
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 1][:n])
    mags = torch.tensor([40, 100, 40, 200, 40, 40, 400][:n])
    patients = torch.tensor([1, 1, 2, 2, 3, 4, 2][:n])
    return emb, labels, mags, patients


def sqd(x, y):
    return sum((float(a) - float(b)) ** 2 for a, b in zip(x, y))


def loop_triplets(emb, labels, mags, patients, margin, cross=True, same_patient=False, strategy="all"):
    out = []
    n = len(labels)
    for a in range(n):
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            if cross and mags[p] == mags[a]:
                continue
            if same_patient and patients[p] != patients[a]:
                continue
            for q in range(n):
                if labels[q] == labels[a]:
                    continue
                dap, dan = sqd(emb[a], emb[p]), sqd(emb[a], emb[q])
                if strategy == "semihard" and not (dap < dan < dap + margin):
                    continue
                out.append(max(0.0, dap - dan + margin))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cross, same_patient", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("strategy", ["all", "semihard"])
def test_triplet_loss_matches_loop(dtype, cross, same_patient, strategy):
    emb, labels, mags, patients = batch(dtype)
    loss_fn = TripletLoss(margin=1.0, strategy=strategy, cross_magnification=cross, same_patient=same_patient)
    loss = loss_fn(emb, labels, mags, patients)
    count = loss_fn.num_tuples
    ref = loop_triplets(emb, labels, mags, patients, 1.0, cross, same_patient, strategy)
    assert count == len(ref)
    expected = sum(ref) / len(ref) if ref else 0.0
    assert math.isclose(float(loss), expected, rel_tol=1e-5 if dtype == torch.float32 else 1e-12, abs_tol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_triplets_are_hardest(dtype):
    emb, labels, mags, patients = batch(dtype)
    a, p, n = mine_triplets(emb, labels, mags, patients, "hard")
    for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist()):
        pos = [j for j in range(7) if j != ai and labels[j] == labels[ai] and mags[j] != mags[ai]]
        neg = [j for j in range(7) if labels[j] != labels[ai]]
        assert sqd(emb[ai], emb[pi]) == pytest.approx(max(sqd(emb[ai], emb[j]) for j in pos))
        assert sqd(emb[ai], emb[ni]) == pytest.approx(min(sqd(emb[ai], emb[j]) for j in neg))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cross", [True, False])
def test_pair_loss_matches_loop(dtype, cross):
    emb, labels, mags, patients = batch(dtype)
    loss_fn = PairLoss(margin=1.5, cross_magnification=cross)
    loss = loss_fn(emb, labels, mags, patients)
    count = loss_fn.num_tuples
    ref = []
    for i in range(7):
        for j in range(i + 1, 7):
            d = math.sqrt(sqd(emb[i], emb[j]))
            if labels[i] == labels[j]:
                if cross and mags[i] == mags[j]:
                    continue
                ref.append(0.5 * d * d)
            else:
                ref.append(0.5 * max(0.0, 1.5 - d) ** 2)
    assert count == len(ref)
    assert math.isclose(float(loss), sum(ref) / len(ref), rel_tol=1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_offline_tuples_and_no_valid_tuple(dtype):
    emb, labels, mags, patients = batch(dtype)
    a, p, n = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([2, 0])
    loss_fn = TripletLoss(margin=0.5)
    loss = loss_fn(emb, labels, tuples=(a, p, n))
    count = loss_fn.num_tuples
    ref = [
        max(0, sqd(emb[0], emb[1]) - sqd(emb[0], emb[2]) + 0.5),
        max(0, sqd(emb[2], emb[3]) - sqd(emb[2], emb[0]) + 0.5),
    ]
    assert count == 2 and math.isclose(float(loss), sum(ref) / 2, rel_tol=1e-5)
    same = torch.zeros(4, dtype=torch.long)
    emb4 = emb[:4].clone().requires_grad_(True)
    loss_fn = TripletLoss()
    loss = loss_fn(emb4, same, mags[:4])
    count = loss_fn.num_tuples
    assert count == 0 and loss.item() == 0.0
    loss.backward()
    assert emb4.grad is not None and float(emb4.grad.abs().sum()) == 0.0


def test_pair_loss_gradient_finite_at_zero_distance():
    emb = torch.zeros(4, 2, requires_grad=True)
    loss = PairLoss(margin=1.0, cross_magnification=False)(emb, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("loss_cls", [TripletLoss, PairLoss])
def test_metric_gradient_step_lowers_the_loss(loss_cls):
    emb = torch.tensor([[0.0, 0.0], [0.8, 0.1], [0.3, 0.0], [0.5, 0.4]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    fn = loss_cls(margin=1.0, cross_magnification=False)
    before = fn(emb, labels)
    before.backward()
    after = fn((emb - 0.05 * emb.grad).detach(), labels)
    assert after.item() < before.item()
    # with one class only, every term is a pull: a step brings all points together
    same = torch.zeros(4, dtype=torch.long)
    x = emb.detach().clone().requires_grad_(True)
    PairLoss(cross_magnification=False)(x, same).backward()
    assert torch.pdist(x - 0.1 * x.grad).sum() < torch.pdist(x).sum()


def loop_softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("dtype", DTYPES)
def test_classification_losses_match_loop(dtype):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, generator=g, dtype=dtype)
    targets = torch.tensor([0, 1, 2, 1, 1, 0])
    beta = class_balance([10, 30, 5]).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    ps = [loop_softmax(row.tolist())[t] for row, t in zip(logits, targets.tolist())]
    b = [float(beta[t]) for t in targets.tolist()]
    cases = {
        "rfl": (ReinforcedFocalLoss(beta, 2.0, 1.2), [bt * 2.0 * (1 - p) ** 1.2 for bt, p in zip(b, ps)]),
        "focal": (FocalLoss(beta, 0.25, 2.0), [-bt * 0.25 * (1 - p) ** 2.0 * math.log(p) for bt, p in zip(b, ps)]),
        "ce": (CrossEntropy(), [-math.log(p) for p in ps]),
        "balanced-ce": (CrossEntropy(beta * 3), [-3 * bt * math.log(p) for bt, p in zip(b, ps)]),
    }
    for name, (fn, ref) in cases.items():
        assert math.isclose(float(fn(logits, targets)), sum(ref) / len(ref), rel_tol=tol), name
    ohem = OHEMLoss(keep=0.5)(logits, targets)
    hardest = sorted((-math.log(p) for p in ps), reverse=True)[:3]
    assert math.isclose(float(ohem), sum(hardest) / 3, rel_tol=tol)


def test_class_balance_binary_matches_the_method():
    beta = class_balance([2480, 5429])
    assert beta[0].item() == pytest.approx(5429 / 7909) and beta[1].item() == pytest.approx(2480 / 7909)
    assert class_balance([5, 5, 10]).tolist() == pytest.approx([0.4, 0.4, 0.2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rfl_properties(dtype):
    logits = torch.tensor([[2.0, -1.0], [0.1, 0.3], [-3.0, 3.0]], dtype=dtype)
    targets = torch.tensor([0, 1, 0])
    p_t = torch.softmax(logits, 1)[torch.arange(3), targets]
    plain = ReinforcedFocalLoss(None, alpha=1.0, gamma=1.0)
    assert torch.allclose(plain.per_sample(logits, targets), 1 - p_t)
    # gamma > 1: the gradient vanishes as p_t -> 1 and stays large for hard samples
    rfl = ReinforcedFocalLoss(None, alpha=2.0, gamma=1.5)
    grads = []
    for margin in (0.0, 2.0, 6.0, 12.0):
        x = torch.tensor([[margin, 0.0]], dtype=dtype, requires_grad=True)
        rfl(x, torch.tensor([0])).backward()
        grads.append(float(x.grad.abs().sum()))
    assert grads[3] < 1e-6 < grads[0]
    assert grads == sorted(grads, reverse=True)
    hard = torch.tensor([[-6.0, 0.0]], dtype=dtype, requires_grad=True)
    rfl(hard, torch.tensor([0])).backward()
    assert float(hard.grad.abs().sum()) > 1e-3


def test_make_classification_loss_and_objective_parts():
    cls = make_classification_loss("rfl", [30, 70], alpha=2.0, gamma=1.2)
    assert torch.allclose(cls.beta, torch.tensor([0.7, 0.3]))
    assert make_classification_loss("rfl", [30, 70], balance=False).beta.numel() == 0
    emb, labels, mags, patients = batch(torch.float32)
    logits = torch.randn(7, 2)
    obj = Objective(cls, TripletLoss(), classification_weight=0.5, metric_weight=2.0)
    parts = obj(emb, logits, labels, mags, patients)
    assert set(parts) == {"classification", "metric", "total"}
    assert obj.stats()["tuples"] == obj.metric.num_tuples > 0  # a statistic, not a loss part
    assert torch.isclose(parts["total"], 0.5 * parts["classification"] + 2.0 * parts["metric"])
    only_first = obj(emb, logits, labels, mags, patients, classify=torch.tensor([0, 1]))
    assert torch.isclose(only_first["classification"], cls(logits[:2], labels[:2]))
    from smse.errors import ConfigError

    with pytest.raises(ConfigError, match="loss.classification"):
        make_classification_loss("hinge", [1, 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_triplet_agrees_with_pytorch_metric_learning(dtype):
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.reducers import MeanReducer

    emb, labels, mags, patients = batch(dtype)
    a, p, n = mine_triplets(emb, labels, mags, cross_magnification=False)
    theirs = TripletMarginLoss(
        margin=1.0, distance=LpDistance(normalize_embeddings=False, power=2), reducer=MeanReducer()
    )(emb, labels, indices_tuple=(a, p, n))
    ours = TripletLoss(margin=1.0, cross_magnification=False)(emb, labels)
    assert torch.isclose(ours, theirs.to(dtype), rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strategy", ["semihard", "hard"])
def test_miner_picks_the_tuples_pytorch_metric_learning_picks(dtype, strategy):
    """Same batch, same (squared L2) distance: our miner and PML's choose the same triplets."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.miners import BatchHardMiner, TripletMarginMiner

    from smse.losses import CrossMagnificationMiner

    g = torch.Generator().manual_seed(3)
    emb = torch.randn(24, 4, generator=g, dtype=dtype)
    labels = torch.randint(0, 3, (24,), generator=g)
    distance = LpDistance(normalize_embeddings=False, power=2)
    ours = CrossMagnificationMiner("triplet", strategy, margin=0.8, cross_magnification=False)(emb, labels)
    if strategy == "semihard":
        theirs = TripletMarginMiner(margin=0.8, type_of_triplets="semihard", distance=distance)(emb, labels)
        as_set = lambda t: set(zip(*(x.tolist() for x in t)))  # noqa: E731
        assert as_set(ours) == as_set(theirs) and len(as_set(ours)) > 10
    else:
        theirs = BatchHardMiner(distance=distance)(emb, labels)
        assert [x.tolist() for x in ours] == [x.tolist() for x in theirs]


def test_cross_magnification_miner_feeds_pml_losses():
    """Our miner in PML's place: PML's losses take its triplets and pairs, and agree with ours.

    PML's ContrastiveLoss is relu(d - pos_margin) on positives and relu(neg_margin - d) on negatives,
    on whatever distance it is given: on the squared distance with pos_margin 0 its positive terms are
    d^2, on the plain distance with neg_margin m its negative terms are max(0, m - d), so ours must be
    the mean of 1/2 PML_pos(squared) and 1/2 PML_neg(plain)^2 over the same pairs.

    Catches: a PairLoss whose negative hinge is taken on the squared distance (max(0, m - d^2)), is not
    squared, or loses the 1/2; a positive term on d instead of d^2; pairs fed to PML in another format.
    Planted and verified: the hinge on the squared distance fails the PML relation by itself (with the
    hand-written ``ref`` check removed), where the old ``isfinite`` on PML's value passed.
    """
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import ContrastiveLoss, TripletMarginLoss
    from pytorch_metric_learning.reducers import DoNothingReducer, MeanReducer

    from smse.losses import CrossMagnificationMiner

    emb, labels, mags, patients = batch(torch.float64, n=7)
    miner = CrossMagnificationMiner("triplet", "all", margin=1.0)
    triplets = miner(emb, labels, mags)
    assert miner.num_triplets == miner.num_tuples == len(triplets[0]) > 0
    assert all(mags[a] != mags[p] for a, p in zip(triplets[0].tolist(), triplets[1].tolist()))
    squared = LpDistance(normalize_embeddings=False, power=2)
    pml_triplet = TripletMarginLoss(margin=1.0, distance=squared, reducer=MeanReducer())(emb, labels, triplets)
    assert torch.isclose(pml_triplet, TripletLoss(margin=1.0)(emb, labels, mags))
    pairs = CrossMagnificationMiner("pair", "all", margin=1.0)(emb, labels, mags)
    assert len(pairs) == 4  # PML's (a1, p, a2, n)
    plain = LpDistance(normalize_embeddings=False, power=1)
    pml_pair = ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance=plain, reducer=MeanReducer())
    # PML's contrastive loss is unsquared; ours is the method's 1/2 [d^2, max(0, m - d)^2] on the same pairs
    d = lambda i, j: (emb[i] - emb[j]).norm(dim=1)  # noqa: E731
    ours = PairLoss(margin=1.0)(emb, labels, mags, tuples=pairs)
    ref = torch.cat([0.5 * d(pairs[0], pairs[1]) ** 2, 0.5 * torch.relu(1.0 - d(pairs[2], pairs[3])) ** 2]).mean()
    assert torch.isclose(ours, ref)
    # PML per pair: positives on the squared distance are d^2, negatives on the plain distance max(0, m - d);
    # margin 1.6 puts some negatives inside the hinge and some outside it
    m = 1.6
    pos = ContrastiveLoss(pos_margin=0.0, neg_margin=m, distance=squared, reducer=DoNothingReducer())(
        emb, labels, pairs
    )["pos_loss"]["losses"]
    neg = ContrastiveLoss(pos_margin=0.0, neg_margin=m, distance=plain, reducer=DoNothingReducer())(emb, labels, pairs)[
        "neg_loss"
    ]["losses"]
    assert len(pos) == len(pairs[0]) > 0 and len(neg) == len(pairs[2]) > 0
    assert (neg > 0).sum() >= 3 and (neg == 0).sum() >= 3  # both sides of the hinge are exercised
    ours = PairLoss(margin=m)(emb, labels, mags, tuples=pairs)
    assert torch.isclose(ours, torch.cat([0.5 * pos, 0.5 * neg**2]).mean(), rtol=1e-10, atol=0)
    # PML's own mean-reduced value (pos_margin 0, neg_margin 1, plain distance): mean d of the positives plus
    # mean hinge of the negatives; the same pairs and distances as ours, but another formula
    pml_mean = pml_pair(emb, labels, pairs)
    hinge = torch.relu(1.0 - d(pairs[2], pairs[3]))
    assert torch.isclose(pml_mean, pos.sqrt().mean() + hinge.mean(), rtol=1e-10)
    assert not torch.isclose(pml_mean, PairLoss(margin=1.0)(emb, labels, mags, tuples=pairs))


def loop_neighbourhood(emb, feats, t):
    """mean_i sum_j P_ij (log P_ij - log Q_ij) over j != i, cosine similarities / t, by loops."""
    n = len(emb)

    def cos(x, y):
        dot = sum(float(a) * float(b) for a, b in zip(x, y))
        return dot / math.sqrt(sum(float(a) ** 2 for a in x) * sum(float(b) ** 2 for b in y))

    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        sp = [math.exp(cos(feats[i], feats[j]) / t) for j in others]
        sq = [math.exp(cos(emb[i], emb[j]) / t) for j in others]
        p = [v / sum(sp) for v in sp]
        q = [v / sum(sq) for v in sq]
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))
    return total / n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_neighbourhood_loss_matches_loop(dtype, temperature):
    from smse.losses import NeighbourhoodLoss

    g = torch.Generator().manual_seed(3)
    emb = torch.randn(6, 3, generator=g, dtype=dtype, requires_grad=True)
    feats = torch.randn(6, 5, generator=g, dtype=dtype)
    loss = NeighbourhoodLoss(temperature)(emb, feats)
    assert math.isclose(
        float(loss.detach()),
        loop_neighbourhood(emb.detach(), feats, temperature),
        rel_tol=1e-5 if dtype == torch.float32 else 1e-10,
        abs_tol=1e-7,
    )
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    # an embedding with the features' own similarities (a scaled copy) has nothing left to learn
    same = NeighbourhoodLoss(temperature)(3.0 * feats, feats)
    assert abs(float(same)) < 1e-5
    assert float(NeighbourhoodLoss(temperature)(emb[:2].detach(), feats[:2])) == 0.0  # one neighbour: no distribution


def test_objective_adds_the_weighted_structure_term():
    from smse.losses import NeighbourhoodLoss

    emb, labels, mags, patients = batch(torch.float64)
    feats = torch.randn(len(emb), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(len(emb), 2, dtype=torch.float64)
    cls = make_classification_loss("ce", [4, 3])
    parts = Objective(cls, None, 1.0, 1.0, NeighbourhoodLoss(0.5), 2.0)(emb, logits, labels, features=feats)
    assert float(parts["total"]) == pytest.approx(float(parts["classification"]) + 2.0 * float(parts["structure"]))
    assert "structure" not in Objective(cls, None, 1.0, 1.0, NeighbourhoodLoss(0.5), 0.0)(emb, logits, labels)
    with pytest.raises(ValueError, match="features"):
        Objective(cls, None, 1.0, 1.0, NeighbourhoodLoss(0.5), 1.0)(emb, logits, labels)


@pytest.mark.parametrize("dtype", DTYPES)
def test_neighbourhood_loss_within_groups_matches_loop(dtype):
    from smse.losses import NeighbourhoodLoss

    g = torch.Generator().manual_seed(5)
    emb = torch.randn(7, 3, generator=g, dtype=dtype)
    feats = torch.randn(7, 4, generator=g, dtype=dtype)
    groups = torch.tensor([40, 40, 40, 100, 100, 100, 400])  # 400X alone: no distribution, left out
    got = float(NeighbourhoodLoss(0.5)(emb, feats, groups))
    parts = [loop_neighbourhood(emb[idx], feats[idx], 0.5) * len(idx) for idx in ([0, 1, 2], [3, 4, 5])]
    assert math.isclose(got, sum(parts) / 6, rel_tol=1e-5 if dtype == torch.float32 else 1e-10)
    everyone = torch.zeros(7, dtype=torch.long)
    assert math.isclose(
        float(NeighbourhoodLoss(0.5)(emb, feats, everyone)), float(NeighbourhoodLoss(0.5)(emb, feats)), rel_tol=1e-6
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_teacher_centred_per_magnification_matches_a_loop(dtype):
    from smse.losses import NeighbourhoodLoss
    from smse.losses.objective import centre_by_group

    g = torch.Generator().manual_seed(7)
    feats = torch.randn(6, 3, generator=g, dtype=dtype)
    mags = torch.tensor([40, 100, 40, 100, 100, 400])
    got = centre_by_group(feats, mags)
    for i in range(6):
        same = [j for j in range(6) if mags[j] == mags[i]]
        mean = [sum(float(feats[j, c]) for j in same) / len(same) for c in range(3)]
        assert got[i].tolist() == pytest.approx([float(feats[i, c]) - mean[c] for c in range(3)], abs=1e-6)
    # the objective's "centred" scope distils from the centred features
    emb, labels, _, patients = batch(dtype, n=6)
    logits = torch.zeros(6, 2, dtype=dtype)
    cls = make_classification_loss("ce", [3, 3])
    parts = Objective(cls, None, 1.0, 1.0, NeighbourhoodLoss(0.5), 1.0, "centred")(
        emb, logits, labels, mags, patients, features=feats
    )
    assert float(parts["structure"]) == pytest.approx(float(NeighbourhoodLoss(0.5)(emb, got)))
