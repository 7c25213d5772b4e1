"""Every figure of `evaluate.py report` draws the numbers of the report.json beside it.

The figures are read back from the matplotlib artists that report.write_figures draws
(lines, bars, error bars, image, texts), captured by wrapping the Agg canvas it attaches to
every figure, and compared with the report dict the figures were drawn from.
"""
import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib.backends.backend_agg as agg  # noqa: E402

from minirl.report import build_report, write_figures  # noqa: E402

GOLD = {"p0": "1", "p1": "1", "p2": "2", "p3": "3", "p4": "4"}
BASE = {"p0": ["7"] * 6, "p1": ["1", "1"] + ["2"] * 4, "p2": ["2"] * 6, "p3": ["3"] * 3 + ["5", None, None],
        "p4": ["4", "9", "9", "9", "9", "4"]}
RL = {"p0": ["7"] * 3 + ["8"] * 3, "p1": ["1"] * 5 + ["2"], "p2": ["2"] * 6, "p3": ["3"] + ["5"] * 5,
      "p4": ["4"] * 6}
TEXT = {"base": "Wait, let me think. Hmm, the answer is {a}.", "rl": "So the answer is {a}, therefore done."}


def write_samples(path, answers, text, tokens):
    with open(path, "w", encoding="utf-8") as f:
        for pid, row in answers.items():
            for j, a in enumerate(row):
                ok = a == GOLD[pid]
                f.write(json.dumps({"problem_id": pid, "difficulty": None, "sample_index": j, "gold": GOLD[pid],
                                    "answer": a, "correct": ok, "response": text.format(a=a or "?") + " x" * j,
                                    "num_tokens": tokens[0] + j if ok else tokens[1] + 2 * j,
                                    "finish_reason": "stop" if a else "length"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """(report, {figure name: matplotlib Figure}) for a two-model report with behaviours."""
    d = tmp_path_factory.mktemp("figures")
    files = [write_samples(d / "base.jsonl", BASE, TEXT["base"], (10, 30)),
             write_samples(d / "rl.jsonl", RL, TEXT["rl"], (20, 50))]
    report = build_report(files, d / "out", bootstrap=50, seed=0, word_min_count=1, plots=False)
    # Behaviour shares as a judged report holds them (asymmetric intervals on purpose).
    for i, m in enumerate(report["models"]):
        m["behaviours"] = {b: {"share": {"mean": 0.2 + 0.1 * i + 0.05 * k, "ci_low": 0.1 + 0.02 * k,
                                         "ci_high": 0.5 + 0.1 * i}}
                           for k, b in enumerate(("verification", "backtracking"))}
    report["settings"]["judge"] = "keyword"
    figures = []

    class Recording(agg.FigureCanvasAgg):
        def __init__(self, figure=None):
            figures.append(figure)
            super().__init__(figure)

    mp = pytest.MonkeyPatch()
    mp.setattr(agg, "FigureCanvasAgg", Recording)
    try:
        names = write_figures(report, d / "out")
    finally:
        mp.undo()
    assert len(names) == len(figures)
    return report, dict(zip(names, figures))


def bars(ax):
    """{legend label: [bar heights]} of the bar containers of an axes, in drawing order."""
    return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers if hasattr(c, "patches")}


def pct(x):
    return 100 * (x or 0)


def test_every_figure_is_drawn(drawn):
    report, figs = drawn
    assert sorted(figs) == sorted(["pass_at_k.png", "lengths.png", "keywords.png", "categories.png",
                                   "behaviours.png", "bin_change_rl.png", "transitions_rl.png"])


def test_pass_at_k_curves_and_bands(drawn):
    report, figs = drawn
    ax = figs["pass_at_k.png"].axes[0]
    ks = report["settings"]["ks"]
    lines = iter(ax.lines)
    bands = iter(ax.collections)
    for m in report["models"]:
        for key in ("pass_at_k", "maj_at_k"):
            line, band = next(lines), next(bands)
            rows = [m[key][str(k)] for k in ks]
            assert list(line.get_xdata()) == ks
            np.testing.assert_allclose(line.get_ydata(), [pct(r["mean"]) for r in rows], err_msg=key)
            verts = np.concatenate([p.vertices for p in band.get_paths()])
            for k, r in zip(ks, rows):
                ys = verts[np.isclose(verts[:, 0], k), 1]
                assert ys.min() == pytest.approx(pct(r["ci_low"])) and ys.max() == pytest.approx(pct(r["ci_high"]))


@pytest.mark.parametrize("name, measure", [("lengths.png", "tokens"), ("keywords.png", "reflection_per_response")])
def test_per_bin_bars_correct_and_incorrect(drawn, name, measure):
    report, figs = drawn
    axes = figs[name].axes
    assert [ax.get_title() for ax in axes] == ["correct responses", "incorrect responses"]
    for ax, kind in zip(axes, ("correct", "incorrect")):
        assert [t.get_text() for t in ax.get_xticklabels()] == report["settings"]["bins"]
        got = bars(ax)
        for m in report["models"]:
            want = [row[measure][kind] or 0 for row in m["by_bin"]]
            np.testing.assert_allclose(got[m["label"]], want, err_msg=f"{m['label']} {kind}")


def test_category_bars(drawn):
    report, figs = drawn
    ax = figs["categories.png"].axes[0]
    cats = [t.get_text() for t in ax.get_xticklabels()]
    assert cats == [c for c in report["settings"]["categories"]
                    if any(m["categories"][c]["per_1k_words"] for m in report["models"])]
    got = bars(ax)
    for m in report["models"]:
        np.testing.assert_allclose(got[m["label"]], [m["categories"][c]["per_1k_words"] for c in cats])


def test_behaviour_bars_and_intervals(drawn):
    report, figs = drawn
    ax = figs["behaviours.png"].axes[0]
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert names == ["verification", "backtracking"]
    got = bars(ax)
    for c, m in zip([c for c in ax.containers if hasattr(c, "patches")], report["models"]):
        shares = [m["behaviours"][b]["share"] for b in names]
        np.testing.assert_allclose(got[m["label"]], [pct(s["mean"]) for s in shares])
        segments = c.errorbar.lines[2][0].get_segments()  # one vertical segment per bar
        np.testing.assert_allclose([s[:, 1].min() for s in segments], [pct(s["ci_low"]) for s in shares])
        np.testing.assert_allclose([s[:, 1].max() for s in segments], [pct(s["ci_high"]) for s in shares])


def test_bin_change_bars_and_labels(drawn):
    report, figs = drawn
    c = report["comparisons"][0]
    ax = figs["bin_change_rl.png"].axes[0]
    (heights,) = bars(ax).values()
    np.testing.assert_allclose(heights, [pct(r["change"]) for r in c["bins"]])
    assert [t.get_text() for t in ax.texts] == [f"{pct(r['change']):+.1f}\n(n={r['num_problems']})" for r in c["bins"]]
    assert ax.get_title() == f"{c['other']} - {c['reference']}"


def test_transition_image_and_counts(drawn):
    report, figs = drawn
    t = report["comparisons"][0]["transitions"]
    ax = figs["transitions_rl.png"].axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), t["row_fractions"])
    B = len(t["bins"])
    cells = {tuple(int(round(v)) for v in txt.get_position()): txt.get_text() for txt in ax.texts}
    assert len(cells) == B * B
    for i in range(B):          # row i: the reference's bin, drawn at y = i
        for j in range(B):      # column j: the other model's bin, at x = j
            assert cells[(j, i)] == str(t["counts"][i][j])
    assert any(t["counts"][i][j] != t["counts"][j][i] for i in range(B) for j in range(B))  # not symmetric
