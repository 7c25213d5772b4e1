"""Accuracy, capability and text statistics of sampled responses (pure numpy / python).

Everything here works on per-problem arrays, so one samples file of P problems with
n samples each becomes a few [P, n] arrays (correct, tokens, ...) and [P] arrays
(correct counts, ...). The analysis follows Kim et al. (arXiv 2505.14216) and
Hu et al. (arXiv 2505.21067); `minirl/report.py` turns them into a report.

What is computed, in one line each:
- `pass_at_k(n, c, k)`: unbiased pass@k per problem, 1 - C(n-c, k) / C(n, k).
- `maj_at_k(classes, k)`: probability that a majority vote of k samples is correct.
- `answer_entropy(classes)`: entropy (nats) of the final-answer distribution per problem.
- `bootstrap_ci(values)`: percentile confidence intervals of means over problems.
- `difficulty_bins(n)`, `assign_bins`, `transition_matrix`, `group_mean`,
  `success_change_by_group`, `response_means`: the paper's difficulty-bin analysis.
- `count_phrases`, `count_words`, `word_log_ratios`: reflection phrases, anthropomorphic
  tokens, logical connectors and the words one model over- or under-uses.
- `count_tokens`, `is_character_level`: the same frequency comparison over the tokenizer's
  own tokens (Hu et al. count tokens, not words); `ratio_bootstrap_ci`: a rate such as
  "category matches per 1000 tokens" with a bootstrap interval over problems.
- `canonical_key`: group answers by mathematical value (grader.canonical_answer).
"""
import collections
import math
import re
from dataclasses import dataclass

import numpy as np

from minirl.common import MinirlError

# --------------------------------------------------------------------------- lists

# Kim et al.'s reflection phrases (case-insensitive, whole words / phrases).
REFLECTION_PHRASES = (
    "actually", "aha", "alternatively", "correction:", "another approach",
    "different method", "checking our work", "double-check", "hmm", "however",
    "I made a mistake", "I need to reconsider", "I realize", "let me recalculate",
    "let me think", "let's check", "let's reconsider", "looking back", "make sure", "ok",
    "on second thought", "retracing", "to be sure", "to confirm", "verify", "wait",
    "we could also",
)

# Hu et al.'s two categories of tokens that distillation raises. The paper names
# "wait", "maybe", "hmm", "let me" and "but", "alternatively", "therefore", "however";
# the rest are common members of the same categories. Pass your own lists to extend.
ANTHROPOMORPHIC_TOKENS = (
    "wait", "maybe", "hmm", "let me", "perhaps", "let's", "i think", "i guess",
    "i wonder", "i need", "i should", "seems", "probably", "ah", "oh", "okay", "hold on",
)
LOGICAL_CONNECTORS = (
    "but", "alternatively", "therefore", "however", "so", "thus", "hence", "because",
    "since", "instead", "although", "though", "otherwise", "moreover", "furthermore",
    "consequently", "whereas", "nevertheless",
)

# Upper edges of the paper's bins for n = 256: [0], [1-4], [5-16], [17-64], [65-128],
# [129-256]. For the paper's finer bins (17-32, 33-64, 129-192, 193-256) pass
# (0, 4, 16, 32, 64, 128, 192, 256).
PAPER_BIN_EDGES = (0, 4, 16, 64, 128, 256)
PAPER_BIN_N = 256

# A "word" for the frequency comparison: a run of ASCII letters, with inner
# apostrophes ("let's", "don't"). Numbers and LaTeX commands' backslashes are not
# words; "\frac" counts as the word "frac".
WORD_PATTERN = re.compile(r"[a-z]+(?:'[a-z]+)*")


def _check(cond, message):
    if not cond:
        raise MinirlError(message)


