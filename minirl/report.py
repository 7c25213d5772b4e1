r"""The accuracy-vs-capability report: samples files in, report.json / report.md / PNGs out.

This is the analysis half of `evaluate.py` (`python evaluate.py report a.jsonl b.jsonl`):
sampling is slow and needs a GPU, analysis is cheap and runs on a CPU, so samples are
written once and analysed as often as wanted. The analysis reproduces Kim et al.
(arXiv 2505.14216) and the token statistics of Hu et al. (arXiv 2505.21067); the
numbers themselves are computed in `minirl/metrics.py`.

Samples file (jsonl, UTF-8), one line per sample, written by `evaluate.py sample`:

    {"problem_id": "test/algebra/1",   # str, the problem's id
     "difficulty": 3,                  # int or null: the task's own level, when known
     "gold": "\\frac{1}{2}",           # str, the reference answer
     "sample_index": 0,                # int >= 0, unique within a problem
     "response": "... \\boxed{1/2}",   # str, the generated text
     "num_tokens": 412,                # int >= 0, generated tokens
     "finish_reason": "stop",          # "stop" (stop token) or "length" (hit the limit)
     "answer": "1/2",                  # str or null: the extracted final answer
     "correct": true}                  # bool: the grader's verdict

Other keys are allowed and ignored. Blank lines are skipped. Lines of a problem need not
be adjacent; samples are ordered by sample_index. Every problem must have the same
number of samples n; `difficulty` and `gold` must agree across a problem's lines.
Problems keep the order of their first line.

Settings file (optional), beside the samples: the samples path with its extension
replaced by `.settings.json` (runs/base.jsonl -> runs/base.settings.json;
runs/base.jsonl.settings.json is read too). A JSON object with at least "model" and
"n"; this module reads "label" (if present) or "model" (its last path part) as the
model's name in the report, and copies the whole object into report.json.

Optional "question" key (str): when present it must agree across a problem's lines.

Comparing files: the first file (or `reference_index`) is the reference (base) model;
every other file is compared with it. All files must hold the same problems and the
same n, otherwise a MinirlError names both files; the same problem ids with another gold
answer or question (files sampled from other data) are refused too, naming an id.

Also read when present: the judgments file beside a samples file (`<name>.judgments.jsonl`,
written by `evaluate.py judge`, see minirl/judge.py) for the cognitive-behaviour tables, and
the tokenizer of the settings' "model" folder (or `tokenizer=`) for the token-level
frequencies. A judgment's sample_index is the sample's position among its problem's samples
(sorted by sample_index).
"""
import collections
import io
import json
import math
import os
import re
from dataclasses import dataclass, replace

import numpy as np

from minirl import metrics
from minirl.common import MinirlError, atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl

REPORT_VERSION = 1
FINISH_REASONS = ("stop", "length")


# --------------------------------------------------------------------------- reading

@dataclass
class Samples:
    """One samples file as arrays; P problems x n samples, problems in file order.

    correct, num_tokens, truncated: [P, n]; answers, responses: P lists of n
    (answers str or None); problem_ids, gold, difficulty: [P] lists."""
    path: str
    label: str
    settings: dict
    problem_ids: list
    difficulty: list
    gold: list
    correct: np.ndarray
    num_tokens: np.ndarray
    truncated: np.ndarray
    answers: list
    responses: list
    questions: list = None    # [P] str or None (the optional "question" key)

    @property
    def n(self) -> int:
        return self.correct.shape[1]

    @property
    def num_problems(self) -> int:
        return self.correct.shape[0]

    def reordered(self, problem_ids):
        """The same samples with problems in the order of `problem_ids`."""
        where = {pid: i for i, pid in enumerate(self.problem_ids)}
        idx = [where[pid] for pid in problem_ids]
        return replace(self, problem_ids=list(problem_ids),
                       difficulty=[self.difficulty[i] for i in idx], gold=[self.gold[i] for i in idx],
                       correct=self.correct[idx], num_tokens=self.num_tokens[idx],
                       truncated=self.truncated[idx], answers=[self.answers[i] for i in idx],
                       responses=[self.responses[i] for i in idx], questions=[self.questions[i] for i in idx])


def settings_path(samples_path):
    """The settings file beside a samples file, or None when there is none."""
    root, _ = os.path.splitext(samples_path)
    for candidate in (root + ".settings.json", samples_path + ".settings.json"):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_settings(samples_path):
    """The settings file beside a samples file as a dict, or None when there is none."""
    path = settings_path(samples_path)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MinirlError(f"{path}: cannot read the settings file ({e})") from None
    if not isinstance(obj, dict):
        raise MinirlError(f"{path}: the settings file must hold a JSON object")
    return obj


def _default_label(path, settings):
    if settings:
        if isinstance(settings.get("label"), str) and settings["label"]:
            return settings["label"]
        if isinstance(settings.get("model"), str) and settings["model"].strip("/\\"):
            return os.path.basename(settings["model"].rstrip("/\\"))
    return _file_stem(path)


def _file_stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _lines(path):
    """read_jsonl, with unreadable files turned into MinirlError."""
    lineno = 0
    try:
        for lineno, obj in read_jsonl(path):
            yield lineno, obj
    except OSError as e:
        raise MinirlError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise MinirlError(f"{path}:{lineno + 1}: not UTF-8 text") from None


def _is_int(v):
    return type(v) is int  # bool is a subclass of int: true/false are not counts


