"""minirl.metrics: pass@k, maj@k, entropy, bootstrap, bins, transitions, text counts."""
import collections
import itertools
import math

import numpy as np
import pytest

from minirl import metrics as M
from minirl.common import MinirlError


# --------------------------------------------------------------------------- pass@k

def exact_pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 20, 64, 100, 256])
def test_pass_at_k_equals_combinatorial_value(n):
    counts = np.arange(n + 1)
    for k in sorted(k for k in {1, 2, 3, n // 3 or 1, n // 2 or 1, n - 1 or 1, n} if k <= n):
        got = M.pass_at_k(n, counts, k)
        want = np.array([exact_pass_at_k(n, c, k) for c in counts])
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13, err_msg=f"n={n} k={k}")
        assert got[0] == 0.0
        assert np.all(got[counts > n - k] == 1.0)  # exactly 1 once a failure-only draw is impossible


def test_pass_at_k_scalar_and_monotone():
    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert isinstance(M.pass_at_k(10, 3, 1), float)
    curve = [M.pass_at_k(256, 5, k) for k in M.default_ks(256)]
    assert all(a < b for a, b in zip(curve, curve[1:-1]))


def test_pass_at_k_is_unbiased():
    # For a problem solved with probability p, E[pass@k estimate] = 1 - (1 - p)^k.
    rng = np.random.default_rng(0)
    n, trials = 16, 40000
    for p, k in [(0.05, 4), (0.2, 2), (0.5, 8), (0.02, 16)]:
        c = rng.binomial(n, p, trials)
        est = M.pass_at_k(n, c, k)
        truth = 1 - (1 - p) ** k
        se = est.std() / math.sqrt(trials)
        assert abs(est.mean() - truth) < 4 * se + 1e-9, (p, k, est.mean(), truth)


@pytest.mark.parametrize("bad", [dict(n=4, c=1, k=5), dict(n=4, c=1, k=0), dict(n=4, c=5, k=1),
                                 dict(n=4, c=-1, k=1), dict(n=4, c=1.5, k=1)])
def test_pass_at_k_bad_arguments(bad):
    with pytest.raises(MinirlError):
        M.pass_at_k(**bad)


def test_default_ks():
    assert M.default_ks(1) == [1]
    assert M.default_ks(8) == [1, 2, 4, 8]
    assert M.default_ks(10) == [1, 2, 4, 8, 10]
    assert M.default_ks(256)[-1] == 256


# --------------------------------------------------------------------------- maj@k

def classes_of(rows, gold):
    """rows: answers per problem; a sample is correct when its answer equals gold."""
    correct = [[a is not None and M.normalize_answer(a) == M.normalize_answer(g) for a in row]
               for row, g in zip(rows, gold)]
    return M.answer_classes(rows, np.array(correct))


def brute_maj(row, good, k):
    """Exact maj@k by enumerating every k-subset (ties shared, None never votes)."""
    total = 0.0
    subsets = list(itertools.combinations(range(len(row)), k))
    for sub in subsets:
        votes = collections.Counter(M.normalize_answer(row[i]) for i in sub if row[i] is not None)
        if not votes:
            continue
        top = max(votes.values())
        tied = [a for a, v in votes.items() if v == top]
        total += sum(a in good for a in tied) / len(tied)
    return total / len(subsets)


def test_maj_at_n_on_constructed_problems():
    rows = [["A", "A", "B", None],      # A wins
            ["A", "A", "B", "B"],       # tie A/B: half credit
            [None, None, None, None],   # nothing to vote for
            [None, None, None, "A"],    # None never wins, the one answer does
            ["B", "B", "B", "A"],       # wrong answer wins
            ["B", "B", "C", "C"]]       # tie between two wrong answers
    cl = classes_of(rows, ["A"] * 6)
    np.testing.assert_allclose(M.maj_at_k(cl, 4), [1, 0.5, 0, 1, 0, 0])
    # k = 1 is exact: the fraction of samples in a correct class.
    np.testing.assert_allclose(M.maj_at_k(cl, 1), [0.5, 0.5, 0, 0.25, 0.25, 0])


def test_maj_at_k_matches_exact_enumeration():
    rows = [["A", "B", "B", "C", "A", None, "B", "A"],
            ["1/2", "0.5", "7", "7", "1/2", None, None, "7"],
            ["A", "A", None, None, None, "A", None, None],   # every answer correct: closed form
            ["X", "Y", "Z", "X", "Y", "Z", "A", "A"]]
    gold = ["A", "1/2", "A", "A"]
    cl = classes_of(rows, gold)
    for k in (2, 3, 5, 7):
        got = M.maj_at_k(cl, k, draws=20000, seed=1)
        want = [brute_maj(row, {M.normalize_answer(g)}, k) for row, g in zip(rows, gold)]
        np.testing.assert_allclose(got, want, atol=0.015, err_msg=f"k={k}")
        assert got[2] == pytest.approx(want[2], abs=1e-12)  # exact branch


def test_maj_at_k_seeded_and_checked():
    cl = classes_of([["A", "B", "B", "A", "C", "A"]], ["A"])
    assert M.maj_at_k(cl, 3, seed=5)[0] == M.maj_at_k(cl, 3, seed=5)[0]
    with pytest.raises(MinirlError):
        M.maj_at_k(cl, 7)


def test_normalize_answer_groups_spellings():
    same = ["\\frac{1}{2}", " \\dfrac{1}{2} ", "$\\frac{1}{2}$", "\\frac { 1 } { 2 }.", "\\left(\\frac{1}{2}\\right)"]
    normed = {M.normalize_answer(a) for a in same[:4]}
    assert len(normed) == 1
    assert M.normalize_answer(same[4]) == "(\\frac{1}{2})"
    assert M.normalize_answer(None) is None
    assert M.normalize_answer("X") != M.normalize_answer("x")  # case kept


def test_answer_classes_layout():
    cl = M.answer_classes([["b", "a", "b", None]], np.array([[False, True, False, False]]))
    assert cl.ids.tolist() == [[0, 1, 0, -1]]
    assert cl.counts.tolist() == [[2, 1, 0, 0]]
    assert cl.correct.tolist() == [[False, True, False, False]]
    assert cl.none.tolist() == [1]


# --------------------------------------------------------------------------- entropy

def test_answer_entropy():
    rows = [["A", "A", "B", "B"], ["A"] * 4, ["A", "A", None, None], [None] * 4, ["A", "B", "C", "D"]]
    cl = classes_of(rows, ["A"] * 5)
    np.testing.assert_allclose(M.answer_entropy(cl), [math.log(2), 0, math.log(2), 0, math.log(4)], atol=1e-12)
    np.testing.assert_allclose(M.answer_entropy(cl, include_none=False), [math.log(2), 0, 0, 0, math.log(4)],
                               atol=1e-12)


# --------------------------------------------------------------------------- bootstrap

def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    v = rng.random(200)
    mean, lo, hi = M.bootstrap_ci(v, 2000, seed=3)
    assert mean == pytest.approx(v.mean())
    assert lo < mean < hi
    # Width close to the normal approximation 2 * 1.96 * sd / sqrt(P).
    assert hi - lo == pytest.approx(2 * 1.96 * v.std() / math.sqrt(len(v)), rel=0.15)
    assert M.bootstrap_ci(v, 2000, seed=3) == (mean, lo, hi)
    c = M.bootstrap_ci(np.full(10, 0.25), 100)
    assert c == pytest.approx((0.25, 0.25, 0.25))
    # Many metrics at once; same seed -> same resamples -> paired.
    two = np.stack([v, 2 * v], 1)
    m2, lo2, hi2 = M.bootstrap_ci(two, 2000, seed=3)
    np.testing.assert_allclose([lo2[0], hi2[0]], [lo, hi])
    np.testing.assert_allclose([lo2[1], hi2[1]], [2 * lo, 2 * hi])
    m0, lo0, hi0 = M.bootstrap_ci(v, 0)
    assert lo0 == hi0 == m0


# --------------------------------------------------------------------------- bins

def test_paper_bins_for_256():
    bins = M.difficulty_bins(256)
    assert bins == [(0, 0), (1, 4), (5, 16), (17, 64), (65, 128), (129, 256)]
    assert M.bin_labels(bins) == ["0", "1-4", "5-16", "17-64", "65-128", "129-256"]
    fine = M.difficulty_bins(256, edges=(0, 4, 16, 32, 64, 128, 192, 256))
    assert fine[3] == (17, 32) and fine[-1] == (193, 256)


def test_bins_scale_and_cover():
    assert M.difficulty_bins(16) == [(0, 0), (1, 1), (2, 4), (5, 8), (9, 16)]
    assert M.difficulty_bins(512) == [(0, 0), (1, 8), (9, 32), (33, 128), (129, 256), (257, 512)]
    for n in list(range(1, 70)) + [100, 255, 257, 1000]:
        bins = M.difficulty_bins(n)
        assert bins[0] == (0, 0), n
        assert bins[-1][1] == n
        for (lo, hi), (lo2, _) in zip(bins, bins[1:]):
            assert lo <= hi and lo2 == hi + 1, (n, bins)
        counts = np.arange(n + 1)
        idx = M.assign_bins(counts, bins)
        for c, b in zip(counts, idx):
            assert bins[b][0] <= c <= bins[b][1]


def test_transitions_and_bin_changes():
    bins = M.difficulty_bins(8)                       # [0] [1] [2] [3-4] [5-8]
    assert bins == [(0, 0), (1, 1), (2, 2), (3, 4), (5, 8)]
    ref = np.array([0, 2, 8, 4, 0])
    other = np.array([0, 6, 8, 1, 3])
    rb, ob = M.assign_bins(ref, bins), M.assign_bins(other, bins)
    assert rb.tolist() == [0, 2, 4, 3, 0] and ob.tolist() == [0, 4, 4, 1, 3]
    counts, frac = M.transition_matrix(rb, ob, len(bins))
    want = np.zeros((5, 5), int)
    for i, j in zip(rb, ob):
        want[i, j] += 1
    assert counts.tolist() == want.tolist()
    np.testing.assert_allclose(frac[0], [0.5, 0, 0, 0.5, 0])
    assert frac[1].tolist() == [0] * 5  # empty row stays zeros

    ref_c = np.arange(8)[None, :] < ref[:, None]      # [5, 8] with `ref` correct per row
    oth_c = np.arange(8)[None, :] < other[:, None]
    ch = M.success_change_by_group(ref_c, oth_c, rb, len(bins))
    assert ch["num_problems"].tolist() == [2, 0, 1, 1, 1]
    np.testing.assert_allclose(ch["reference"][[0, 2, 3, 4]], [0, 2 / 8, 4 / 8, 1])
    np.testing.assert_allclose(ch["change"][[0, 2, 3, 4]], [3 / 16, 4 / 8, -3 / 8, 0])
    assert np.isnan(ch["change"][1])


def test_response_means_by_correctness():
    values = np.array([[10, 20, 30], [1, 2, 3]])
    correct = np.array([[True, False, True], [False, False, False]])
    r = M.response_means(values, correct, np.array([0, 1]), 2)
    np.testing.assert_allclose(r["all"], [20, 2])
    np.testing.assert_allclose(r["correct"], [20, np.nan])
    np.testing.assert_allclose(r["incorrect"], [20, 2])


# --------------------------------------------------------------------------- text

def test_phrases_whole_words_case_and_spacing():
    texts = ["OK, the book is okay. ok", "Wait... Let me\nthink. Let\u2019s check: WAIT", "nothing here", "awaits"]
    got = M.count_phrases(texts, {"r": M.REFLECTION_PHRASES})["r"]
    assert got.per_text.tolist() == [2, 4, 0, 0]
    assert got.totals["ok"] == 2 and got.totals["wait"] == 2
    assert got.totals["let me think"] == 1 and got.totals["let's check"] == 1
    assert list(got.totals)[:3] == ["actually", "aha", "alternatively"]  # the list's order


def test_phrases_nested_and_several_lists():
    texts = ["Let me think, so let me see. However hmm", "i need to reconsider"]
    lists = {"refl": ["let me think", "however", "I need to reconsider"], "anth": ["let me", "hmm", "I need"],
             "conn": ["so", "however"], "extra": ["see"]}
    got = M.count_phrases(texts, lists)
    assert got["refl"].per_text.tolist() == [2, 1]
    assert got["anth"].per_text.tolist() == [3, 1]       # "let me" inside "let me think" counts too
    assert got["conn"].per_text.tolist() == [2, 0]
    assert got["extra"].totals == {"see": 1}
    assert got["anth"].totals == {"let me": 2, "hmm": 1, "i need": 1}
    with pytest.raises(MinirlError):
        M.count_phrases(texts, {"empty": []})
    # The documented limit: phrases that overlap without nesting count only at the first.
    partial = M.count_phrases(["make sure that"], {"a": ["make sure"], "b": ["sure that"]})
    assert (partial["a"].per_text[0], partial["b"].per_text[0]) == (1, 0)


def test_count_words_equals_regex_reference():
    texts = ["Let's compute x^2 + 3x = 10, so x=2.", "\\frac{a}{b} don't 'tis CAF\u00c9 caf\u00e9 it''s",
             "word-word 'quoted' 123abc456 a_b", ""]
    want = collections.Counter()
    for t in texts:
        want.update(M.WORD_PATTERN.findall(M.lowercase_text(t)))
    assert M.count_words(texts) == want
    assert want["let's"] == 1 and want["x"] == 3 and want["frac"] == 1


def test_word_log_ratios():
    ref = collections.Counter({"the": 100, "wait": 30, "answer": 10})
    other = collections.Counter({"the": 100, "so": 40, "answer": 10, "rare": 1})
    r = M.word_log_ratios(ref, other, alpha=1.0, min_count=5, top=3)
    assert [w["word"] for w in r["over_used"]] == ["so"]
    # "the" and "answer" are slightly under-used too: the other model writes more words.
    assert [w["word"] for w in r["under_used"]] == ["wait", "the", "answer"]
    V, Nr, No = 5, 140, 151
    want = math.log(41 / (No + V)) - math.log(1 / (Nr + V))
    assert r["over_used"][0]["log_ratio"] == pytest.approx(want)
    assert r["over_used"][0]["other_count"] == 40 and r["over_used"][0]["reference_count"] == 0
    assert "rare" not in [w["word"] for w in r["over_used"]]  # below min_count
    assert M.word_log_ratios(collections.Counter(), collections.Counter()) == {"over_used": [], "under_used": []}


# --------------------------------------------------------------------------- tokens

def word_level_tokenizer():
    """A tiny word-level tokenizer (whitespace and punctuation split), as a minirl Tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from minirl.tokenizer import Tokenizer
    vocab = {w: i for i, w in enumerate(["[UNK]", "wait", "Wait", "so", "So", "the", "The", "answer",
                                                  "is", "let", "me", "think", "unknown", "1", "2", "3", "5", "7",
                                                  "8", ",", "."])}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    tk.add_special_tokens(["[UNK]"])
    return Tokenizer(tk, {"unk_token": "[UNK]"})


def test_token_frequencies_by_hand():
    tok = word_level_tokenizer()
    ref = M.count_tokens(["Wait, the answer is 7.", "wait wait so 8"], tok)
    other = M.count_tokens(["so the answer is 7.", "so 8"], tok)
    # By hand: "Wait" and "wait" are one entry; punctuation tokens count; 11 and 8 tokens.
    assert ref == {"wait": 3, ",": 1, "the": 1, "answer": 1, "is": 1, "7": 1, ".": 1, "so": 1, "8": 1}
    assert other == {"so": 2, "the": 1, "answer": 1, "is": 1, "7": 1, ".": 1, "8": 1}
    assert not M.is_character_level(tok)
    r = M.word_log_ratios(ref, other, alpha=1.0, min_count=1, top=3)
    # |V| = 9, N_ref = 11, N_other = 8: r(w) = log((c_o + 1) / 17) - log((c_r + 1) / 20).
    assert r["over_used"][0]["word"] == "so" and r["over_used"][0]["log_ratio"] == pytest.approx(math.log(60 / 34))
    assert [w["word"] for w in r["over_used"][1:]] == [".", "7"]  # ties (log 20/17) by token text
    assert r["over_used"][1]["log_ratio"] == pytest.approx(math.log(20 / 17))
    assert [(w["word"], round(w["log_ratio"], 6)) for w in r["under_used"]] == [
        ("wait", round(math.log(20 / 68), 6)), (",", round(math.log(20 / 34), 6))]
    assert r["under_used"][0]["reference_per_1k"] == pytest.approx(1000 * 3 / 11)


def test_character_level_tokenizer_is_detected():
    from minirl.tokenizer import char_tokenizer
    tok = char_tokenizer("abc+=0123")
    assert M.is_character_level(tok)
    assert M.count_tokens(["ab+a"], tok) == {"a": 2, "b": 1, "+": 1}


def test_ratio_bootstrap_ci():
    num, den = np.array([1.0, 3.0, 0.0]), np.array([10.0, 10.0, 20.0])
    assert M.ratio_bootstrap_ci(num, den, 0) == (100.0, 100.0, 100.0)  # 1000 * 4 / 40
    rate, low, high = M.ratio_bootstrap_ci(num, den, 2000, seed=3)
    # By hand: the same problem draws as bootstrap_ci, each resample's ratio of sums.
    idx = np.random.default_rng(3).integers(0, 3, size=(2000, 3))
    ref = np.quantile(1000 * num[idx].sum(1) / den[idx].sum(1), [0.025, 0.975])
    assert rate == 100.0 and (low, high) == pytest.approx(tuple(ref))
    assert 0 <= low < rate < high <= 300
    assert math.isnan(M.ratio_bootstrap_ci([0, 0], [0, 0])[0])


def test_canonical_key_groups_equal_values():
    assert M.canonical_key("0.5") == M.canonical_key("1/2") == M.canonical_key("\\frac{1}{2}")
    assert M.canonical_key("2") != M.canonical_key("0.5") and M.canonical_key(None) is None
    c = M.answer_classes([["0.5", "1/2", "\\frac12", "3"]], [[True, True, True, False]], normalize=M.canonical_key)
    assert c.ids.tolist() == [[0, 0, 0, 1]]
    s = M.answer_classes([["0.5", "1/2", "\\frac12", "3"]], [[True, True, True, False]])
    assert s.ids.tolist() == [[0, 1, 2, 3]]


def _whole_text_counts(texts, tok):
    keys = M.token_keys(tok)
    counts = M._encode_counts(list(texts), tok, len(keys))
    out = collections.Counter()
    for i in np.flatnonzero(counts):
        if keys[i]:
            out[keys[i]] += int(counts[i])
    return out


def test_count_tokens_equals_whole_text_encoding(smollm2_dir):
    import minirl
    tok = minirl.load_tokenizer(smollm2_dir)
    texts = ["Wait,  hmm\n\n so  the answer is \\boxed{1/2}.  ", "  leading spaces", "tail  ", "",
             "Let me verify: 12*3 = 36.\nTherefore \\(x = \\frac{3}{4}\\)\u2026 ok"] * 3
    assert M.count_tokens(texts, tok) == _whole_text_counts(texts, tok)
    assert M.count_tokens(["Wait, wait"], tok)["wait"] == 2


def test_count_tokens_falls_back_when_pieces_differ():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from minirl.tokenizer import Tokenizer
    # No pre-tokenizer: "a b" is one unknown word whole, but "a" and " b" are known pieces.
    tk = HFTokenizer(models.WordLevel({"[UNK]": 0, "a": 1, " b": 2, "a b": 3}, unk_token="[UNK]"))
    tk.add_special_tokens(["[UNK]"])
    tok = Tokenizer(tk, {"unk_token": "[UNK]"})
    texts = ["a b", "a", "a b"]
    assert M.count_tokens(texts, tok) == _whole_text_counts(texts, tok) == {"a b": 2, "a": 1}