def default_ks(n: int) -> list:
    """k = 1, 2, 4, ... up to n, and n itself when it is not a power of two."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    if ks[-1] != n:
        ks.append(n)
    return ks


# --------------------------------------------------------------------------- pass@k

def pass_at_k(n: int, c, k: int):
    """Unbiased pass@k estimator of Chen et al. (2021), per problem.

    With n samples of which c are correct, the probability that at least one of k
    samples drawn without replacement is correct is 1 - C(n-c, k) / C(n, k). The
    binomials overflow for n = 256, so it is computed in the stable product form
        1 - prod_{i = n-c+1 .. n} (1 - k / i),
    which is exactly 1 when n - c < k (some factor is 0). `c` may be a scalar or an
    array of correct counts (one per problem); the result has the same shape."""
    _check(isinstance(n, (int, np.integer)) and n >= 1, f"pass@k: n must be a positive integer, got {n!r}")
    _check(isinstance(k, (int, np.integer)) and 1 <= k <= n,
           f"pass@k: k must be an integer in 1..n={n}, got {k!r}")
    c_arr = np.asarray(c)
    _check(np.issubdtype(c_arr.dtype, np.integer) or c_arr.size == 0 or np.all(c_arr == np.round(c_arr)),
           "pass@k: correct counts must be integers")
    c_arr = c_arr.astype(np.int64)
    _check(c_arr.size == 0 or (c_arr.min() >= 0 and c_arr.max() <= n),
           f"pass@k: correct counts must lie in 0..n={n}")
    # One table for every possible c: table[c] = 1 - prod of the first c factors
    # (1 - k/n)(1 - k/(n-1))...; a cumulative product, so the whole thing is O(n).
    i = np.arange(n, 0, -1, dtype=np.float64)                       # n, n-1, ..., 1
    prods = np.concatenate([[1.0], np.cumprod(1.0 - k / i)])       # [n+1]
    # Once i <= k a factor is <= 0 and the product is (minus) zero: pass@k = 1 exactly.
    prods[1:][i <= k] = 0.0
    table = np.clip(1.0 - prods, 0.0, 1.0)
    out = table[c_arr]
    return float(out) if np.ndim(c) == 0 else out


# --------------------------------------------------------------------------- answers

_ANSWER_DROP = re.compile(r"\\left|\\right|\\[,;:!]|\\displaystyle|\s+")


def normalize_answer(answer):
    """The string that majority voting and the answer entropy compare.

    None stays None (no extracted answer). Otherwise: drop all whitespace, LaTeX
    spacing (\\, \\; \\: \\!), \\left, \\right and \\displaystyle; turn \\dfrac and
    \\tfrac into \\frac; drop enclosing $...$ and a trailing period. Case is kept
    (matrices and variables may differ only in case). Deliberately string-only: it
    never calls a math checker, so it is fast and deterministic."""
    if answer is None:
        return None
    a = _ANSWER_DROP.sub("", str(answer))
    a = a.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    while len(a) >= 2 and a.startswith("$") and a.endswith("$"):
        a = a[1:-1]
    return a.rstrip(".")


_CANONICAL_CACHE = {}


def canonical_key(answer):
    """The key that groups answers by mathematical value for majority voting and the
    answer entropy: `grader.canonical_answer` ("0.5", "1/2" and "\\frac{1}{2}" are one
    answer), falling back to `normalize_answer` when the grader cannot read it. Memoised:
    a samples file repeats the same few answers many times."""
    if answer is None:
        return None
    key = _CANONICAL_CACHE.get(answer)
    if key is None:
        from minirl.grader import canonical_answer
        key = canonical_answer(answer) or normalize_answer(answer)
        if len(_CANONICAL_CACHE) < 1_000_000:
            _CANONICAL_CACHE[answer] = key
    return key


@dataclass
class AnswerClasses:
    """The final answers of P problems x n samples, grouped into classes per problem.

    ids:     [P, n] int: class of each sample (classes numbered 0, 1, ... per problem in
             order of first appearance); -1 for a sample with no extracted answer.
    counts:  [P, n] int: number of samples in each class (zero past the last class).
    correct: [P, n] bool: the class counts as correct when at least half of its samples
             were graded correct (samples with the same normalised answer are graded
             the same unless the grader timed out, so this is nearly always unanimous).
    none:    [P] int: number of samples with no answer."""
    ids: np.ndarray
    counts: np.ndarray
    correct: np.ndarray
    none: np.ndarray

    @property
    def n(self) -> int:
        return self.ids.shape[1]


def answer_classes(answers, correct, normalize=normalize_answer) -> AnswerClasses:
    """Group each problem's answers into classes of equal `normalize(answer)`.

    answers: P lists of n answers (str or None); correct: [P, n] bools (the grader's
    verdict per sample). With the default string `normalize`, differently written equal
    answers (1/2 and 0.5) are different classes; pass `normalize=canonical_key` to group
    them by value (what `report.build_report` does by default)."""
    correct = np.asarray(correct, dtype=bool)
    _check(correct.ndim == 2 and len(answers) == correct.shape[0],
           "answer_classes: answers must be P lists matching correct [P, n]")
    P, n = correct.shape
    ids = np.full((P, n), -1, dtype=np.int64)
    for p, row in enumerate(answers):
        _check(len(row) == n, f"answer_classes: problem {p} has {len(row)} answers, expected {n}")
        seen = {}
        for j, a in enumerate(row):
            a = normalize(a)
            if a is not None:
                ids[p, j] = seen.setdefault(a, len(seen))
    # Per-class sample counts and correct counts with one bincount over (problem, class).
    has = ids >= 0
    flat = (np.arange(P)[:, None] * n + ids)[has]
    counts = np.bincount(flat, minlength=P * n).reshape(P, n)
    good = np.bincount(flat, weights=correct[has], minlength=P * n).reshape(P, n)
    class_correct = (counts > 0) & (2 * good >= counts)
    return AnswerClasses(ids=ids, counts=counts, correct=class_correct, none=n - counts.sum(1))


def _vote_credit(votes, good):
    """Credit of a majority vote: votes [..., J] per class, good [..., J] bool.

    The class with the most votes wins; a tie is shared: each tied class gets
    1 / (number tied), so the credit is the expected correctness under a uniformly
    random tie-break, computed without randomness. No votes at all: credit 0."""
    top = votes.max(-1, keepdims=True)
    tied = (votes == top) & (top > 0)
    return (tied & good).sum(-1) / np.maximum(tied.sum(-1), 1)


def maj_at_k(classes: AnswerClasses, k: int, draws: int = 500, seed: int = 0):
    """Per problem, the probability that a majority vote of k of the n samples (drawn
    without replacement) picks a correct answer. Returns [P] floats.

    Only extracted answers vote (None never wins); ties are shared (see `_vote_credit`).
    Exact where the outcome has a closed form:
    - k = n: the vote of all samples;
    - k = 1: the fraction of samples in a correct class;
    - no correct class: 0; every answered sample correct: the chance that at least one
      of the k samples has an answer, 1 - C(none, k) / C(n, k).
    Otherwise a Monte-Carlo estimate: `draws` vote-count vectors are drawn from the
    multivariate hypergeometric distribution of the class counts (seeded numpy
    Generator), so its standard error per problem is at most 0.5 / sqrt(draws) and far
    smaller on the mean over problems."""
    n = classes.n
    _check(isinstance(k, (int, np.integer)) and 1 <= k <= n, f"maj@k: k must be an integer in 1..n={n}, got {k!r}")
    _check(draws >= 1, f"maj@k: draws must be >= 1, got {draws}")
    counts, good = classes.counts, classes.correct
    if k == n:
        return _vote_credit(counts, good).astype(np.float64)
    if k == 1:
        return (counts * good).sum(1) / n
    out = np.zeros(len(counts))
    any_good = good.any(1)
    all_good = ((counts > 0) <= good).all(1)  # every non-empty class is correct
    easy = any_good & all_good
    out[easy] = pass_at_k(n, n - classes.none[easy], k)
    rng = np.random.default_rng([seed, k])
    for p in np.flatnonzero(any_good & ~all_good):
        J = int((counts[p] > 0).sum())  # classes are numbered 0..J-1
        colors = np.append(counts[p, :J], classes.none[p])
        # "count" is faster for small samples, "marginals" for many classes.
        method = "count" if k <= 4 * len(colors) else "marginals"
        drawn = rng.multivariate_hypergeometric(colors, k, size=draws, method=method)
        out[p] = _vote_credit(drawn[:, :J], good[p, :J]).mean()
    return out


def answer_entropy(classes: AnswerClasses, include_none: bool = True):
    """Entropy (natural log, nats) of each problem's final-answer distribution, [P].

    include_none=True (the default): "no answer" is one more outcome, so a model that
    often fails to finish looks uncertain. include_none=False: only extracted answers
    count; a problem with no answer at all has entropy 0."""
    counts = classes.counts.astype(np.float64)
    if include_none:
        counts = np.concatenate([counts, classes.none[:, None].astype(np.float64)], 1)
    total = counts.sum(1, keepdims=True)
    prob = counts / np.maximum(total, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(prob > 0, -prob * np.log(prob), 0.0)
    return terms.sum(1)


# --------------------------------------------------------------------------- bootstrap

def ratio_bootstrap_ci(num, den, num_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                       scale: float = 1000.0):
    """scale * sum(num) / sum(den) and its percentile bootstrap interval over problems.

    num, den: [P] per-problem totals (e.g. category matches and generated tokens of a
    problem's n responses). Each resample draws P problems with replacement (the same
    draws as `bootstrap_ci` for the same P and seed) and recomputes the ratio of sums.
    Returns (rate, low, high); NaN when sum(den) is 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    _check(num.shape == den.shape and num.ndim == 1 and num.size >= 1, "ratio bootstrap: need [P] num and den")
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = scale * num.sum() / den.sum() if den.sum() > 0 else float("nan")
        if num_resamples <= 0 or not math.isfinite(rate):
            return float(rate), float(rate), float(rate)
        P = num.size
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, P, size=(num_resamples, P))
        rates = scale * num[idx].sum(1) / den[idx].sum(1)
    alpha = (1.0 - confidence) / 2
    low, high = np.nanquantile(rates, [alpha, 1 - alpha])
    return float(rate), float(low), float(high)