def read_samples(path, label=None) -> Samples:
    """Read and validate a samples file (format in this module's docstring).

    Raises MinirlError naming the file and line for: a missing or unreadable file, a
    line that is not JSON or not an object, a missing key or a value of the wrong type,
    a repeated (problem_id, sample_index), a problem whose gold or difficulty changes
    between lines, problems with different numbers of samples, and an empty file."""
    path = str(path)
    pids, sidx, diffs, golds, resp, ntok, trunc, answers, correct, lines, quest = ([] for _ in range(11))
    for lineno, rec in _lines(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise MinirlError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in ("problem_id", "difficulty", "gold", "sample_index", "response",
                               "num_tokens", "finish_reason", "answer", "correct") if k not in rec]
        if missing:
            raise MinirlError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}")
        pid, d, fr, a, c = rec["problem_id"], rec["difficulty"], rec["finish_reason"], rec["answer"], rec["correct"]
        if not isinstance(pid, str):
            raise MinirlError(f"{where}: 'problem_id' must be a string, got {pid!r}")
        if d is not None and not _is_int(d):
            raise MinirlError(f"{where}: 'difficulty' must be an integer or null, got {d!r}")
        if not isinstance(rec["gold"], str):
            raise MinirlError(f"{where}: 'gold' must be a string, got {rec['gold']!r}")
        if not (_is_int(rec["sample_index"]) and rec["sample_index"] >= 0):
            raise MinirlError(f"{where}: 'sample_index' must be an integer >= 0, got {rec['sample_index']!r}")
        if not isinstance(rec["response"], str):
            raise MinirlError(f"{where}: 'response' must be a string")
        if not (_is_int(rec["num_tokens"]) and rec["num_tokens"] >= 0):
            raise MinirlError(f"{where}: 'num_tokens' must be an integer >= 0, got {rec['num_tokens']!r}")
        if fr not in FINISH_REASONS:
            raise MinirlError(f"{where}: 'finish_reason' must be one of {FINISH_REASONS}, got {fr!r}")
        if a is not None and not isinstance(a, str):
            raise MinirlError(f"{where}: 'answer' must be a string or null, got {a!r}")
        if type(c) is not bool:
            raise MinirlError(f"{where}: 'correct' must be true or false, got {c!r}")
        q = rec.get("question")
        if q is not None and not isinstance(q, str):
            raise MinirlError(f"{where}: 'question' must be a string when present")
        quest.append(q)
        pids.append(pid)
        sidx.append(rec["sample_index"])
        diffs.append(d)
        golds.append(rec["gold"])
        resp.append(rec["response"])
        ntok.append(rec["num_tokens"])
        trunc.append(fr == "length")
        answers.append(a)
        correct.append(c)
        lines.append(lineno)
    if not pids:
        raise MinirlError(f"{path}: no samples (empty file)")

    # Group lines by problem (first-appearance order), checking per-problem consistency.
    rows = {}  # problem_id -> {sample_index: record number}
    first = {}
    for r, (pid, si) in enumerate(zip(pids, sidx)):
        row = rows.get(pid)
        if row is None:
            rows[pid] = row = {}
            first[pid] = r
        elif diffs[r] != diffs[first[pid]] or golds[r] != golds[first[pid]] or quest[r] != quest[first[pid]]:
            key = ("difficulty" if diffs[r] != diffs[first[pid]] else "gold" if golds[r] != golds[first[pid]]
                   else "question")
            raise MinirlError(f"{path}:{lines[r]}: problem {pid!r} has a different {key!r} than on line "
                              f"{lines[first[pid]]}")
        if si in row:
            raise MinirlError(f"{path}:{lines[r]}: problem {pid!r} sample_index {si} repeats line {lines[row[si]]}")
        row[si] = r
    sizes = {pid: len(row) for pid, row in rows.items()}
    n = collections.Counter(sizes.values()).most_common(1)[0][0]  # the usual sample count
    odd = [pid for pid, size in sizes.items() if size != n]
    if odd:
        shown = ", ".join(f"{pid!r} has {sizes[pid]}" for pid in odd[:3])
        raise MinirlError(f"{path}: problems have different numbers of samples: most have {n}, but "
                          f"{shown}{' ...' if len(odd) > 3 else ''} ({len(odd)} problem(s) differ; "
                          "an interrupted `evaluate.py sample` can be resumed to complete them)")

    order = np.array([[row[si] for si in sorted(row)] for row in rows.values()])  # [P, n] record numbers
    settings = read_settings(path)
    return Samples(
        path=path, label=label or _default_label(path, settings), settings=settings,
        problem_ids=list(rows), difficulty=[diffs[first[pid]] for pid in rows],
        gold=[golds[first[pid]] for pid in rows],
        correct=np.array(correct, dtype=bool)[order], num_tokens=np.array(ntok, dtype=np.int64)[order],
        truncated=np.array(trunc, dtype=bool)[order],
        answers=[[answers[r] for r in row] for row in order.tolist()],
        responses=[[resp[r] for r in row] for row in order.tolist()],
        questions=[quest[first[pid]] for pid in rows])


def _check_compatible(ref: Samples, other: Samples):
    """Same n and the same problem set, or a MinirlError naming both files."""
    if other.n != ref.n:
        raise MinirlError(f"{other.path} has n={other.n} samples per problem but {ref.path} has n={ref.n}; "
                          "compare samples drawn with the same n")
    a, b = set(ref.problem_ids), set(other.problem_ids)
    if a != b:
        only_ref, only_other = sorted(a - b), sorted(b - a)
        parts = []
        if only_ref:
            parts.append(f"{len(only_ref)} only in {ref.path} (e.g. {only_ref[0]!r})")
        if only_other:
            parts.append(f"{len(only_other)} only in {other.path} (e.g. {only_other[0]!r})")
        raise MinirlError(f"{ref.path} and {other.path} hold different problems: {'; '.join(parts)}")
    # The same ids must mean the same problems (files sampled from other data or task settings).
    gold = dict(zip(other.problem_ids, other.gold))
    quest = dict(zip(other.problem_ids, other.questions))
    for pid, g, q in zip(ref.problem_ids, ref.gold, ref.questions):
        if gold[pid] != g or (q is not None and quest[pid] is not None and quest[pid] != q):
            what = f"gold {g!r} vs {gold[pid]!r}" if gold[pid] != g else f"question {q!r} vs {quest[pid]!r}"
            raise MinirlError(f"{ref.path} and {other.path} give problem {pid!r} different problems ({what}): "
                              "they were sampled from different data; compare files of the same problems")


# --------------------------------------------------------------------------- analysis

@dataclass
class _Model:
    """Everything computed for one model; arrays are [P] or [P, n] or [K, P]."""
    samples: Samples
    counts: np.ndarray        # [P] correct samples per problem
    rate: np.ndarray          # [P] fraction correct
    pass_k: np.ndarray        # [K, P]
    maj_k: np.ndarray         # [K, P]
    entropy: np.ndarray       # [P] nats, "no answer" counted as an outcome
    chars: np.ndarray         # [P, n]
    no_answer: np.ndarray     # [P, n] bool
    reflection: metrics.PhraseCounts  # per_text reshaped to [P, n]
    categories: dict          # name -> PhraseCounts (per_text [P, n])
    words: object             # collections.Counter of all responses' words
    num_words: int
    tokens: object = None     # collections.Counter of tokenizer tokens (None: no tokenizer)
    behaviours: dict = None   # name -> [P, n] float labels (NaN: not judged / unparseable)
    unparseable: dict = None  # name -> count of unparseable judgments


