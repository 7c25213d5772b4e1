"""minirl.metrics against direct enumeration on small random cases (explicit seeds).

Each metric is recomputed here the slow, obvious way (all k-subsets, a loop per group, the
documented formula written out) for many small shapes, so a refactor that moves a boundary,
a denominator or an index shows up even where the hand-made cases of test_metrics.py agree.
"""
import collections
import itertools
import math

import numpy as np
import pytest

from minirl import metrics as M


def random_rows(rng, P, n, alphabet="ABC", none_rate=0.2):
    """P rows of n answers (letters or None) and a per-sample verdict: "A" is right, except
    that a few "B" samples are graded right too (a grader timeout can split a class)."""
    rows, correct = [], []
    for _ in range(P):
        row = [None if rng.random() < none_rate else str(rng.choice(list(alphabet))) for _ in range(n)]
        rows.append(row)
        correct.append([a == "A" or (a == "B" and rng.random() < 0.5) for a in row])
    return rows, np.array(correct)


def brute_classes(row, good_row):
    """{answer: (count, class correct)}: a class is correct when at least half its samples are."""
    votes = collections.Counter(a for a in row if a is not None)
    right = collections.Counter(a for a, g in zip(row, good_row) if a is not None and g)
    return {a: (c, 2 * right[a] >= c) for a, c in votes.items()}


def brute_maj(row, classes, k):
    """maj@k of one problem: the mean over all k-subsets of the shared-tie vote credit."""
    total, subsets = 0.0, list(itertools.combinations(range(len(row)), k))
    for sub in subsets:
        votes = collections.Counter(row[i] for i in sub if row[i] is not None)
        if votes:
            top = max(votes.values())
            tied = [a for a, v in votes.items() if v == top]
            total += sum(classes[a][1] for a in tied) / len(tied)
    return total / len(subsets)


def test_pass_at_k_is_the_fraction_of_k_subsets_with_a_correct_sample():
    for n in range(1, 8):
        for c in range(n + 1):
            sample = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(sample, k))
                want = sum(any(s) for s in subsets) / len(subsets)
                assert M.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)


def test_default_ks_for_every_n():
    for n in range(1, 70):
        want = sorted({2 ** i for i in range(8) if 2 ** i <= n} | {n})
        assert M.default_ks(n) == want, n


def test_answer_classes_counts_and_half_correct_rule():
    rng = np.random.default_rng(0)
    for n in (1, 2, 4, 5):
        rows, correct = random_rows(rng, 30, n)
        cl = M.answer_classes(rows, correct)
        for p, row in enumerate(rows):
            want = brute_classes(row, correct[p])
            firsts = list(dict.fromkeys(a for a in row if a is not None))  # class ids: first appearance
            assert [(cl.counts[p, j], bool(cl.correct[p, j])) for j in range(len(firsts))] == \
                [want[a] for a in firsts]
            assert cl.counts[p, len(firsts):].sum() == 0 and cl.none[p] == row.count(None)
    # A class with exactly half of its samples graded right counts as right.
    cl = M.answer_classes([["A", "A", "B"]], np.array([[True, False, False]]))
    assert cl.correct[0].tolist() == [True, False, False]


def test_maj_at_k_equals_enumeration_of_all_subsets():
    rng = np.random.default_rng(1)
    for n in (2, 3, 4, 6):
        rows, correct = random_rows(rng, 12, n, alphabet="AABC")
        # Ties and "no answer" on purpose: a 2-2 tie, a lone answer among None, all None.
        rows += [["A", "B"] * (n // 2) + ["C"] * (n % 2), [None] * (n - 1) + ["A"], [None] * n]
        correct = np.concatenate([correct, [[a == "A" for a in r] for r in rows[-3:]]])
        cl = M.answer_classes(rows, correct)
        for k in range(1, n + 1):
            want = [brute_maj(row, brute_classes(row, g), k) for row, g in zip(rows, correct)]
            got = M.maj_at_k(cl, k, draws=4000, seed=2)
            # k = 1, k = n and the closed forms are exact; the rest is Monte Carlo (SE <= 0.008).
            tol = 1e-12 if k in (1, n) else 0.04
            np.testing.assert_allclose(got, want, atol=tol, err_msg=f"n={n} k={k}")


def test_maj_at_k_closed_form_with_missing_answers():
    # Every answer correct: maj@k is the chance that some sample of the k has an answer.
    rows = [["A", None, None, "A", None, None]]
    cl = M.answer_classes(rows, np.array([[a == "A" for a in rows[0]]]))
    for k in range(1, 7):
        want = brute_maj(rows[0], {"A": (2, True)}, k)
        assert M.maj_at_k(cl, k)[0] == pytest.approx(want, abs=1e-12), k


def test_answer_entropy_is_the_entropy_of_the_answer_distribution():
    rng = np.random.default_rng(3)
    rows, correct = random_rows(rng, 40, 7, alphabet="ABCD", none_rate=0.3)
    cl = M.answer_classes(rows, correct)

    def entropy(values):
        c = collections.Counter(values)
        total = sum(c.values())
        return -sum(v / total * math.log(v / total) for v in c.values()) if total else 0.0

    np.testing.assert_allclose(M.answer_entropy(cl), [entropy(r) for r in rows], atol=1e-12)  # None: an outcome
    np.testing.assert_allclose(M.answer_entropy(cl, include_none=False),
                               [entropy([a for a in r if a is not None]) for r in rows], atol=1e-12)


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95])
def test_bootstrap_interval_is_the_percentile_of_resampled_means(confidence):
    rng = np.random.default_rng(4)
    v = rng.random((23, 3))
    mean, low, high = M.bootstrap_ci(v, 500, seed=7, confidence=confidence)
    idx = np.random.default_rng(7).integers(0, 23, size=(500, 23))   # the documented resamples
    means = v[idx].mean(1)                                              # [500, 3]
    a = (1 - confidence) / 2
    np.testing.assert_allclose(mean, v.mean(0), rtol=1e-12)
    np.testing.assert_allclose(low, np.quantile(means, a, axis=0), rtol=1e-10)
    np.testing.assert_allclose(high, np.quantile(means, 1 - a, axis=0), rtol=1e-10)