def bootstrap_ci(values, num_resamples: int = 1000, seed: int = 0, confidence: float = 0.95):
    """Mean over problems and its percentile bootstrap confidence interval.

    values: [P] or [P, M] (M metrics at once). Problems are resampled with replacement
    `num_resamples` times; the interval is the (1-confidence)/2 and (1+confidence)/2
    percentiles of the resampled means. The resamples depend only on (P, seed), so two
    calls with the same seed use the same resamples: differences between models on the
    same problems are paired. Returns (mean, low, high), each [M] (or a float for [P])."""
    v = np.asarray(values, dtype=np.float64)
    scalar = v.ndim == 1
    v = v[:, None] if scalar else v
    P = v.shape[0]
    _check(P >= 1, "bootstrap: no problems")
    _check(0 < confidence < 1, f"bootstrap: confidence must be in (0, 1), got {confidence}")
    mean = v.mean(0)
    if num_resamples <= 0:
        low, high = mean.copy(), mean.copy()
    else:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, P, size=(num_resamples, P))
        # How often each problem is drawn in each resample: [B, P]. The resampled
        # means of all metrics are then one matrix product instead of B gathers.
        rows = np.arange(num_resamples)[:, None] * P
        weights = np.bincount((rows + idx).ravel(), minlength=num_resamples * P)
        weights = weights.reshape(num_resamples, P).astype(np.float64)
        means = weights @ v / P                                     # [B, M]
        alpha = (1.0 - confidence) / 2
        low, high = np.quantile(means, [alpha, 1 - alpha], axis=0)
    if scalar:
        return float(mean[0]), float(low[0]), float(high[0])
    return mean, low, high