def _analyse(s: Samples, ks, maj_draws, seed, reflection_phrases, categories, grouping) -> _Model:
    P, n = s.correct.shape
    counts = s.correct.sum(1)
    normalize = metrics.canonical_key if grouping == "canonical" else metrics.normalize_answer
    classes = metrics.answer_classes(s.answers, s.correct, normalize=normalize)
    flat = [r for row in s.responses for r in row]
    # Lower-case once; words, reflection phrases and token categories all read this form.
    lowered = [metrics.lowercase_text(r) for r in flat]
    words = metrics.count_words(lowered, lowercased=True)
    # One scan for all phrase lists; the reflection list gets a key no category can have.
    lists = {("reflection",): reflection_phrases, **{("category", k): v for k, v in categories.items()}}
    found = metrics.count_phrases(lowered, lists, lowercased=True)
    del lowered
    for pc in found.values():
        pc.per_text = pc.per_text.reshape(P, n)
    return _Model(
        samples=s, counts=counts, rate=counts / n,
        pass_k=np.stack([metrics.pass_at_k(n, counts, k) for k in ks]),
        maj_k=np.stack([metrics.maj_at_k(classes, k, draws=maj_draws, seed=seed) for k in ks]),
        entropy=metrics.answer_entropy(classes),
        chars=np.array([len(r) for r in flat], dtype=np.int64).reshape(P, n),
        no_answer=classes.ids < 0, reflection=found[("reflection",)],
        categories={k: found[("category", k)] for k in categories},
        words=words, num_words=sum(words.values()))


def _ci(mean, low, high):
    return {"mean": mean, "ci_low": low, "ci_high": high}


def _metric_matrix(m: _Model):
    """[P, 1 + 2K]: accuracy, pass@k for each k, maj@k for each k (bootstrapped together)."""
    return np.concatenate([m.rate[:, None], m.pass_k.T, m.maj_k.T], 1)


def _unpack_cis(mean, low, high, ks):
    K = len(ks)
    pick = lambda i: _ci(mean[i], low[i], high[i])  # noqa: E731
    return {"accuracy": pick(0),
            "pass_at_k": {str(k): pick(1 + i) for i, k in enumerate(ks)},
            "maj_at_k": {str(k): pick(1 + K + i) for i, k in enumerate(ks)}}


def _by_correctness(values, correct, groups, num_groups):
    """{"all", "correct", "incorrect"}: lists over groups."""
    return {key: list(v) for key, v in metrics.response_means(values, correct, groups, num_groups).items()}


def _overall(values, correct):
    zeros = np.zeros(correct.shape[0], dtype=np.int64)
    return {key: v[0] for key, v in metrics.response_means(values, correct, zeros, 1).items()}


def _group_table(m: _Model, groups, labels, ranges=None):
    """Per group of problems (bins or levels) for one model."""
    G = len(labels)
    s = m.samples
    rate, count = metrics.group_mean(m.rate, groups, G)
    solved, _ = metrics.group_mean(m.counts > 0, groups, G)
    entropy, _ = metrics.group_mean(m.entropy, groups, G)
    trunc, _ = metrics.group_mean(s.truncated.mean(1), groups, G)
    tokens = _by_correctness(s.num_tokens, s.correct, groups, G)
    chars = _by_correctness(m.chars, s.correct, groups, G)
    refl = _by_correctness(m.reflection.per_text, s.correct, groups, G)
    rows = []
    for g in range(G):
        row = {"group": labels[g]}
        if ranges is not None:
            row["low"], row["high"] = ranges[g]
        row.update({
            "num_problems": int(count[g]), "success_rate": rate[g], "solved_fraction": solved[g],
            "answer_entropy": entropy[g], "truncation_rate": trunc[g],
            "tokens": {k: v[g] for k, v in tokens.items()}, "chars": {k: v[g] for k, v in chars.items()},
            "reflection_per_response": {k: v[g] for k, v in refl.items()}})
        rows.append(row)
    return rows


def _model_section(m: _Model, cis, bins, ref_bin, levels, level_idx, bootstrap, seed, confidence):
    s = m.samples
    total_words = m.num_words
    num_responses = s.correct.size
    cats = {}
    for name, pc in m.categories.items():
        cats[name] = {
            "per_1k_tokens": _ci(*metrics.ratio_bootstrap_ci(pc.per_text.sum(1), s.num_tokens.sum(1), bootstrap,
                                                             seed, confidence)),
            "per_1k_words": 1000 * int(pc.per_text.sum()) / max(total_words, 1),
            "per_response": _overall(pc.per_text, s.correct),
            "fraction_of_responses": float((pc.per_text > 0).mean()),
            "phrases_per_1k_words": {p: 1000 * c / max(total_words, 1) for p, c in pc.totals.items()}}
    return {
        "label": s.label, "path": s.path, "settings": s.settings,
        "num_problems": s.num_problems, "n": s.n, **cis,
        "answer_entropy": float(m.entropy.mean()),
        "no_answer_rate": float(m.no_answer.mean()), "truncation_rate": float(s.truncated.mean()),
        "tokens": _overall(s.num_tokens, s.correct), "chars": _overall(m.chars, s.correct),
        "num_words": total_words, "words_per_response": total_words / num_responses,
        "reflection": {
            "per_response": _overall(m.reflection.per_text, s.correct),
            "fraction_of_responses": float((m.reflection.per_text > 0).mean()),
            "phrases_per_1k_responses": {p: 1000 * c / num_responses for p, c in m.reflection.totals.items()}},
        "categories": cats,
        "by_bin": _group_table(m, ref_bin, metrics.bin_labels(bins), bins),
        "by_level": None if levels is None else _group_table(m, level_idx, [str(v) for v in levels]),
        "behaviours": _behaviour_section(m, ref_bin, metrics.bin_labels(bins), bootstrap, seed, confidence),
    }


def _behaviour_section(m: _Model, ref_bin, bin_names, bootstrap, seed, confidence):
    """Share of judged responses showing each behaviour: overall with a bootstrap interval
    over problems (ratio of sums), per reference bin and per correct / incorrect."""
    if not m.behaviours:
        return None
    s = m.samples
    out = {}
    for name, lab in m.behaviours.items():
        parsed = ~np.isnan(lab)                                  # [P, n]
        shown = np.where(parsed, lab > 0, False)                 # [P, n]
        if not parsed.any():
            out[name] = {"judged": 0, "unparseable": m.unparseable[name], "share": _ci(None, None, None)}
            continue
        share = _ci(*metrics.ratio_bootstrap_ci(shown.sum(1), parsed.sum(1), bootstrap, seed, confidence, scale=1.0))
        by_bin = []
        for g, gname in enumerate(bin_names):
            rows = ref_bin == g
            row = {"group": gname}
            for kind, mask in (("all", parsed), ("correct", parsed & s.correct), ("incorrect", parsed & ~s.correct)):
                k = mask[rows]
                row[kind] = float(shown[rows][k].mean()) if k.any() else None
                row[f"{kind}_n"] = int(k.sum())
            by_bin.append(row)
        sel = lambda mask: float(shown[mask].mean()) if mask.any() else None  # noqa: E731
        out[name] = {"judged": int(parsed.sum()), "unparseable": m.unparseable[name], "share": share,
                     "correct": sel(parsed & s.correct), "incorrect": sel(parsed & ~s.correct),
                     "mean_label": float(lab[parsed].mean()), "by_bin": by_bin}
    return out