def test_ratio_bootstrap_uses_the_same_draws_as_bootstrap_ci():
    rng = np.random.default_rng(5)
    num = rng.integers(0, 9, 17).astype(float)
    for seed in (0, 11):
        # With every denominator 1, the ratio of sums is the mean: the two intervals coincide.
        rate, low, high = M.ratio_bootstrap_ci(num, np.ones(17), 400, seed=seed, confidence=0.8, scale=1.0)
        assert (rate, low, high) == pytest.approx(M.bootstrap_ci(num, 400, seed=seed, confidence=0.8), rel=1e-12)


def ceil_div(a, b):
    return -(-a // b)


@pytest.mark.parametrize("edges", [M.PAPER_BIN_EDGES, (0, 4, 16, 32, 64, 128, 192, 256)])
def test_difficulty_bins_follow_the_scaling_rule_for_every_n(edges):
    for n in list(range(1, 300)) + [511, 512, 1000]:
        uppers = sorted({0, n} | {min(n, max(1, ceil_div(e * n, 256))) for e in edges if e > 0})
        want = [(0, 0)] + [(lo + 1, hi) for lo, hi in zip(uppers, uppers[1:])]
        assert M.difficulty_bins(n, edges=edges) == want, n


def test_assign_bins_and_transitions_by_enumeration():
    rng = np.random.default_rng(6)
    for n in (1, 3, 8, 20):
        bins = M.difficulty_bins(n)
        a, b = rng.integers(0, n + 1, 50), rng.integers(0, n + 1, 50)
        ia, ib = M.assign_bins(a, bins), M.assign_bins(b, bins)
        for c, i in zip(np.concatenate([a, b]), np.concatenate([ia, ib])):
            assert bins[i][0] <= c <= bins[i][1]
        counts, frac = M.transition_matrix(ia, ib, len(bins))
        for i in range(len(bins)):
            row = [sum(1 for x, y in zip(ia, ib) if x == i and y == j) for j in range(len(bins))]
            assert counts[i].tolist() == row
            np.testing.assert_allclose(frac[i], np.array(row) / sum(row) if sum(row) else 0.0)


def test_group_means_by_enumeration():
    rng = np.random.default_rng(8)
    values = rng.integers(1, 50, (9, 4)).astype(float)
    correct = rng.random((9, 4)) < 0.4
    groups = np.array([0, 2, 2, 0, 1, 2, 0, 0, 2])  # group 3 is empty
    r = M.response_means(values, correct, groups, 4)
    for g in range(4):
        for key, keep in (("all", np.ones_like(correct)), ("correct", correct), ("incorrect", ~correct)):
            picked = [values[p, j] for p in range(9) for j in range(4) if groups[p] == g and keep[p, j]]
            want = np.mean(picked) if picked else np.nan
            np.testing.assert_allclose(r[key][g], want, err_msg=f"{key} group {g}")
    ch = M.success_change_by_group(correct, ~correct, groups, 4)
    for g in range(3):
        rate = [correct[p].mean() for p in range(9) if groups[p] == g]
        assert ch["num_problems"][g] == len(rate)
        assert ch["reference"][g] == pytest.approx(np.mean(rate))
        assert ch["change"][g] == pytest.approx(np.mean([1 - x for x in rate]) - np.mean(rate))


def test_word_log_ratios_by_formula():
    rng = np.random.default_rng(9)
    words = ["w%d" % i for i in range(12)]
    ref = collections.Counter({w: int(c) for w, c in zip(words, rng.integers(0, 30, 12)) if c})
    other = collections.Counter({w: int(c) for w, c in zip(words, rng.integers(0, 30, 12)) if c})
    r = M.word_log_ratios(ref, other, alpha=0.5, min_count=10, top=50)
    V = len(set(ref) | set(other))
    Nr, No = sum(ref.values()), sum(other.values())
    for row in r["over_used"] + r["under_used"]:
        w = row["word"]
        want = math.log((other[w] + 0.5) / (No + 0.5 * V)) - math.log((ref[w] + 0.5) / (Nr + 0.5 * V))
        assert row["log_ratio"] == pytest.approx(want, rel=1e-12)
        assert ref[w] + other[w] >= 10
    assert all(x["log_ratio"] > 0 for x in r["over_used"]) and all(x["log_ratio"] < 0 for x in r["under_used"])