# --------------------------------------------------------------------------- bins

def difficulty_bins(n: int, edges=PAPER_BIN_EDGES, edges_n: int = PAPER_BIN_N) -> list:
    """Inclusive (low, high) ranges of correct counts, covering 0..n without gaps.

    `edges` are the upper edges of the bins for `edges_n` samples (the paper's
    0, 4, 16, 64, 128, 256 for n = 256). For another n every edge e > 0 becomes
    ceil(e * n / edges_n) (at least 1, at most n), so [0] stays its own bin and the
    last bin ends at n; edges that collide after scaling are merged, so no bin is
    empty. n = 256 gives the paper's bins; n = 16 gives [0], [1], [2-4], [5-8], [9-16]."""
    _check(isinstance(n, (int, np.integer)) and n >= 1, f"bins: n must be a positive integer, got {n!r}")
    edges = sorted(set(int(e) for e in edges))
    _check(edges and edges[0] >= 0 and edges[-1] == edges_n,
           f"bins: edges must be >= 0 and end at edges_n={edges_n}, got {edges}")
    uppers = [0]
    for e in edges:
        if e == 0:
            continue
        u = min(n, max(1, math.ceil(e * n / edges_n)))
        if u > uppers[-1]:
            uppers.append(u)
    if uppers[-1] != n:
        uppers.append(n)
    bins, low = [], 0
    for u in uppers:
        bins.append((low, u))
        low = u + 1
    return bins


