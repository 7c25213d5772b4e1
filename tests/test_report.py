"""minirl.report: reading and validating samples files, and the report end to end."""
import json
import math
import os
import sys

import numpy as np
import pytest

from minirl import metrics as M
from minirl.common import MinirlError
from minirl.report import build_report, read_samples, settings_path

N = 8  # samples per problem in the constructed files


def record(pid, j, answer, gold, response, num_tokens=10, difficulty=None, finish="stop"):
    return {"problem_id": pid, "difficulty": difficulty, "gold": gold, "sample_index": j, "response": response,
            "num_tokens": num_tokens, "finish_reason": finish, "answer": answer,
            "correct": answer is not None and answer == gold}


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# Four problems; answers per sample for the reference ("base") and the other ("rl") model.
# gold answers: p0 "1", p1 "1", p2 "2", p3 "3".
GOLD = {"p0": "1", "p1": "1", "p2": "2", "p3": "3"}
BASE = {"p0": ["7"] * 8,                                   # 0 correct, one answer: entropy 0
        "p1": ["1", "1"] + ["2"] * 6,                      # 2 correct
        "p2": ["2"] * 8,                                   # 8 correct
        "p3": ["3"] * 4 + ["5", "5", None, None]}          # 4 correct
RL = {"p0": ["7"] * 4 + ["8"] * 4,                         # 0 correct, entropy log 2
      "p1": ["1"] * 6 + ["2"] * 2,                         # 6 correct
      "p2": ["2"] * 8,                                     # 8 correct
      "p3": ["3"] + ["5"] * 7}                             # 1 correct
BASE_TEXT = "Wait, let me think. The answer is {a}."         # reflection 2, anthropomorphic 2
RL_TEXT = "So the answer is {a}."                            # reflection 0, connectors 1


def model_records(answers, text, difficulty=True, tokens=(10, 20)):
    out = []
    for level, (pid, row) in enumerate(answers.items(), 1):
        for j, a in enumerate(row):
            ok = a == GOLD[pid]
            out.append(record(pid, j, a, GOLD[pid], text.format(a=a or "unknown"),
                              num_tokens=tokens[0] if ok else tokens[1], difficulty=level if difficulty else None,
                              finish="stop" if a is not None else "length"))
    return out


@pytest.fixture
def pair(tmp_path):
    base = write_jsonl(tmp_path / "base.jsonl", model_records(BASE, BASE_TEXT))
    # The other file lists problems and samples in another order: read_samples sorts them.
    rl_records = model_records(RL, RL_TEXT, tokens=(30, 40))
    rl = write_jsonl(tmp_path / "rl.jsonl", rl_records[::-1])
    with open(tmp_path / "rl.settings.json", "w") as f:
        json.dump({"model": "/ckpts/qwen-rl/", "n": N}, f)
    return base, rl


# --------------------------------------------------------------------------- reading

def test_read_samples(pair):
    base, rl = pair
    s = read_samples(rl)
    assert s.label == "qwen-rl"                      # from the settings file's model path
    assert s.problem_ids == ["p3", "p2", "p1", "p0"]  # order of first appearance
    assert s.n == N and s.num_problems == 4
    assert s.answers[0] == RL["p3"]                  # samples sorted by sample_index
    assert s.correct.sum(1).tolist() == [1, 8, 6, 0]
    assert s.num_tokens[2].tolist() == [30] * 6 + [40] * 2
    assert s.difficulty == [4, 3, 2, 1] and s.gold == ["3", "2", "1", "1"]
    b = read_samples(base, label="mine")
    assert b.label == "mine" and b.settings is None
    assert b.truncated[3].tolist() == [False] * 6 + [True] * 2
    assert b.reordered(s.problem_ids).correct.sum(1).tolist() == [4, 8, 2, 0]