def _behaviour_deltas(ref: _Model, other: _Model, bootstrap, seed, confidence):
    """Paired change in the share showing each behaviour, over problems judged in both."""
    if not ref.behaviours or not other.behaviours:
        return None
    out = {}
    for name in ref.behaviours:
        if name not in other.behaviours:
            continue
        shares = []
        for m in (ref, other):
            lab = m.behaviours[name]
            parsed = ~np.isnan(lab)
            with np.errstate(invalid="ignore"):
                shares.append(np.where(parsed, lab > 0, 0).sum(1) / parsed.sum(1))  # [P], NaN: none judged
        both = ~np.isnan(shares[0]) & ~np.isnan(shares[1])
        if not both.any():
            continue
        delta = _ci(*metrics.bootstrap_ci(shares[1][both] - shares[0][both], bootstrap, seed, confidence))
        out[name] = {"problems": int(both.sum()), "change": delta}
    return out


def _comparison(ref: _Model, other: _Model, delta_cis, bins, ref_bin, levels, level_idx,
                word_min_count, word_top, tokens_note, bootstrap, seed, confidence):
    labels = metrics.bin_labels(bins)
    B = len(bins)
    change = metrics.success_change_by_group(ref.samples.correct, other.samples.correct, ref_bin, B)
    other_bin = metrics.assign_bins(other.counts, bins)
    counts, fractions = metrics.transition_matrix(ref_bin, other_bin, B)

    def change_rows(ch, names):
        return [{"group": names[g], "num_problems": int(ch["num_problems"][g]), "reference_success": ch["reference"][g],
                 "other_success": ch["other"][g], "change": ch["change"][g]} for g in range(len(names))]

    level_rows = None
    if levels is not None:
        ch = metrics.success_change_by_group(ref.samples.correct, other.samples.correct, level_idx, len(levels))
        level_rows = change_rows(ch, [str(v) for v in levels])
    r_any, o_any = ref.counts > 0, other.counts > 0
    return {
        "reference": ref.samples.label, "other": other.samples.label, "delta": delta_cis,
        "bins": change_rows(change, labels), "levels": level_rows,
        "transitions": {"bins": labels, "counts": counts.tolist(), "row_fractions": fractions.tolist()},
        "solved_at_least_once": {"both": int((r_any & o_any).sum()), "only_reference": int((r_any & ~o_any).sum()),
                                 "only_other": int((~r_any & o_any).sum()), "neither": int((~r_any & ~o_any).sum())},
        "word_frequency": (None if tokens_note.get("character_level") else
                           metrics.word_log_ratios(ref.words, other.words, min_count=word_min_count, top=word_top)),
        "token_frequency": (None if ref.tokens is None or other.tokens is None else
                            metrics.word_log_ratios(ref.tokens, other.tokens, min_count=word_min_count, top=word_top)),
        "behaviours": _behaviour_deltas(ref, other, bootstrap, seed, confidence),
    }


def _tokenizer_dir(s: Samples, tokenizer):
    path = tokenizer or (s.settings or {}).get("model")
    if isinstance(path, str) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    return None


def _count_model_tokens(samples, models, tokenizer):
    """Token counts per model (m.tokens), when every model's tokenizer is found and all are
    the same vocabulary. Returns what the report says about it: {"tokenizer", "character_level",
    "note"} (note: why there is no token table, else None)."""
    from minirl.tokenizer import load_tokenizer
    dirs = [_tokenizer_dir(s, tokenizer) for s in samples]
    missing = [s.label for s, d in zip(samples, dirs) if d is None]
    if missing:
        return {"tokenizer": None, "character_level": False,
                "note": f"no tokenizer found for {', '.join(missing)} (the settings' model folder is not "
                        "here): pass --tokenizer DIR for the token-level tables"}
    toks = {d: load_tokenizer(d) for d in dict.fromkeys(dirs)}
    vocabs = [toks[d].get_vocab() for d in toks]
    if any(v != vocabs[0] for v in vocabs[1:]):
        return {"tokenizer": None, "character_level": False,
                "note": "the models use different tokenizers, so their tokens cannot be compared "
                        "(pass --tokenizer DIR to count all with one)"}
    tok = toks[dirs[0]]
    keys = metrics.token_keys(tok)
    if all(len(k) <= 1 for k in keys):
        return {"tokenizer": dirs[0], "character_level": True,
                "note": "the tokenizer is character-level: its tokens are characters and its 'words' are "
                        "runs of characters, not vocabulary choices, so no word or token table is shown"}
    for s, m in zip(samples, models):
        m.tokens = metrics.count_tokens((r for row in s.responses for r in row), tok, keys)
    return {"tokenizer": dirs[0], "character_level": False, "note": None}


def _read_model_behaviours(samples, models, judge_id):
    """Behaviour labels from each samples file's judgments file (judge.judgments_path), when
    there is one: m.behaviours {name: [P, n] float, NaN where not judged or unparseable}."""
    from minirl import judge
    found = None
    for s, m in zip(samples, models):
        path = judge.judgments_path(s.path)
        if not os.path.exists(path):
            continue
        labels, jid = judge.read_labels(path, judge_id)
        if found is not None and jid != found:
            raise MinirlError(f"{path}: judged by {jid!r} but another file by {found!r}; pick one with --judge-id")
        found = jid
        where = {pid: p for p, pid in enumerate(s.problem_ids)}
        P, n = s.correct.shape
        m.behaviours, m.unparseable = {}, {}
        for (pid, j, name), label in labels.items():
            if pid not in where or not 0 <= j < n:
                continue
            arr = m.behaviours.setdefault(name, np.full((P, n), np.nan))
            m.unparseable.setdefault(name, 0)
            if label is None:
                m.unparseable[name] += 1
            else:
                arr[where[pid], j] = float(label)
    return found


def _resolve_ks(ks, n):
    if ks is None:
        return metrics.default_ks(n)
    ks = list(ks)
    if not ks or any(not (_is_int(k) or isinstance(k, np.integer)) or not 1 <= k <= n for k in ks):
        raise MinirlError(f"--ks: every k must be an integer in 1..n={n}, got {ks}")
    return sorted({int(k) for k in ks})