def bin_labels(bins) -> list:
    """"0", "1-4", ... for (low, high) ranges."""
    return [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in bins]


def assign_bins(counts, bins):
    """Index of the bin holding each correct count: [P] int."""
    counts = np.asarray(counts)
    uppers = np.array([hi for _, hi in bins])
    _check(counts.size == 0 or (counts.min() >= bins[0][0] and counts.max() <= uppers[-1]),
           f"bins: counts outside {bins[0][0]}..{uppers[-1]}")
    return np.searchsorted(uppers, counts, side="left")


def transition_matrix(from_bins, to_bins, num_bins: int):
    """How problems move between bins: counts[i, j] = number of problems in bin i for
    the reference model and in bin j for the other model. Also the row fractions
    (each row divided by its sum; an empty row stays all zeros). Returns (counts [B, B]
    int, fractions [B, B] float)."""
    from_bins, to_bins = np.asarray(from_bins), np.asarray(to_bins)
    counts = np.bincount(from_bins * num_bins + to_bins, minlength=num_bins * num_bins)
    counts = counts.reshape(num_bins, num_bins)
    rows = counts.sum(1, keepdims=True)
    return counts, counts / np.maximum(rows, 1)


def group_mean(values, groups, num_groups: int, weights=None):
    """Mean of `values` within each group: values and groups of the same shape (groups
    in 0..G-1), optional 0/1 or real weights. Returns (means [G] with NaN for an empty
    group, sums of weights [G])."""
    values = np.asarray(values, dtype=np.float64).ravel()
    groups = np.asarray(groups).ravel()
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    total = np.bincount(groups, weights=w * values, minlength=num_groups)
    count = np.bincount(groups, weights=w, minlength=num_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)
    return means, count


def success_change_by_group(ref_correct, other_correct, groups, num_groups: int) -> dict:
    """Per group of problems: mean success rate (fraction of correct samples, averaged
    over the group's problems) of the reference and of the other model, and the change
    other - reference. ref_correct / other_correct: [P, n] bool; groups: [P]."""
    ref_rate = np.asarray(ref_correct).mean(1)
    other_rate = np.asarray(other_correct).mean(1)
    ref_mean, count = group_mean(ref_rate, groups, num_groups)
    other_mean, _ = group_mean(other_rate, groups, num_groups)
    return {"num_problems": count.astype(int), "reference": ref_mean, "other": other_mean,
            "change": other_mean - ref_mean}