def test_settings_file_names(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", model_records({"p0": BASE["p0"]}, BASE_TEXT))
    assert settings_path(path) is None
    with open(path + ".settings.json", "w") as f:
        json.dump({"model": "m1", "label": "nice name"}, f)
    assert read_samples(path).label == "nice name"
    with open(tmp_path / "a.settings.json", "w") as f:
        f.write("{not json")
    with pytest.raises(MinirlError, match="a.settings.json"):
        read_samples(path)


def good_lines():
    return model_records({"p0": BASE["p0"], "p1": BASE["p1"]}, BASE_TEXT)


@pytest.mark.parametrize("edit, message", [
    (lambda L: L.__setitem__(3, "{oops"), r"bad\.jsonl:4: not valid JSON"),
    (lambda L: L.__setitem__(2, "[1, 2]"), r"bad\.jsonl:3: expected a JSON object"),
    (lambda L: L[1].pop("answer"), r"bad\.jsonl:2: missing key\(s\) 'answer'"),
    (lambda L: L[0].update(correct=1), r"bad\.jsonl:1: 'correct' must be true or false"),
    (lambda L: L[0].update(num_tokens=-3), r"bad\.jsonl:1: 'num_tokens'"),
    (lambda L: L[0].update(difficulty="hard"), r"bad\.jsonl:1: 'difficulty'"),
    (lambda L: L[5].update(finish_reason="eos"), r"bad\.jsonl:6: 'finish_reason'"),
    (lambda L: L[0].update(answer=3), r"bad\.jsonl:1: 'answer'"),
    (lambda L: L[4].update(sample_index=0), r"bad\.jsonl:5: problem 'p0' sample_index 0 repeats line 1"),
    (lambda L: L[9].update(gold="9"), r"bad\.jsonl:10: problem 'p1' has a different 'gold'"),
    (lambda L: L.pop(), r"different numbers of samples: most have 8, but 'p1' has 7"),
    (lambda L: L.clear(), r"bad\.jsonl: no samples"),
])
def test_bad_samples_files(tmp_path, edit, message):
    lines = good_lines()
    edit(lines)
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(MinirlError, match=message):
        read_samples(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(MinirlError, match="not found"):
        read_samples(tmp_path / "missing.jsonl")
    with pytest.raises(MinirlError, match="cannot read"):
        read_samples(tmp_path)  # a folder
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"a": "\xe9"}\n')
    with pytest.raises(MinirlError, match="not UTF-8"):
        read_samples(p)


def test_mismatched_files_name_both(tmp_path, pair):
    base, _ = pair
    fewer = write_jsonl(tmp_path / "fewer.jsonl", [r for r in model_records(RL, RL_TEXT) if r["problem_id"] != "p2"])
    with pytest.raises(MinirlError, match=r"base\.jsonl and .*fewer\.jsonl hold different problems: 1 only in"):
        build_report([base, fewer], tmp_path / "out")
    small_n = write_jsonl(tmp_path / "n4.jsonl", [r for r in model_records(RL, RL_TEXT) if r["sample_index"] < 4])
    with pytest.raises(MinirlError, match=r"n4\.jsonl has n=4 .*base\.jsonl has n=8"):
        build_report([base, small_n], tmp_path / "out")
    assert not os.path.exists(tmp_path / "out" / "report.json")


def test_bad_report_arguments(pair, tmp_path):
    base, rl = pair
    with pytest.raises(MinirlError, match="--ks"):
        build_report([base, rl], tmp_path / "o", ks=[1, 9])
    with pytest.raises(MinirlError, match="--labels"):
        build_report([base, rl], tmp_path / "o", labels=["a"])
    with pytest.raises(MinirlError, match="--labels"):
        build_report([base, rl], tmp_path / "o", labels=["a", "a"])
    with pytest.raises(MinirlError, match="--reference"):
        build_report([base, rl], tmp_path / "o", reference_index=2)
    with pytest.raises(MinirlError, match="at least one"):
        build_report([], tmp_path / "o")


# --------------------------------------------------------------------------- the report

def test_report_end_to_end(pair, tmp_path):
    base, rl = pair
    out = tmp_path / "report"
    rep = build_report([base, rl], out, bootstrap=200, seed=0, word_min_count=1)
    on_disk = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert on_disk == rep
    md = (out / "report.md").read_text()
    assert rep["reference"] == "base" and [m["label"] for m in rep["models"]] == ["base", "qwen-rl"]
    b, r = rep["models"]
    assert b["reference"] and not r["reference"]
    assert rep["settings"]["ks"] == [1, 2, 4, 8]

    # accuracy and pass@k, in the reference's problem order p0..p3.
    assert rep["problems"]["ids"] == ["p0", "p1", "p2", "p3"]
    assert rep["problems"]["correct_counts"] == {"base": [0, 2, 8, 4], "qwen-rl": [0, 6, 8, 1]}
    assert b["accuracy"]["mean"] == pytest.approx(14 / 32)
    assert r["accuracy"]["mean"] == pytest.approx(15 / 32)
    assert b["pass_at_k"]["8"]["mean"] == pytest.approx(0.75)
    assert b["pass_at_k"]["2"]["mean"] == pytest.approx(np.mean(M.pass_at_k(8, np.array([0, 2, 8, 4]), 2)))
    assert b["accuracy"]["ci_low"] <= b["accuracy"]["mean"] <= b["accuracy"]["ci_high"]
    # maj@8: base wins p2, p3 (3 beats 5); rl wins p1, p2 and loses p3 to "5".
    assert b["maj_at_k"]["8"]["mean"] == pytest.approx(0.5)
    assert r["maj_at_k"]["8"]["mean"] == pytest.approx(0.5)
    assert b["maj_at_k"]["1"]["mean"] == pytest.approx(b["accuracy"]["mean"])
    # entropy: base p0 0, p1 H(2/8, 6/8), p2 0, p3 H(4, 2, 2 no-answer).
    h = lambda *c: -sum(x / 8 * math.log(x / 8) for x in c)  # noqa: E731
    assert rep["problems"]["answer_entropy"]["base"] == pytest.approx([0, h(2, 6), 0, h(4, 2, 2)])
    assert rep["problems"]["answer_entropy"]["qwen-rl"] == pytest.approx([math.log(2), h(6, 2), 0, h(1, 7)])
    assert b["no_answer_rate"] == pytest.approx(2 / 32) and b["truncation_rate"] == pytest.approx(2 / 32)

    # bins for n = 8: [0] [1] [2] [3-4] [5-8]; base counts 0, 2, 8, 4.
    assert rep["settings"]["bins"] == ["0", "1", "2", "3-4", "5-8"]
    assert rep["problems"]["reference_bin"] == [0, 2, 4, 3]
    c = rep["comparisons"][0]
    assert (c["reference"], c["other"]) == ("base", "qwen-rl")
    rows = {row["group"]: row for row in c["bins"]}
    assert rows["2"]["change"] == pytest.approx(6 / 8 - 2 / 8)
    assert rows["3-4"]["change"] == pytest.approx(1 / 8 - 4 / 8)
    assert rows["1"]["num_problems"] == 0 and rows["1"]["change"] is None
    want = np.zeros((5, 5), int)
    for i, j in [(0, 0), (2, 4), (4, 4), (3, 1)]:
        want[i, j] += 1
    assert c["transitions"]["counts"] == want.tolist()
    assert c["delta"]["accuracy"]["mean"] == pytest.approx(1 / 32)
    assert c["solved_at_least_once"] == {"both": 3, "only_reference": 0, "only_other": 0, "neither": 1}
    assert c["levels"] is not None and [row["group"] for row in c["levels"]] == ["1", "2", "3", "4"]

    # lengths by correctness: base correct 10 tokens, incorrect 20; per bin the same.
    assert b["tokens"] == {"all": pytest.approx(10 * 14 / 32 + 20 * 18 / 32), "correct": 10, "incorrect": 20}
    assert r["tokens"]["correct"] == 30 and r["tokens"]["incorrect"] == 40
    bin2 = b["by_bin"][2]
    assert bin2["group"] == "2" and bin2["tokens"]["correct"] == 10 and bin2["success_rate"] == pytest.approx(0.25)
    assert b["by_bin"][0]["tokens"]["correct"] is None  # no correct response in bin 0
    assert b["chars"]["all"] == pytest.approx(np.mean([len(BASE_TEXT.format(a=a or "unknown"))
                                                       for row in BASE.values() for a in row]))

    # reflection phrases and categories.
    assert b["reflection"]["per_response"]["all"] == 2 and r["reflection"]["per_response"]["all"] == 0
    assert b["reflection"]["phrases_per_1k_responses"]["wait"] == 1000
    assert b["by_bin"][3]["reflection_per_response"]["correct"] == 2
    words_b = len(M.WORD_PATTERN.findall(BASE_TEXT.format(a="").lower()))
    assert b["categories"]["anthropomorphic"]["per_response"]["all"] == 2   # "wait", "let me"
    assert b["categories"]["anthropomorphic"]["phrases_per_1k_words"]["wait"] == pytest.approx(
        1000 * 32 / (b["num_words"]))
    assert r["categories"]["connectors"]["per_response"]["all"] == 1        # "so"
    assert r["categories"]["anthropomorphic"]["per_1k_words"] == 0
    assert b["num_words"] >= 32 * words_b

    # token frequency: rl over-uses "so", under-uses "wait", "let", "me", "think".
    over = [w["word"] for w in c["word_frequency"]["over_used"]]
    under = [w["word"] for w in c["word_frequency"]["under_used"]]
    assert over[0] == "so"
    assert set(under[:4]) == {"wait", "let", "me", "think"}

    # markdown tables and figures.
    assert "| 2 | 1 | 25.0 | 75.0 | +50.0 |" in md
    assert "## qwen-rl vs base (reference)" in md and "pass@k" in md
    try:
        import matplotlib  # noqa: F401
        assert sorted(rep["figures"]) == ["bin_change_qwen-rl.png", "categories.png", "keywords.png",
                                          "lengths.png", "pass_at_k.png", "transitions_qwen-rl.png"]
        for f in rep["figures"]:
            assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert rep["figures"] == []


def test_report_without_matplotlib(pair, tmp_path, monkeypatch):
    base, rl = pair
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rep = build_report([base, rl], tmp_path / "r", bootstrap=10)
    assert rep["figures"] == []
    assert sorted(os.listdir(tmp_path / "r")) == ["report.json", "report.md"]


def test_report_options(pair, tmp_path):
    base, rl = pair
    # The second file as the reference, a third model, custom labels, ks, phrases.
    third = write_jsonl(tmp_path / "sft.jsonl", model_records(BASE, "Hmm. The answer is {a}.", difficulty=False))
    rep = build_report([base, rl, third], tmp_path / "r", labels=["B", "R", "S"], reference_index=1, ks=[1, 4],
                       bootstrap=0, reflection_phrases=("the answer",), categories={"hmm": ["hmm"]}, plots=False)
    assert rep["reference"] == "R" and rep["settings"]["ks"] == [1, 4]
    assert [(c["reference"], c["other"]) for c in rep["comparisons"]] == [("R", "B"), ("R", "S")]
    b, r, s = rep["models"]
    assert rep["problems"]["ids"] == ["p3", "p2", "p1", "p0"]          # the reference's order
    assert b["reflection"]["per_response"]["all"] == 1                   # "the answer"
    assert s["categories"]["hmm"]["per_response"]["all"] == 1
    assert b["accuracy"]["ci_low"] == b["accuracy"]["mean"]              # bootstrap=0: no interval
    assert rep["comparisons"][1]["levels"] is not None                   # the reference has levels
    # Levels are taken from the reference; without them there is no level table.
    rep2 = build_report([third, base], tmp_path / "r2", bootstrap=0, plots=False)
    assert rep2["models"][0]["by_level"] is None and rep2["comparisons"][0]["levels"] is None
    # Same default label twice falls back to the file names.
    again = write_jsonl(tmp_path / "again.jsonl", model_records(RL, RL_TEXT))
    with open(tmp_path / "again.settings.json", "w") as f:
        json.dump({"model": "qwen-rl"}, f)
    rep3 = build_report([rl, again], tmp_path / "r3", bootstrap=0, plots=False)
    assert [m["label"] for m in rep3["models"]] == ["rl", "again"]


def test_single_file_report(pair, tmp_path):
    base, _ = pair
    rep = build_report([base], tmp_path / "one", bootstrap=50)
    assert rep["comparisons"] == [] and len(rep["models"]) == 1
    assert "By difficulty bin" in (tmp_path / "one" / "report.md").read_text()


# --------------------------------------------------------------------------- input checks and what a person sees

def test_same_ids_but_different_problems_are_refused(tmp_path, pair):
    base, _ = pair
    other_gold = [dict(r, gold="9") if r["problem_id"] == "p2" else r for r in model_records(RL, RL_TEXT)]
    path = write_jsonl(tmp_path / "gold.jsonl", other_gold)
    with pytest.raises(MinirlError, match=r"give problem 'p2' different problems \(gold '2' vs '9'\)"):
        build_report([base, path], tmp_path / "out")
    a = write_jsonl(tmp_path / "qa.jsonl", [dict(r, question="1+1=?") for r in model_records(BASE, BASE_TEXT)])
    b = write_jsonl(tmp_path / "qb.jsonl", [dict(r, question="1+1=?" if r["problem_id"] != "p1" else "2+0=?")
                                            for r in model_records(RL, RL_TEXT)])
    with pytest.raises(MinirlError, match=r"problem 'p1' different problems \(question '1\+1=\?' vs '2\+0=\?'\)"):
        build_report([a, b], tmp_path / "out")
    lines = model_records(BASE, BASE_TEXT)
    lines[3]["question"] = "changed"
    with pytest.raises(MinirlError, match=r"problem 'p0' has a different 'question'"):
        read_samples(write_jsonl(tmp_path / "q.jsonl", lines))


def test_answer_grouping_canonical_or_string(tmp_path):
    # One problem, gold 1/2: answers 0.5 x3, 1/2 x2 (correct), 3 x4 (wrong).
    answers = ["0.5"] * 3 + ["1/2"] * 2 + ["3"] * 4
    rows = [dict(record("p0", j, a, "1/2", f"so {a}"), correct=a != "3") for j, a in enumerate(answers)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    canon = build_report([path], tmp_path / "c", bootstrap=0, plots=False)
    string = build_report([path], tmp_path / "s", bootstrap=0, plots=False, answer_grouping="string")
    assert canon["models"][0]["maj_at_k"]["9"]["mean"] == 1.0      # 5 votes for 1/2 beat 4 for 3
    assert string["models"][0]["maj_at_k"]["9"]["mean"] == 0.0     # 3 beats 0.5 (3 votes) and 1/2 (2)
    h = lambda *c: -sum(x / 9 * math.log(x / 9) for x in c)  # noqa: E731
    assert canon["models"][0]["answer_entropy"] == pytest.approx(h(5, 4))
    assert string["models"][0]["answer_entropy"] == pytest.approx(h(3, 2, 4))
    assert "by mathematical value" in (tmp_path / "c" / "report.md").read_text()
    assert "by normalised string" in (tmp_path / "s" / "report.md").read_text()
    with pytest.raises(MinirlError, match="--answer-grouping"):
        build_report([path], tmp_path / "x", answer_grouping="sympy")


def test_markdown_takeaway_paths_and_no_duplicate_rows(pair, tmp_path):
    base, rl = pair
    rep = build_report([base, rl], tmp_path / "r", bootstrap=50, plots=False)
    md = (tmp_path / "r" / "report.md").read_text().splitlines()
    c = rep["comparisons"][0]
    d1, d8 = c["delta"]["accuracy"], c["delta"]["pass_at_k"]["8"]
    assert md[2] == (f"**qwen-rl** vs base: pass@1 {100 * d1['mean']:+.1f} [{100 * d1['ci_low']:+.1f}, "
                     f"{100 * d1['ci_high']:+.1f}] pp  ")
    assert md[3].startswith(f"**qwen-rl** vs base: pass@8 {100 * d8['mean']:+.1f} [")
    assert f"- **base**: {base}" in md and f"- **qwen-rl**: {rl} (model /ckpts/qwen-rl/)" in md
    assert "| pass@1 (accuracy) | " in "\n".join(md) and not any(line.startswith("| pass@1 |") for line in md)
    one = build_report([base], tmp_path / "one", bootstrap=0, plots=False)
    first = (tmp_path / "one" / "report.md").read_text().splitlines()[2:4]
    assert first[0].startswith("**base**: pass@1 43.8") and first[1].startswith("**base**: pass@8 75.0")
    assert one["comparisons"] == []


def test_no_all_zero_tables_or_blank_figures(tmp_path):
    # Responses with no reflection phrase and no category word at all.
    a = write_jsonl(tmp_path / "a.jsonl", model_records(BASE, "The result equals {a}."))
    b = write_jsonl(tmp_path / "b.jsonl", model_records(RL, "Result {a}."))
    rep = build_report([a, b], tmp_path / "r", bootstrap=10)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Reflection phrases: none found in any response." in md
    assert "Token category **anthropomorphic**: none found" in md and "Token category **connectors**: none found" in md
    assert "per 1k words" not in md and "Reflection phrases per response" not in md
    assert not any(line.startswith("| hmm") or line.startswith("| wait") for line in md.splitlines())
    assert "keywords.png" not in rep["figures"] and "categories.png" not in rep["figures"]
    # A model with reflection: only the phrases some model uses get a row.
    c = write_jsonl(tmp_path / "c.jsonl", model_records(BASE, BASE_TEXT))
    build_report([c, b], tmp_path / "r2", bootstrap=10, plots=False)
    md = (tmp_path / "r2" / "report.md").read_text()
    assert "| wait | 1000.0 | 0.0 |" in md and "| hmm |" not in md


def test_category_rates_per_1k_tokens(pair, tmp_path):
    base, rl = pair
    rep = build_report([base, rl], tmp_path / "r", bootstrap=100, plots=False)
    b = rep["models"][0]["categories"]["anthropomorphic"]["per_1k_tokens"]
    tokens = 10 * 14 + 20 * 18   # base: 14 correct responses of 10 tokens, 18 incorrect of 20
    assert b["mean"] == pytest.approx(1000 * 2 * 32 / tokens)  # "wait" and "let me" in each response
    assert b["ci_low"] <= b["mean"] <= b["ci_high"]
    r = rep["models"][1]["categories"]["connectors"]["per_1k_tokens"]
    assert r["mean"] == pytest.approx(1000 * 32 / (30 * 15 + 40 * 17))


def test_token_tables_and_character_level_tokenizers(pair, tmp_path):
    from test_metrics import word_level_tokenizer
    base, rl = pair
    tok_dir = tmp_path / "tok"
    word_level_tokenizer().save(str(tok_dir))
    rep = build_report([base, rl], tmp_path / "r", bootstrap=0, plots=False, tokenizer=str(tok_dir), word_min_count=1)
    c = rep["comparisons"][0]
    assert c["token_frequency"]["over_used"][0]["word"] == "so"          # a token of the vocabulary
    assert c["word_frequency"]["over_used"][0]["word"] == "so"           # the word table stays beside it
    assert "Tokens qwen-rl uses more than base" in (tmp_path / "r" / "report.md").read_text()
    # Without a tokenizer (the settings' model is not here): said so, the word table stays.
    rep = build_report([base, rl], tmp_path / "r2", bootstrap=0, plots=False, word_min_count=1)
    assert rep["comparisons"][0]["token_frequency"] is None and rep["comparisons"][0]["word_frequency"]
    assert "pass --tokenizer DIR" in (tmp_path / "r2" / "report.md").read_text()
    # A character-level tokenizer (the bundled model's): no word or token table of fragments.
    bundled = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-arith")
    rep = build_report([base, rl], tmp_path / "r3", bootstrap=0, plots=False, tokenizer=bundled, word_min_count=1)
    assert rep["comparisons"][0]["word_frequency"] is None and rep["comparisons"][0]["token_frequency"] is None
    md = (tmp_path / "r3" / "report.md").read_text()
    assert "the tokenizer is character-level" in md and "| so |" not in md