def _assign_labels(samples, labels):
    if labels is not None:
        if len(labels) != len(samples):
            raise MinirlError(f"--labels: got {len(labels)} labels for {len(samples)} samples files")
        if len(set(labels)) != len(labels):
            raise MinirlError(f"--labels: labels must be distinct, got {list(labels)}")
        for s, lab in zip(samples, labels):
            s.label = str(lab)
        return
    # Default labels come from the settings' model name; two runs of one model (say
    # two checkpoints saved under the same name) fall back to file names, then numbers.
    if len({s.label for s in samples}) != len(samples):
        for s in samples:
            s.label = _file_stem(s.path)
    if len({s.label for s in samples}) != len(samples):
        for i, s in enumerate(samples):
            s.label = f"{s.label}-{i}"


def build_report(sample_files, out_dir, labels=None, reference_index=0, ks=None, bootstrap=1000, seed=0, *,
                 bin_edges=metrics.PAPER_BIN_EDGES, reflection_phrases=metrics.REFLECTION_PHRASES,
                 categories=None, maj_draws=500, confidence=0.95, word_min_count=20, word_top=25,
                 plots=True, answer_grouping="canonical", tokenizer=None, judge_id=None) -> dict:
    """Analyse samples files and write report.json, report.md and (with matplotlib) PNGs.

    sample_files: paths of samples files (format in this module's docstring);
    sample_files[reference_index] is the reference (base) model, every other file is
    compared with it. labels: names of the models (default: from the settings file, else
    the file name). ks: the k of pass@k and maj@k (default 1, 2, 4, ..., n).
    bootstrap: resamples of problems for the confidence intervals (0: none); seed seeds
    the bootstrap and the maj@k Monte-Carlo draws. bin_edges: upper edges of the
    difficulty bins for n = 256 (scaled for other n, see metrics.difficulty_bins).
    reflection_phrases / categories: phrase lists (categories: {name: phrases}, default
    the anthropomorphic tokens and logical connectors of metrics.py). answer_grouping:
    "canonical" (maj@k and answer entropy group answers by value, metrics.canonical_key)
    or "string" (metrics.normalize_answer). tokenizer: folder of the tokenizer for the
    token-level frequencies (default: each file's settings "model"). judge_id: whose
    behaviour labels to show (judgments files beside the samples, see minirl/judge.py).

    Difficulty bins group problems by the reference model's correct count; when every
    problem of the reference file has a `difficulty`, the same tables are also given
    per task level. Returns the report (the content of report.json); all numbers are
    fractions (0..1), the markdown shows percentages."""
    files = [str(f) for f in sample_files]
    if not files:
        raise MinirlError("report: give at least one samples file")
    if not (isinstance(reference_index, int) and 0 <= reference_index < len(files)):
        raise MinirlError(f"--reference: must be in 0..{len(files) - 1}, got {reference_index!r}")
    if bootstrap < 0:
        raise MinirlError(f"--bootstrap: must be >= 0, got {bootstrap}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise MinirlError(f"--out: {out_dir} exists and is not a folder")
    if answer_grouping not in ("canonical", "string"):
        raise MinirlError(f"--answer-grouping: 'canonical' or 'string', got {answer_grouping!r}")
    if categories is None:
        categories = {"anthropomorphic": metrics.ANTHROPOMORPHIC_TOKENS, "connectors": metrics.LOGICAL_CONNECTORS}
    samples = [read_samples(f) for f in files]
    _assign_labels(samples, labels)
    ref_s = samples[reference_index]
    for s in samples:
        if s is not ref_s:
            _check_compatible(ref_s, s)
    samples = [s if s is ref_s else s.reordered(ref_s.problem_ids) for s in samples]
    n = ref_s.n
    ks = _resolve_ks(ks, n)

    models = [_analyse(s, ks, maj_draws, seed, reflection_phrases, categories, answer_grouping) for s in samples]
    tokens_note = _count_model_tokens(samples, models, tokenizer)
    judge_used = _read_model_behaviours(samples, models, judge_id)
    ref = models[reference_index]
    bins = metrics.difficulty_bins(n, bin_edges)
    ref_bin = metrics.assign_bins(ref.counts, bins)
    levels = level_idx = None
    if all(d is not None for d in ref_s.difficulty):
        levels = sorted(set(ref_s.difficulty))
        level_idx = np.searchsorted(levels, ref_s.difficulty)

    # Confidence intervals: the same resamples (same seed) for every model, so the
    # differences to the reference are paired bootstrap intervals.
    ref_matrix = _metric_matrix(ref)
    model_sections, comparisons = [], []
    for i, m in enumerate(models):
        cis = _unpack_cis(*metrics.bootstrap_ci(_metric_matrix(m), bootstrap, seed, confidence), ks)
        section = _model_section(m, cis, bins, ref_bin, levels, level_idx, bootstrap, seed, confidence)
        section["reference"] = i == reference_index
        model_sections.append(section)
        if i != reference_index:
            delta = _unpack_cis(*metrics.bootstrap_ci(_metric_matrix(m) - ref_matrix, bootstrap, seed, confidence), ks)
            comparisons.append(_comparison(ref, m, delta, bins, ref_bin, levels, level_idx,
                                           word_min_count, word_top, tokens_note, bootstrap, seed, confidence))

    report = {
        "minirl_report": REPORT_VERSION,
        "reference": ref_s.label,
        "settings": {"ks": ks, "bootstrap": bootstrap, "confidence": confidence, "seed": seed,
                     "maj_draws": maj_draws, "bins": metrics.bin_labels(bins), "bin_edges": list(bin_edges),
                     "reflection_phrases": list(reflection_phrases),
                     "categories": {k: list(v) for k, v in categories.items()},
                     "word_min_count": word_min_count, "answer_grouping": answer_grouping,
                     "tokens": tokens_note, "judge": judge_used},
        "models": model_sections,
        "comparisons": comparisons,
        "problems": {
            "ids": ref_s.problem_ids, "difficulty": ref_s.difficulty, "reference_bin": ref_bin.tolist(),
            "correct_counts": {m.samples.label: m.counts.tolist() for m in models},
            "answer_entropy": {m.samples.label: m.entropy.tolist() for m in models}},
        "figures": [],
    }
    report = _jsonable(report)
    os.makedirs(out_dir, exist_ok=True)
    if plots:
        report["figures"] = write_figures(report, out_dir)
    atomic_write_json(os.path.join(out_dir, "report.json"), report)
    atomic_write_text(os.path.join(out_dir, "report.md"), render_markdown(report))
    return report


def _jsonable(x):
    """numpy -> python; NaN and infinities -> None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


# --------------------------------------------------------------------------- markdown

def _pct(x, digits=1):
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _num(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _ci_text(ci, scale=100, digits=1, signed=False):
    if ci["mean"] is None:
        return "-"
    sign = "+" if signed else ""
    return (f"{scale * ci['mean']:{sign}.{digits}f} [{scale * ci['ci_low']:{sign}.{digits}f}, "
            f"{scale * ci['ci_high']:{sign}.{digits}f}]")


def render_markdown(report: dict) -> str:
    """report.md from the report dict: every table shows numbers of report.json."""
    st = report["settings"]
    models = report["models"]
    names = [m["label"] for m in models]
    n = models[0]["n"]
    out = ["# minirl report\n\n" + _takeaway(report) + "\n"]
    out.append(f"Reference model: **{report['reference']}**. "
               f"{models[0]['num_problems']} problems, n = {n} samples per problem. Rates in %, "
               f"intervals are {int(100 * st['confidence'])}% bootstrap intervals over problems "
               f"({st['bootstrap']} resamples, paired across models). maj@k ties are shared; for 1 < k < n "
               f"it is estimated from {st['maj_draws']} random draws per problem unless exact. maj@k and the "
               f"answer entropy group answers "
               + ("by mathematical value (grader.canonical_answer: 1/2 and 0.5 are one answer).\n"
                  if st.get("answer_grouping", "string") == "canonical" else "by normalised string.\n"))
    model_of = lambda m: (m.get("settings") or {}).get("model")  # noqa: E731
    out.append("\n" + "".join(f"- **{m['label']}**: {m['path']}" + (f" (model {model_of(m)})" if model_of(m) else "")
                               + "\n" for m in models))

    out.append("\n## Models\n\n")
    out.append(_table(
        ["model", "accuracy (pass@1)", f"maj@{n}", f"pass@{n}", "answer entropy (nats)", "no answer", "truncated",
         "tokens", "chars", "reflection / response"],
        [[m["label"], _ci_text(m["accuracy"]), _pct(m["maj_at_k"][str(n)]["mean"]) if str(n) in m["maj_at_k"] else "-",
          _pct(m["pass_at_k"][str(n)]["mean"]) if str(n) in m["pass_at_k"] else "-",
          _num(m["answer_entropy"], 2), _pct(m["no_answer_rate"]), _pct(m["truncation_rate"]),
          _num(m["tokens"]["all"]), _num(m["chars"]["all"]), _num(m["reflection"]["per_response"]["all"], 2)]
         for m in models]))

    for key, title in (("pass_at_k", "pass@k (capability)"), ("maj_at_k", "maj@k (majority vote)")):
        out.append(f"\n## {title}\n\n")
        out.append(_table(["k"] + names, [[k] + [_ci_text(m[key][str(k)]) for m in models] for k in st["ks"]]))

    for section, title in (("by_bin", f"By difficulty bin (the reference's correct count out of {n})"),
                           ("by_level", "By task difficulty level")):
        if models[0][section] is None:
            continue
        groups = [row["group"] for row in models[0][section]]
        counts = [row["num_problems"] for row in models[0][section]]
        rows_of = lambda m: m[section]  # noqa: E731
        out.append(f"\n## {title}\n\n")
        out.append("Success rate (%):\n\n")
        out.append(_table(["group", "problems"] + names,
                          [[g, c] + [_pct(rows_of(m)[i]["success_rate"]) for m in models]
                           for i, (g, c) in enumerate(zip(groups, counts))]))
        out.append("\nAnswer entropy (nats, 'no answer' is an outcome):\n\n")
        out.append(_table(["group"] + names, [[g] + [_num(rows_of(m)[i]["answer_entropy"], 2) for m in models]
                                              for i, g in enumerate(groups)]))
        for measure, label in (("tokens", "Response length (tokens)"), ("chars", "Response length (characters)"),
                               ("reflection_per_response", "Reflection phrases per response")):
            if measure == "reflection_per_response" and not _any_reflection(models):
                continue  # said once, in the reflection section
            digits = 2 if measure == "reflection_per_response" else 0
            out.append(f"\n{label}, correct / incorrect responses:\n\n")
            out.append(_table(["group"] + names,
                              [[g] + [f"{_num(rows_of(m)[i][measure]['correct'], digits)} / "
                                      f"{_num(rows_of(m)[i][measure]['incorrect'], digits)}" for m in models]
                               for i, g in enumerate(groups)]))

    out.append("\n## Reflection phrases and token categories\n\n")
    out.append(_reflection_markdown(report))
    out.append(_behaviours_markdown(report))

    for c in report["comparisons"]:
        ref, oth = c["reference"], c["other"]
        out.append(f"\n## {oth} vs {ref} (reference)\n\n")
        out.append(f"Change {oth} - {ref}, percentage points [paired bootstrap interval]:\n\n")
        rows = [["pass@1 (accuracy)", _ci_text(c["delta"]["accuracy"], signed=True)]]
        rows += [[f"pass@{k}", _ci_text(c["delta"]["pass_at_k"][str(k)], signed=True)] for k in st["ks"] if k != 1]
        rows += [[f"maj@{k}", _ci_text(c["delta"]["maj_at_k"][str(k)], signed=True)] for k in st["ks"]]
        out.append(_table(["metric", "change"], rows))
        sol = c["solved_at_least_once"]
        out.append(f"\nSolved at least once: both {sol['both']}, only {ref} {sol['only_reference']}, "
                   f"only {oth} {sol['only_other']}, neither {sol['neither']}.\n")
        for key, title in (("bins", f"per difficulty bin ({ref}'s correct count)"), ("levels", "per task level")):
            if c[key] is None:
                continue
            out.append(f"\nMean success rate {title} (%):\n\n")
            out.append(_table(["group", "problems", ref, oth, "change (pp)"],
                              [[r["group"], r["num_problems"], _pct(r["reference_success"]), _pct(r["other_success"]),
                                "-" if r["change"] is None else f"{100 * r['change']:+.1f}"] for r in c[key]]))
        t = c["transitions"]
        out.append(f"\nTransitions: rows are {ref}'s bin, columns {oth}'s bin; problems (row %):\n\n")
        out.append(_table([f"{ref} \\ {oth}"] + t["bins"],
                          [[t["bins"][i]] + [f"{cnt} ({_pct(frac, 0)})" if cnt else "0"
                                             for cnt, frac in zip(t["counts"][i], t["row_fractions"][i])]
                           for i in range(len(t["bins"]))]))
        out.append(_frequency_markdown(c, st))
        if c.get("behaviours") and _any_behaviour(report["models"]):
            out.append(f"\nChange in the share of responses showing each behaviour, {oth} - {ref} "
                       "(percentage points, paired over the problems judged in both):\n\n")
            out.append(_table(["behaviour", "problems", "change"],
                              [[b, d["problems"], _ci_text(d["change"], signed=True)]
                               for b, d in c["behaviours"].items()]))

    if report["figures"]:
        out.append("\n## Figures\n\n" + "".join(f"![{f}]({f})\n" for f in report["figures"]))
    return "".join(out)


def _takeaway(report):
    """Two lines a reader takes away: the change in pass@1 and in pass@k (largest k) with
    their intervals, for each model against the reference; for one model, its own values."""
    st, models = report["settings"], report["models"]
    k = max(st["ks"])
    if not report["comparisons"]:
        m = models[0]
        return (f"**{m['label']}**: pass@1 {_ci_text(m['accuracy'])}%  \n"
                f"**{m['label']}**: pass@{k} {_ci_text(m['pass_at_k'][str(k)])}%\n")
    line1 = "; ".join(f"**{c['other']}** vs {c['reference']}: pass@1 {_ci_text(c['delta']['accuracy'], signed=True)} pp"
                      for c in report["comparisons"])
    line2 = "; ".join(f"**{c['other']}** vs {c['reference']}: pass@{k} "
                      f"{_ci_text(c['delta']['pass_at_k'][str(k)], signed=True)} pp" for c in report["comparisons"])
    return line1 + "  \n" + line2 + "\n"


def _any_behaviour(models):
    return any((b.get("share") or {}).get("mean") for m in models for b in (m.get("behaviours") or {}).values())


def _any_reflection(models):
    return any(m["reflection"]["fraction_of_responses"] for m in models)


def _reflection_markdown(report):
    """Reflection phrases and the token categories; rows that are zero for every model are
    left out, and a list with no match at all is one line saying so."""
    st, models = report["settings"], report["models"]
    names = [m["label"] for m in models]
    out = []
    if _any_reflection(models):
        out.append("Responses with a reflection phrase (%): "
                   + ", ".join(f"{m['label']} {_pct(m['reflection']['fraction_of_responses'])}" for m in models)
                   + ". Reflection phrases per 1000 responses (phrases found in no response left out):\n\n")
        phrases = [p for p in models[0]["reflection"]["phrases_per_1k_responses"]
                   if any(m["reflection"]["phrases_per_1k_responses"][p] for m in models)]
        out.append(_table(["phrase", *names], [[p] + [_num(m["reflection"]["phrases_per_1k_responses"][p], 1)
                                                      for m in models] for p in phrases]))
    else:
        out.append("Reflection phrases: none found in any response.\n")
    cats = [c for c in st["categories"] if any(m["categories"][c]["per_1k_words"] for m in models)]
    for c in st["categories"]:
        if c not in cats:
            out.append(f"\nToken category **{c}**: none found in any response.\n")
    if cats:
        out.append("\nToken categories (Hu et al.): matches per 1000 generated tokens [bootstrap interval], and per "
                   "1000 words; then each phrase per 1000 words (case-insensitive, whole words; phrases found in no "
                   "response left out):\n\n")
        rows = []
        for c in cats:
            rows.append([f"**{c}** per 1k tokens"] + [_ci_text(m["categories"][c]["per_1k_tokens"], scale=1, digits=2)
                                                      for m in models])
            rows.append([f"**{c}** per 1k words"] + [_num(m["categories"][c]["per_1k_words"], 2) for m in models])
            for p in models[0]["categories"][c]["phrases_per_1k_words"]:
                if any(m["categories"][c]["phrases_per_1k_words"][p] for m in models):
                    rows.append([f"&nbsp; {p}"] + [_num(m["categories"][c]["phrases_per_1k_words"][p], 2)
                                                   for m in models])
        out.append(_table(["", *names], rows))
    return "".join(out)


def _frequency_markdown(c, st):
    """The word table and the token table of one comparison (or why there is none)."""
    ref, oth = c["reference"], c["other"]
    note = (st.get("tokens") or {}).get("note")
    out = []
    if (st.get("tokens") or {}).get("character_level"):
        return f"\nWords and tokens over- and under-used: not shown: {note}.\n"
    for freq_key, unit in (("word_frequency", "Words"), ("token_frequency", "Tokens")):
        freq = c.get(freq_key)
        if freq is None:
            out.append(f"\n{unit} over- and under-used: not shown: {note}.\n" if note else "")
            continue
        for key, title in (("over_used", f"{unit} {oth} uses more than {ref}"),
                           ("under_used", f"{unit} {oth} uses less than {ref}")):
            out.append(f"\n{title} (smoothed log-ratio of frequencies, seen >= {st['word_min_count']} times):\n\n")
            if not freq[key]:
                out.append("none found.\n")
                continue
            col = "token" if unit == "Tokens" else "word"
            out.append(_table([col, "log-ratio", f"{ref} per 1k", f"{oth} per 1k"],
                              [[f"`{w['word']}`" if unit == "Tokens" else w["word"], f"{w['log_ratio']:+.2f}",
                                _num(w["reference_per_1k"], 2), _num(w["other_per_1k"], 2)] for w in freq[key]]))
    return "".join(out)


def _behaviours_markdown(report):
    models = report["models"]
    have = [m for m in models if m.get("behaviours")]
    if not have:
        return ""
    names = list(dict.fromkeys(b for m in have for b in m["behaviours"]))
    head = f"\n## Cognitive behaviours (judge: {report['settings'].get('judge')})\n\n"
    if not _any_behaviour(models):
        judged = sum(b["judged"] for m in have for b in m["behaviours"].values())
        bad = sum(b["unparseable"] for m in have for b in m["behaviours"].values())
        return head + (f"None found: no judged response shows any of {', '.join(names)} ({judged} judgments"
                       f" parsed, {bad} unparseable).\n")
    out = [head,
           "Share of judged responses showing each behaviour (%) [bootstrap interval over problems]; "
           "judged / unparseable answers in brackets (unparseable answers are left out, never read as 'no'):\n\n"]
    cell = lambda m, b: ("-" if b not in (m.get("behaviours") or {}) else  # noqa: E731
                         f"{_ci_text(m['behaviours'][b]['share'])} ({m['behaviours'][b]['judged']} / "
                         f"{m['behaviours'][b]['unparseable']})")
    out.append(_table(["behaviour"] + [m["label"] for m in models],
                      [[b] + [cell(m, b) for m in models] for b in names]))
    out.append("\nCorrect / incorrect responses (%):\n\n")
    ci = lambda m, b: ("-" if b not in (m.get("behaviours") or {}) else  # noqa: E731
                       f"{_pct(m['behaviours'][b].get('correct'))} / {_pct(m['behaviours'][b].get('incorrect'))}")
    out.append(_table(["behaviour"] + [m["label"] for m in models], [[b] + [ci(m, b) for m in models] for b in names]))
    for m in have:
        rows = []
        for b in names:
            beh = m["behaviours"].get(b)
            if beh and beh.get("by_bin"):
                rows.append([b] + [f"{_pct(r['correct'])} / {_pct(r['incorrect'])}" for r in beh["by_bin"]])
        if rows:
            bins = [r["group"] for r in next(iter(m["behaviours"].values()))["by_bin"]]
            out.append(f"\n{m['label']}, per reference bin, correct / incorrect responses (%):\n\n")
            out.append(_table(["behaviour"] + bins, rows))
    return "".join(out)


# --------------------------------------------------------------------------- figures

def _safe(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def write_figures(report: dict, out_dir) -> list:
    """PNG figures of the report; returns their file names (relative to out_dir), or []
    when matplotlib is not installed. Uses matplotlib's object API with the Agg canvas
    directly (no pyplot), so it never touches the caller's backend or global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return []
    written = []

    def save(fig, name):
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        atomic_write_bytes(os.path.join(out_dir, name), buf.getvalue())
        written.append(name)

    st, models = report["settings"], report["models"]
    ks = st["ks"]

    # pass@k and maj@k curves with confidence bands.
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for i, m in enumerate(models):
        color = f"C{i}"
        for key, style in (("pass_at_k", "-"), ("maj_at_k", "--")):
            rows = [m[key][str(k)] for k in ks]
            mean = [100 * (r["mean"] or 0) for r in rows]
            ax.plot(ks, mean, style, color=color, marker="o", ms=3,
                    label=f"{m['label']} {'pass' if key == 'pass_at_k' else 'maj'}@k")
            ax.fill_between(ks, [100 * (r["ci_low"] or 0) for r in rows], [100 * (r["ci_high"] or 0) for r in rows],
                            color=color, alpha=0.15, lw=0)
    if len(ks) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("%")
    ax.set_title("pass@k (solid) and maj@k (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "pass_at_k.png")

    # Response length and reflection phrases per bin, correct vs incorrect.
    bins = [row["group"] for row in models[0]["by_bin"]]
    x = np.arange(len(bins))
    width = 0.8 / max(len(models), 1)
    for measure, ylabel, name in (("tokens", "mean tokens", "lengths.png"),
                                  ("reflection_per_response", "reflection phrases / response", "keywords.png")):
        if measure == "reflection_per_response" and not _any_reflection(models):
            continue  # no blank figures: report.md says "none found"
        fig = Figure(figsize=(9, 3.6))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, kind in zip(axes, ("correct", "incorrect")):
            for i, m in enumerate(models):
                vals = [row[measure][kind] or 0 for row in m["by_bin"]]
                ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, color=f"C{i}", label=m["label"])
            ax.set_xticks(x, bins, fontsize=8, rotation=30)
            ax.set_xlabel("reference correct-count bin")
            ax.set_title(f"{kind} responses")
        axes[0].set_ylabel(ylabel)
        axes[0].legend(fontsize=7)
        save(fig, name)

    # Token categories per 1000 words.
    cats = [c for c in st["categories"] if any(m["categories"][c]["per_1k_words"] for m in models)]
    if cats:
        fig = Figure(figsize=(5, 3.4))
        ax = fig.add_subplot()
        xc = np.arange(len(cats))
        for i, m in enumerate(models):
            ax.bar(xc + (i - (len(models) - 1) / 2) * width, [m["categories"][c]["per_1k_words"] for c in cats],
                   width, color=f"C{i}", label=m["label"])
        ax.set_xticks(xc, cats)
        ax.set_ylabel("per 1000 words")
        ax.legend(fontsize=7)
        save(fig, "categories.png")

    # Cognitive behaviours: share of responses with intervals.
    have = [m for m in models if m.get("behaviours")]
    if have and _any_behaviour(models):
        names = list(dict.fromkeys(b for m in have for b in m["behaviours"]))
        fig = Figure(figsize=(max(5, 1.2 * len(names)), 3.6))
        ax = fig.add_subplot()
        xb = np.arange(len(names))
        for i, m in enumerate(models):
            sh = [(m.get("behaviours") or {}).get(b, {}).get("share") or {} for b in names]
            mean = np.array([100 * (v.get("mean") or 0) for v in sh])
            err = np.array([[100 * ((v.get("mean") or 0) - (v.get("ci_low") or 0)) for v in sh],
                            [100 * ((v.get("ci_high") or 0) - (v.get("mean") or 0)) for v in sh]])
            ax.bar(xb + (i - (len(models) - 1) / 2) * width, mean, width, yerr=err, capsize=2, color=f"C{i}",
                   label=m["label"])
        ax.set_xticks(xb, names, fontsize=8, rotation=20)
        ax.set_ylabel("% of judged responses")
        ax.set_title(f"cognitive behaviours (judge: {st.get('judge')})", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, "behaviours.png")

    tags = set()
    for j, c in enumerate(report["comparisons"]):
        tag = _safe(c["other"])
        tag = tag if tag not in tags else f"{tag}_{j}"  # two labels may look alike once made safe
        tags.add(tag)
        fig = Figure(figsize=(6, 3.6))
        ax = fig.add_subplot()
        change = [100 * (r["change"] or 0) for r in c["bins"]]
        ax.bar(x, change, color=["C2" if v >= 0 else "C3" for v in change])
        for xi, v, r in zip(x, change, c["bins"]):
            ax.annotate(f"{v:+.1f}\n(n={r['num_problems']})", (xi, v), ha="center",
                        va="bottom" if v >= 0 else "top", fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, bins, fontsize=8, rotation=30)
        ax.set_xlabel(f"{c['reference']} correct-count bin")
        ax.set_ylabel("change in success rate (pp)")
        ax.set_title(f"{c['other']} - {c['reference']}")
        save(fig, f"bin_change_{tag}.png")

        t = c["transitions"]
        frac = np.array(t["row_fractions"], dtype=float)
        fig = Figure(figsize=(5.2, 4.4))
        ax = fig.add_subplot()
        im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(bins)):
            for j in range(len(bins)):
                ax.text(j, i, str(t["counts"][i][j]), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(bins)), bins, fontsize=8, rotation=30)
        ax.set_yticks(range(len(bins)), bins)
        ax.set_xlabel(f"{c['other']} bin")
        ax.set_ylabel(f"{c['reference']} bin")
        ax.set_title("problems per bin pair (colour: row fraction)", fontsize=9)
        fig.colorbar(im, ax=ax)
        save(fig, f"transitions_{tag}.png")
    return written