def response_means(values, correct, groups, num_groups: int) -> dict:
    """Mean of a per-response quantity (tokens, characters, phrase counts) per group of
    problems, over all responses, the correct ones and the incorrect ones.
    values, correct: [P, n]; groups: [P]. Returns {"all", "correct", "incorrect"}: [G]
    each (NaN where a group has no such response)."""
    values = np.asarray(values, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    g = np.broadcast_to(np.asarray(groups)[:, None], values.shape)
    return {"all": group_mean(values, g, num_groups)[0],
            "correct": group_mean(values, g, num_groups, weights=correct)[0],
            "incorrect": group_mean(values, g, num_groups, weights=~correct)[0]}


# --------------------------------------------------------------------------- text

def lowercase_text(text: str) -> str:
    """The form phrase and word counting read: lower case, typographic apostrophe -> '."""
    return text.lower().replace("\u2019", "'")


def _canonical_phrase(text: str) -> str:
    return " ".join(lowercase_text(text).split())


def phrase_pattern(phrases):
    """One regular expression matching any of `phrases` as whole words, in lowercased
    text (lowercasing the text first is faster than re.IGNORECASE).

    A space in a phrase matches any run of whitespace; word boundaries on both sides,
    so "ok" does not match inside "book" or "okay". At one place the longest phrase wins
    ("let me think" over "let me"). The phrases are written as a trie ("let me" and
    "let's" share "let"): Python's regex engine tries alternatives one after the other
    at every position, so sharing prefixes makes the scan about 1.5x faster than a flat
    "a|b|c" list."""
    canon = sorted({_canonical_phrase(p) for p in phrases})
    _check(canon and all(canon), "phrases: need at least one non-empty phrase")
    trie = {}
    for p in canon:
        node = trie
        for ch in p:
            node = node.setdefault(ch, {})
        node[""] = {}  # end of a phrase

    def regex(node):
        alts = [(r"\s+" if ch == " " else re.escape(ch)) + regex(child) for ch, child in node.items() if ch]
        if not alts:
            return ""
        body = "(?:" + "|".join(alts) + ")"
        # A phrase ends here but longer ones go on: the greedy "?" tries them first.
        return body + "?" if "" in node else body

    return re.compile(r"(?<!\w)" + regex(trie) + r"(?!\w)")


@dataclass
class PhraseCounts:
    """Counts of one list of phrases. per_text: [N] int, occurrences in each text;
    totals: {phrase: occurrences in all texts}, keys lower-cased, in the list's order."""
    per_text: np.ndarray
    totals: dict


def count_phrases(texts, lists: dict, lowercased: bool = False) -> dict:
    """Count whole-word, case-insensitive occurrences of phrases in each text.

    lists: {name: phrases}, e.g. {"reflection": REFLECTION_PHRASES}. Returns
    {name: PhraseCounts}. Every phrase is counted wherever it occurs, independently of
    the other phrases: "let me think" counts once for "let me think" and once for
    "let me" when both are listed (in one list or in two).

    How, and why it is fast: all phrases of all lists go into one regular expression
    (see `phrase_pattern`), so the texts are scanned once. Each match is the longest
    phrase at its place; it is credited to every listed phrase it contains as whole
    words (found once per distinct match, not per occurrence). The only case this
    misses is two listed phrases that overlap without one containing the other: in
    "make sure that", with "make sure" and "sure that" listed, only "make sure" counts.
    In the default lists only "hold on" / "on second thought" could, in the text
    "hold on second thought". Pass lowercased=True when texts are `lowercase_text`-ed."""
    names = list(lists)
    phrases = [[_canonical_phrase(p) for p in lists[name]] for name in names]
    flat = sorted({p for ps in phrases for p in ps})
    pattern = phrase_pattern(flat)
    single = {p: phrase_pattern([p]) for p in flat}

    # Distinct matched strings get small ids; the canonical form of a new one (a match
    # may hold a newline where the phrase has a space) is computed only once.
    class _Ids(dict):
        def __missing__(self, hit):
            self[hit] = ids_of_canon.setdefault(_canonical_phrase(hit), len(ids_of_canon))
            return self[hit]

    ids_of_canon = {}
    ids = _Ids()
    text_of_hit, hit_ids = [], []
    findall = pattern.findall
    for i, t in enumerate(texts):
        hits = findall(t if lowercased else lowercase_text(t))
        if hits:
            hit_ids.extend(map(ids.__getitem__, hits))
            text_of_hit.extend([i] * len(hits))
    text_of_hit = np.array(text_of_hit, dtype=np.int64)
    hit_ids = np.array(hit_ids, dtype=np.int64)
    canon = list(ids_of_canon)                                   # id -> matched phrase
    # contains[u, j]: occurrences of phrase flat[j] inside matched phrase canon[u].
    contains = np.array([[len(single[p].findall(u)) for p in flat] for u in canon],
                        dtype=np.int64).reshape(len(canon), len(flat))
    per_match = np.bincount(hit_ids, minlength=len(canon))     # [U] matches of each id
    totals_flat = dict(zip(flat, (per_match @ contains).tolist()))
    out = {}
    for name, ps in zip(names, phrases):
        cols = [flat.index(p) for p in dict.fromkeys(ps)]
        weight = contains[:, cols].sum(1)                        # [U] list phrases per match
        per_text = np.bincount(text_of_hit, weights=weight[hit_ids], minlength=len(texts))
        out[name] = PhraseCounts(per_text=per_text.astype(np.int64),
                                 totals={p: totals_flat[p] for p in dict.fromkeys(ps)})
    return out


# Characters that can never be inside a word: ASCII except letters and the apostrophe.
_WORD_BREAKS = {c: " " for c in range(128) if not (chr(c).isalpha() or chr(c) == "'")}


def count_words(texts, lowercased: bool = False) -> collections.Counter:
    """Word frequencies over all texts, words as defined by WORD_PATTERN.

    Exactly WORD_PATTERN.findall over every text, computed faster: split each text at
    characters that cannot be in a word (str.translate + str.split run in C), count the
    pieces, then run the regex once per *distinct* piece (pieces like "x^2" or "'tis"
    hold zero or several words)."""
    pieces = collections.Counter()
    for t in texts:
        pieces.update((t if lowercased else lowercase_text(t)).translate(_WORD_BREAKS).split())
    words = collections.Counter()
    for piece, c in pieces.items():
        if WORD_PATTERN.fullmatch(piece):
            words[piece] += c
        else:
            for w in WORD_PATTERN.findall(piece):
                words[w] += c
    return words


def word_log_ratios(ref_counts, other_counts, alpha: float = 1.0, min_count: int = 20, top: int = 25) -> dict:
    """Words the other model over- and under-uses relative to the reference.

    For every word w of the joint vocabulary V (size |V|), with c(w) its count and N the
    total word count of a model, the additively smoothed log-ratio of frequencies is
        r(w) = log((c_o(w) + alpha) / (N_o + alpha |V|)) - log((c_r(w) + alpha) / (N_r + alpha |V|)).
    Only words seen at least `min_count` times in the two models together are ranked
    (rare words otherwise dominate both ends). Returns {"over_used": the `top` largest r,
    "under_used": the `top` smallest}, each a list of {"word", "log_ratio",
    "reference_count", "other_count", "reference_per_1k", "other_per_1k"}."""
    vocab = sorted(set(ref_counts) | set(other_counts))
    if not vocab:
        return {"over_used": [], "under_used": []}
    c_r = np.array([ref_counts.get(w, 0) for w in vocab], dtype=np.float64)
    c_o = np.array([other_counts.get(w, 0) for w in vocab], dtype=np.float64)
    N_r, N_o, V = c_r.sum(), c_o.sum(), len(vocab)
    ratio = np.log((c_o + alpha) / (N_o + alpha * V)) - np.log((c_r + alpha) / (N_r + alpha * V))
    keep = np.flatnonzero(c_r + c_o >= min_count)
    # Sort by ratio, ties by word (vocab is sorted, a stable sort keeps that order).
    order = keep[np.argsort(-ratio[keep], kind="stable")]

    def row(i):
        return {"word": vocab[i], "log_ratio": float(ratio[i]),
                "reference_count": int(c_r[i]), "other_count": int(c_o[i]),
                "reference_per_1k": float(1000 * c_r[i] / max(N_r, 1)),
                "other_per_1k": float(1000 * c_o[i] / max(N_o, 1))}

    over = [row(i) for i in order[:top] if ratio[i] > 0]
    under = [row(i) for i in order[::-1][:top] if ratio[i] < 0]
    return {"over_used": over, "under_used": under}


# --------------------------------------------------------------------------- tokens

def token_key(text: str) -> str:
    """The entry a token is counted under: its decoded text without surrounding space, lower
    case ("Wait", " wait" and "wait" are one entry). Whitespace-only tokens give ""."""
    return lowercase_text(text.strip())


def token_keys(tokenizer) -> list:
    """token_key of every id of a minirl Tokenizer (special tokens give "")."""
    special = {i for i, t in tokenizer.tk.get_added_tokens_decoder().items() if t.special}
    texts = tokenizer.tk.decode_batch([[i] for i in range(tokenizer.vocab_size)], skip_special_tokens=False)
    return ["" if i in special else token_key(t) for i, t in enumerate(texts)]


def is_character_level(tokenizer) -> bool:
    """True when every non-special token is at most one character (the bundled tiny model):
    its "tokens" and "words" are then character runs, not vocabulary choices."""
    return all(len(k) <= 1 for k in token_keys(tokenizer))


_PIECE = re.compile(r"\s*\S+|\s+$")


def _encode_counts(texts, tokenizer, vocab_size):
    """[V] token counts of texts, each encoded whole."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(texts), 4096):  # encode_batch runs in parallel in Rust
        encs = tokenizer.tk.encode_batch(texts[start:start + 4096], add_special_tokens=False)
        if encs:
            flat = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encs] + [np.zeros(0, np.int64)])
            counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
    return counts


def count_tokens(texts, tokenizer, keys=None) -> collections.Counter:
    """Token frequencies over all texts: each text is encoded by the tokenizer (no special
    tokens added) and every token is counted under its `token_key`; whitespace-only and
    special tokens are not counted. keys: token_keys(tokenizer), when already computed.

    Fast path: a text's pieces (a run of spaces plus the non-space characters after it) are
    counted, and each *distinct* piece is encoded once. That equals encoding whole texts
    when the tokenizer's pre-tokenizer splits at whitespace (byte-level BPE as in GPT-2,
    Llama-3, Qwen, SmolLM2; WordPiece; word-level); it is checked on the first 256 texts
    and, if they differ, every text is encoded whole instead."""
    keys = token_keys(tokenizer) if keys is None else keys
    texts = list(texts)
    V = len(keys)
    head = texts[:256]
    pieces = collections.Counter(p for t in head for p in _PIECE.findall(t))
    distinct = list(pieces)

    def piece_counts(distinct, weights):
        counts = np.zeros(V, dtype=np.int64)
        for start in range(0, len(distinct), 4096):
            encs = tokenizer.tk.encode_batch(distinct[start:start + 4096], add_special_tokens=False)
            for e, piece in zip(encs, distinct[start:start + 4096]):
                np.add.at(counts, np.asarray(e.ids, dtype=np.int64), weights[piece])
        return counts

    if np.array_equal(piece_counts(distinct, pieces), _encode_counts(head, tokenizer, V)):
        pieces = collections.Counter(p for t in texts for p in _PIECE.findall(t))
        counts = piece_counts(list(pieces), pieces)
    else:
        counts = _encode_counts(texts, tokenizer, V)
    out = collections.Counter()
    for i in np.flatnonzero(counts):
        if keys[i]:
            out[keys[i]] += int(counts[i])
    return out
