"""The similarity-matrix losses' references against explicit loops over the definitions (float64),
their edge cases (N = 1, anchors without positives, duplicated rows) and their bad-input errors."""

import math

import pytest
import torch

from llkern.reference.similarity import (
    default_sigma,
    info_nce_reference,
    label_gram,
    renyi_entropy_reference,
    renyi_mutual_information_reference,
    supcon_reference,
)


def unit_rows(z):
    return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in z]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def info_nce_loop(z1, z2, tau, symmetric, normalize):
    a = unit_rows(z1.tolist()) if normalize else z1.tolist()
    b = unit_rows(z2.tolist()) if normalize else z2.tolist()
    n = len(a)
    s = [[dot(a[i], b[j]) / tau for j in range(n)] for i in range(n)]
    rows = sum(lse(s[i]) - s[i][i] for i in range(n)) / n
    if not symmetric:
        return rows
    columns = sum(lse([s[i][j] for i in range(n)]) - s[j][j] for j in range(n)) / n
    return 0.5 * (rows + columns)


def supcon_loop(z, labels, tau):
    a = unit_rows(z.tolist())
    y = labels.tolist()
    n = len(a)
    total, anchors = 0.0, 0
    for i in range(n):
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        if not positives:
            continue
        others = [dot(a[i], a[k]) / tau for k in range(n) if k != i]
        total += -sum(dot(a[i], a[p]) / tau - lse(others) for p in positives) / len(positives)
        anchors += 1
    return total / anchors if anchors else 0.0


@pytest.mark.parametrize("n,d", [(1, 3), (7, 1), (7, 5), (33, 8)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_info_nce_matches_loops(n, d, symmetric, normalize):
    torch.manual_seed(n * 10 + d)
    z1, z2 = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    got = info_nce_reference(z1, z2, 0.3, symmetric=symmetric, normalize=normalize)
    assert got.item() == pytest.approx(info_nce_loop(z1, z2, 0.3, symmetric, normalize), rel=1e-12, abs=1e-12)


def test_info_nce_single_pair_is_zero():
    z1, z2 = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    assert info_nce_reference(z1, z2, symmetric=True).item() == 0.0


@pytest.mark.parametrize("n", [2, 7, 33])
def test_supcon_matches_loops(n):
    torch.manual_seed(n)
    z = torch.randn(n, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,))
    labels[0] = 99  # an anchor with no positive partner
    got = supcon_reference(z, labels, 0.2)
    assert got.item() == pytest.approx(supcon_loop(z, labels, 0.2), rel=1e-12, abs=1e-12)


def test_supcon_without_any_positive_is_zero_with_zero_gradient():
    for n in (1, 5):
        z = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
        loss = supcon_reference(z, torch.arange(n), 0.1)
        (grad,) = torch.autograd.grad(loss, z)
        assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_supcon_duplicated_rows_are_ordinary_rows():
    torch.manual_seed(1)
    z = torch.randn(4, 3, dtype=torch.float64)
    z = torch.cat([z, z[:2]])  # rows 4, 5 duplicate rows 0, 1
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    assert supcon_reference(z, labels, 0.5).item() == pytest.approx(supcon_loop(z, labels, 0.5), rel=1e-12)


def test_low_temperature_is_finite():
    torch.manual_seed(2)
    z1, z2 = torch.randn(64, 16), torch.randn(64, 16)
    labels = torch.randint(0, 4, (64,))
    for loss in (info_nce_reference(z1, z2, 0.01, symmetric=True), supcon_reference(z1, labels, 0.01)):
        assert torch.isfinite(loss)


def test_renyi_order_two_matches_eigenvalues_and_explicit_gram():
    torch.manual_seed(3)
    t = torch.randn(9, 4, dtype=torch.float64)
    sigma = 1.3
    gram = torch.tensor([[math.exp(-sum((a - b) ** 2 for a, b in zip(t[i].tolist(), t[j].tolist(), strict=True))
                                   / (2 * sigma**2)) for j in range(9)] for i in range(9)], dtype=torch.float64)
    eigenvalues = torch.linalg.eigvalsh(gram / gram.trace())
    by_eigen = -math.log2(float((eigenvalues**2).sum()))
    assert renyi_entropy_reference(gram).item() == pytest.approx(by_eigen, rel=1e-12)
    # general alpha goes through the eigenvalues
    by_eigen3 = math.log2(float((eigenvalues.clamp_min(0) ** 3).sum())) / (1 - 3)
    assert renyi_entropy_reference(gram, alpha=3.0).item() == pytest.approx(by_eigen3, rel=1e-12)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    b = label_gram(labels)
    expected = (renyi_entropy_reference(gram) + renyi_entropy_reference(b)
                - renyi_entropy_reference(gram * b)).item()
    got = renyi_mutual_information_reference(t, labels, sigma=sigma).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_renyi_mutual_information_of_the_labels_themselves_is_their_entropy():
    # t = one-hot labels with a tiny kernel width: A = B, A∘B = B, so I(T; Y) = S(B).
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 0, 3])
    t = torch.nn.functional.one_hot(labels).double()
    counts = torch.bincount(labels).double() / labels.numel()
    label_entropy = -math.log2(float((counts**2).sum()))  # Rényi-2 entropy of the label frequencies
    got = renyi_mutual_information_reference(t, labels, sigma=0.05).item()
    assert got == pytest.approx(label_entropy, rel=1e-9)


def test_default_sigma_follows_silverman():
    torch.manual_seed(4)
    t = torch.randn(100, 3, dtype=torch.float64) * 2.0
    spread = math.sqrt(float(t.var(dim=0, unbiased=False).mean()))
    assert default_sigma(t) == pytest.approx(spread * (4 / 5) ** (1 / 7) * 100 ** (-1 / 7))
    assert default_sigma(torch.zeros(1, 3)) == pytest.approx((4 / 5) ** (1 / 7))


def test_references_are_differentiable():
    torch.manual_seed(5)
    z1 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2])
    assert torch.autograd.gradcheck(lambda a, b: info_nce_reference(a, b, 0.5, symmetric=True), (z1, z2))
    assert torch.autograd.gradcheck(lambda a: supcon_reference(a, labels, 0.5), (z1,))
    assert torch.autograd.gradcheck(lambda a: renyi_mutual_information_reference(a, labels, sigma=1.0), (z1,))


@pytest.mark.parametrize("call,error,match", [
    (lambda: info_nce_reference(torch.randn(4, 3), torch.randn(5, 3)), ValueError, "same shape"),
    (lambda: info_nce_reference(torch.randn(4, 0), torch.randn(4, 0)), ValueError, "d >= 1"),
    (lambda: info_nce_reference(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "non-empty batch"),
    (lambda: info_nce_reference(torch.randn(4), torch.randn(4)), ValueError, "shape \\(N, d\\)"),
    (lambda: info_nce_reference(torch.randn(4, 3), torch.randn(4, 3), 0.0), ValueError, "temperature"),
    (lambda: info_nce_reference(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2)), ValueError, "NaN"),
    (lambda: info_nce_reference(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2)), TypeError, "floating"),
    (lambda: supcon_reference(torch.randn(4, 3), torch.tensor([0.0, 1.0, 0.0, 1.0])), TypeError, "integer labels"),
    (lambda: supcon_reference(torch.randn(4, 3), torch.tensor([0, 1])), ValueError, "labels of shape"),
    (lambda: supcon_reference(torch.randn(4, 3), [0, 1, 0, 1]), TypeError, "labels to be a Tensor"),
    (lambda: renyi_mutual_information_reference(torch.randn(4, 3), torch.arange(4), sigma=-1.0), ValueError,
     "sigma"),
    (lambda: renyi_mutual_information_reference(torch.full((3, 2), float("inf")), torch.arange(3)), ValueError,
     "infinite"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
