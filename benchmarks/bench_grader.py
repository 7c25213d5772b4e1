"""minirl's grader vs math-verify on a MATH-style corpus this script builds, plus a fuzz.

    python benchmarks/bench_grader.py [--pairs 2400] [--seed 0] [--fuzz 10000] [--show 3]

The corpus is built deterministically from --seed: (response, gold) pairs whose gold is
written as MATH writes it (``10,\\!000``, ``\\$16,\\!386.20``, ``\\dfrac{3}{4}``,
``\\text{(C)}``, ``(-\\infty, 3]``, ...) and whose response states a right or a wrong answer
(known by construction) in one of many notations, in the style of a base model (Minerva
"Final Answer: ... I hope it is correct.", "the answer is X", GSM8K "#### X", no marker at
all), an instruct model (``\\boxed{}``, "**Answer:**", several boxes) or an R1-style model
(``<think>...</think>`` then a box or ``<answer>`` tags). Notations math-verify reads and
minirl might not are in it too (``\\(...\\)``, ``\\[...\\]``, last number without a marker).

Printed: agreement of minirl (grade(), default mode) with math-verify
(``verify(parse("$gold$"), parse(response))``, its defaults), the disagreements grouped by
kind with examples, how many pairs minirl accepts that math-verify rejects, each side's
accuracy against the construction label, time per call on both sides (process CPU time:
medians and means; minirl's sympy worker's CPU is added to its mean), the device; then
--fuzz random strings through is_equivalent / grade: errors, timeouts, p50 / p99 CPU time.
"""
import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from fractions import Fraction

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minirl import grader  # noqa: E402


# --------------------------------------------------------------------------- gold answers
# Each generator returns (kind, gold, rights, wrongs): the gold as MATH writes it, ways of
# writing the same answer, and near misses that are wrong.

def _thousands(n, sep):
    s = f"{n:,}"
    return s.replace(",", sep)


def g_integer(r):
    n = r.randint(-40, 400)
    return "integer", str(n), [str(n), f"{n}.0" if r.random() < 0.3 else str(n)], [str(n + 1), str(-n - 1), f"{n}.5"]


def g_thousands(r):
    n = r.randint(1000, 999999)
    gold = _thousands(n, ",\\!")
    rights = [str(n), _thousands(n, ","), _thousands(n, "{,}"), _thousands(n, ",\\!")]
    return "thousands", gold, rights, [str(n + 10), _thousands(n + 1, ","), str(n // 10)]


def g_money(r):
    cents = r.randint(100, 9999999)
    d, c = divmod(cents, 100)
    gold = "\\$" + _thousands(d, ",\\!") + f".{c:02d}"
    plain = f"{d}.{c:02d}"
    rights = [plain, "\\$" + plain, "\\$" + _thousands(d, ",") + f".{c:02d}", plain + "\\text{ dollars}"]
    return "money", gold, rights, [f"{d}.{(c + 1) % 100:02d}", f"{d + 1}.{c:02d}", str(d)]


def g_fraction(r):
    q = r.randint(2, 12)
    p = r.choice([k for k in range(1, 3 * q) if Fraction(k, q).denominator == q])
    gold = r.choice(["\\frac{%d}{%d}", "\\dfrac{%d}{%d}"]) % (p, q)
    rights = ["\\frac{%d}{%d}" % (p, q), "\\dfrac{%d}{%d}" % (p, q), "\\tfrac{%d}{%d}" % (p, q), f"{p}/{q}",
              "\\frac{%d}{%d}" % (2 * p, 2 * q)]
    if q in (2, 4, 5, 8, 10):
        rights.append(str(float(Fraction(p, q))))
    wrongs = ["\\frac{%d}{%d}" % (q, p), "\\frac{%d}{%d}" % (p + 1, q), f"{float(p / q):.2f}" if q in (3, 7, 9, 11, 12)
              else "\\frac{%d}{%d}" % (p, q + 1)]
    return "fraction", gold, rights, wrongs


def g_negative(r):
    p, q = r.randint(1, 9), r.choice([2, 3, 5, 7])
    gold = "-\\frac{%d}{%d}" % (p, q)
    rights = ["-\\frac{%d}{%d}" % (p, q), "\\frac{-%d}{%d}" % (p, q), f"-{p}/{q}", "\u2212\\frac{%d}{%d}" % (p, q)]
    return "negative", gold, rights, ["\\frac{%d}{%d}" % (p, q), "-\\frac{%d}{%d}" % (q, p)]


def g_decimal(r):
    v = round(r.uniform(0.1, 99), 2)
    s = f"{v:.2f}".rstrip("0").rstrip(".")
    return "decimal", s, [s, s + "0" if "." in s else s], [f"{v + 0.01:.2f}", f"{v * 10:.1f}"]


def g_radical(r):
    a, b = r.randint(2, 7), r.choice([2, 3, 5, 6, 7])
    gold = f"{a}\\sqrt{{{b}}}"
    rights = [gold, f"{a}\\sqrt{b}", f"\\sqrt{{{a * a * b}}}", f"{a} \\sqrt{{{b}}}"]
    wrongs = [f"{a}\\sqrt{{{b + 1}}}", f"{a + 1}\\sqrt{{{b}}}", f"{a * (b ** 0.5):.3f}"]
    return "radical", gold, rights, wrongs


def g_pi(r):
    a = r.randint(2, 30)
    gold = f"{a}\\pi"
    return "pi", gold, [gold, f"{a} \\pi", f"\\pi \\cdot {a}", f"{a}\u03c0"], [f"{a + 1}\\pi", f"{a * 3.14:.2f}", str(a)]


def g_transcendental(r):
    sign = r.choice(["-", "+"])
    other = "+" if sign == "-" else "-"
    gold = f"1 {sign} \\frac{{1}}{{e}}"
    rights = [gold, f"1{sign}1/e", f"1 {sign} e^{{-1}}", f"\\frac{{e {sign} 1}}{{e}}"]
    return "transcendental", gold, rights, [f"1 {other} \\frac{{1}}{{e}}", f"{1 - 1 / 2.718281828:.3f}" if sign == "-"
                                            else f"{1 + 1 / 2.718281828:.3f}"]


def g_units(r):
    n = r.randint(2, 500)
    unit = r.choice(["miles", "cm", "inches", "feet", "meters", "dollars", "hours"])
    gold = r.choice([f"{n}\\text{{ {unit}}}", str(n)])
    rights = [str(n), f"{n}\\text{{ {unit}}}", f"{n}\\textnormal{{ {unit}}}", f"{n}\\mbox{{ {unit}}}", f"{n} {unit}"]
    return "units", gold, rights, [str(n + 2), f"{n + 1}\\text{{ {unit}}}"]


def g_area(r):
    n = r.randint(2, 300)
    gold = str(n)
    return "units", gold, [f"{n}\\text{{ cm}}^2", f"{n} \\text{{ square units}}", str(n)], [f"{n + 1}\\text{{ cm}}^2"]


def g_degrees(r):
    n = r.choice([15, 30, 36, 45, 60, 72, 75, 90, 108, 120, 135, 150])
    gold = r.choice([str(n), f"{n}^\\circ"])
    rights = [str(n), f"{n}^\\circ", f"{n}^{{\\circ}}", f"{n}\\text{{ degrees}}", f"{n}\u00b0"]
    return "degrees", gold, rights, [str(n + 5), f"{180 - n}^\\circ"]


def g_percent(r):
    n = r.randint(1, 99)
    gold = f"{n}\\%"
    rights = [f"{n}\\%", f"{n}%", str(n), f"{n} percent"]
    return "percent", gold, rights, [f"{n + 1}\\%", str(n + 2)]


def g_interval(r):
    a = r.randint(-9, 9)
    lo, hi = r.choice([("(-\\infty", f"{a}]"), (f"[{a}", "\\infty)"), (f"({a}", "\\infty)"), ("(-\\infty", f"{a})")])
    gold = f"{lo}, {hi}"
    closed = "]" in hi or "[" in lo
    if lo.startswith("(-"):
        ineq = f"x \\le {a}" if closed else f"x < {a}"
        flipped = f"-x \\ge {-a}" if closed else f"-x > {-a}"
    else:
        ineq = f"x \\ge {a}" if closed else f"x > {a}"
        flipped = f"-x \\le {-a}" if closed else f"-x < {-a}"
    rights = [gold, gold.replace(" ", ""), f"\\left{lo}, {hi[:-1]}\\right{hi[-1]}", ineq, flipped]
    swapped = gold.replace("]", ")") if closed and "]" in gold else (gold.replace("[", "(") if closed else
                                                                      gold.replace(f"{a})", f"{a}]").replace(f"({a}", f"[{a}"))
    return "interval", gold, rights, [swapped, gold.replace(str(a), str(a + 1))]


def g_range(r):
    a, b = r.randint(-9, 0), r.randint(1, 9)
    gold = f"[{a}, {b}]"
    rights = [gold, f"{a} \\le x \\le {b}", f"x \\in [{a}, {b}]", f"[{a},{b}]"]
    return "interval", gold, rights, [f"({a}, {b})", f"{a} < x < {b}", f"[{a}, {b + 1}]"]


def g_set(r):
    xs = sorted(r.sample(range(-9, 10), r.choice([2, 2, 3])))
    gold = ", ".join(map(str, xs))
    rights = [gold, ", ".join(map(str, reversed(xs))), "\\{" + gold + "\\}", gold.replace(", ", ","),
              ("BOXES", [str(x) for x in xs])]
    wrongs = [", ".join(map(str, xs[:-1])), ", ".join(map(str, xs[:-1] + [xs[-1] + 1])),
              ("BOXES", [str(x) for x in xs[:-1]] + [str(xs[-1] + 1)])]
    return "set", gold, rights, wrongs


def g_pm(r):
    a = r.randint(2, 9)
    gold = r.choice([f"\\pm {a}", f"-{a}, {a}", f"{a}, -{a}"])
    rights = [f"\\pm {a}", f"{a}, -{a}", f"-{a}, {a}", f"\\pm{a}", f"x = \\pm {a}"]
    return "plus-minus", gold, rights, [str(a), f"\\pm {a + 1}"]


def g_tuple(r):
    a, b = r.randint(-9, 9), r.randint(-9, 9)
    gold = f"({a}, {b})"
    rights = [gold, f"({a},{b})", f"\\left({a}, {b}\\right)"]
    return "tuple", gold, rights, [f"({b}, {a})" if a != b else f"({a}, {b + 1})", f"({a}, {b + 1})"]


def g_labelled(r):
    a, b = r.randint(1, 20), r.randint(1, 20)
    kind = r.random()
    if kind < 0.4:
        gold = str(a)
        rights = [f"x = {a}", f"x={a}", str(a), f"|AB| = {a}"]
        return "labelled", gold, rights, [f"x = {a + 1}", f"{a + 1}"]
    gold = f"{a}, {b}"
    rights = [f"AB={a}, CD={b}", f"AB = {a}, CD = {b}", f"{a}, {b}"]
    return "labelled", gold, rights, [f"AB={a}, CD={b + 1}", f"{a}, {b + 1}"]


def g_line(r):
    m, c = r.choice([-3, -2, -1, 2, 3, 4]), r.randint(-5, 5)
    gold = f"y = {m}x {'+' if c >= 0 else '-'} {abs(c)}"
    rights = [gold, f"y={m}x{'+' if c >= 0 else '-'}{abs(c)}", f"{m}x - y {'+' if c >= 0 else '-'} {abs(c)} = 0",
              f"y - {c} = {m}x" if c >= 0 else f"y + {-c} = {m}x"]
    return "equation", gold, rights, [f"y = {m}x {'+' if c >= 0 else '-'} {abs(c) + 1}", f"y = {-m}x + {c}"]


def g_plane(r):
    a, b = r.choice([2, 4, 6]), r.choice([2, 4])
    gold = f"{a}x + {b}y - 3 = 0"
    rights = [gold, f"y = -{Fraction(a, b)}x + {Fraction(3, b)}".replace("-1x", "-x"), f"{a}x+{b}y=3"]
    return "equation", gold, rights, [f"{a}x + {b}y - 4 = 0", f"{a}x - {b}y - 3 = 0"]


def g_choice(r):
    letter = r.choice("ABCDE")
    gold = r.choice([f"\\text{{({letter})}}", f"({letter})", letter])
    rights = [f"\\text{{({letter})}}", f"({letter})", letter, f"\\textbf{{({letter})}}"]
    other = "ABCDE"[("ABCDE".index(letter) + 1) % 5]
    return "choice", gold, rights, [f"({other})", other]


def g_text(r):
    word = r.choice(["Monday", "odd", "even", "yes", "no", "Tuesday", "right"])
    gold = f"\\text{{{word}}}"
    other = {"Monday": "Tuesday", "Tuesday": "Monday", "odd": "even", "even": "odd", "yes": "no", "no": "yes",
             "right": "left"}[word]
    return "text", gold, [gold, word, f"\\text{{{word.capitalize()}}}"], [f"\\text{{{other}}}", other]


def g_polynomial(r):
    a = r.randint(1, 6)
    gold = f"x^2 + {2 * a}x + {a * a}"
    rights = [gold, f"(x + {a})^2", f"(x+{a})(x+{a})", f"x^2+{2 * a}x+{a * a}", f"x\u00b2 + {2 * a}x + {a * a}"]
    return "expression", gold, rights, [f"(x + {a + 1})^2", f"x^2 + {a}x + {a * a}", f"(x - {a})^2"]


def g_matrix(r):
    a, b = r.randint(-9, 9), r.randint(-9, 9)
    gold = f"\\begin{{pmatrix}} {a} \\\\ {b} \\end{{pmatrix}}"
    rights = [gold, f"\\begin{{pmatrix}}{a}\\\\{b}\\end{{pmatrix}}", f"\\begin{{bmatrix}} {a} \\\\ {b} \\end{{bmatrix}}"]
    return "matrix", gold, rights, [f"\\begin{{pmatrix}} {b + 1} \\\\ {a} \\end{{pmatrix}}",
                                    f"\\begin{{pmatrix}} {a} \\\\ {b + 1} \\end{{pmatrix}}"]


def g_unicode(r):
    a, b = r.randint(2, 9), r.randint(2, 9)
    return "unicode", str(a * b), [f"{a}\u00d7{b}", str(a * b)], [f"{a}\u00d7{b + 1}"]


def g_decimal_comma(r):
    a, b = r.randint(1, 9), r.randint(1, 9)
    gold = f"{a}.{b}"
    return "decimal-comma", gold, [f"{a}{{,}}{b}", gold], [f"{a}{{,}}{b + 1 if b < 9 else 1}"]


def g_scientific(r):
    a = r.randint(2, 9)
    e = r.randint(3, 8)
    gold = f"{a} \\times 10^{{{e}}}"
    return "scientific", gold, [gold, str(a * 10 ** e), f"{a}\\cdot 10^{e}"], [f"{a} \\times 10^{{{e + 1}}}"]


GENERATORS = [(g_integer, 10), (g_thousands, 8), (g_money, 4), (g_fraction, 10), (g_negative, 4), (g_decimal, 4),
              (g_radical, 6), (g_pi, 4), (g_transcendental, 2), (g_units, 5), (g_area, 2), (g_degrees, 4),
              (g_percent, 3), (g_interval, 4), (g_range, 3), (g_set, 5), (g_pm, 3), (g_tuple, 4), (g_labelled, 4),
              (g_line, 3), (g_plane, 2), (g_choice, 3), (g_text, 2), (g_polynomial, 4), (g_matrix, 2),
              (g_unicode, 2), (g_decimal_comma, 1), (g_scientific, 2)]


# --------------------------------------------------------------------------- response styles

_FILLER = ["First, note that the problem asks for a single quantity.", "We set up the equation carefully.",
           "Substituting the values we found, we get", "Let me double-check the arithmetic: 3 + 4 = 7 and 2 \\cdot 6 = 12.",
           "Hence the two cases agree.", "Simplifying the expression step by step,"]


def _reasoning(r):
    k = r.randint(1, 3)
    return " ".join(r.choice(_FILLER) for _ in range(k)) + f" Note that ${r.randint(2, 9)} + {r.randint(2, 9)}$ is small."


def _box(a):
    return "\\boxed{" + a + "}"


def respond(r, answer, kind):
    """A response stating ``answer`` (a string or ("BOXES", [parts])) in a random style.
    Returns (style, text)."""
    if isinstance(answer, tuple):                       # several boxes that state one answer
        parts = answer[1]
        joined = ", ".join("$" + _box(p) + "$" for p in parts[:-1]) + " and $" + _box(parts[-1]) + "$"
        return "instruct-boxes", f"{_reasoning(r)} The solutions are {joined}."
    plain_ok = not answer.startswith("\\begin")          # a matrix needs math mode
    styles = ["minerva", "answer-is", "answer-is-math", "instruct-box", "instruct-display-box", "instruct-answer",
              "r1-box", "r1-tag", "no-marker-inline", "no-marker-paren", "no-marker-display", "corrected-box"]
    if kind in ("integer", "thousands", "money", "decimal", "units") and plain_ok:
        styles += ["gsm8k", "no-marker-number"]
    style = r.choice(styles)
    reason = _reasoning(r)
    if style == "minerva":
        return style, f"Solution: {reason}\nFinal Answer: The final answer is ${answer}$. I hope it is correct."
    if style == "answer-is":
        return style, f"{reason} So the answer is {answer}." if plain_ok else f"{reason} The answer is ${answer}$."
    if style == "answer-is-math":
        return style, f"{reason} Therefore, the answer is ${answer}$."
    if style == "instruct-box":
        return style, f"{reason}\n\nTherefore, the final answer is $\\boxed{{{answer}}}$."
    if style == "instruct-display-box":
        return style, f"{reason}\n\n\\[\n\\boxed{{{answer}}}\n\\]"
    if style == "instruct-answer":
        return style, f"{reason}\n\n**Answer:** ${answer}$"
    if style == "r1-box":
        return style, f"<think>\n{reason} Wait, let me verify. {_reasoning(r)}\n</think>\n\nThe answer is $\\boxed{{{answer}}}$."
    if style == "r1-tag":
        return style, f"<think>\n{reason}\n</think>\n<answer> ${answer}$ </answer>"
    if style == "no-marker-inline":
        return style, f"{reason} Putting it together we obtain ${answer}$."
    if style == "no-marker-paren":
        return style, f"{reason} This gives \\({answer}\\)."
    if style == "no-marker-display":
        return style, f"{reason} Thus\n$$\n{answer}\n$$"
    if style == "corrected-box":
        return style, f"{reason} So $\\boxed{{{r.randint(100, 999)}}}$. Wait, that is wrong: I dropped a term. " \
                      f"Redoing it, $\\boxed{{{answer}}}$."
    if style == "gsm8k":
        return style, f"{reason}\n#### {answer}"
    return style, f"{reason} In total we get {answer} altogether."


def build_corpus(n, seed):
    r = random.Random(seed)
    gens = [g for g, w in GENERATORS for _ in range(w)]
    corpus = []
    while len(corpus) < n:
        kind, gold, rights, wrongs = r.choice(gens)(r)
        right = r.random() < 0.5
        answer = r.choice(rights if right else wrongs)
        style, text = respond(r, answer, kind)
        corpus.append({"kind": kind, "style": style, "gold": gold, "response": text, "right": right,
                       "answer": answer if isinstance(answer, str) else " and ".join(answer[1])})
    return corpus


# --------------------------------------------------------------------------- measuring

def _worker_cpu():
    """CPU seconds used so far by this process's sympy / math-verify worker processes."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pool in list(grader._pools.values()):
        for w in list(pool.idle):
            try:
                with open(f"/proc/{w.proc.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
    return total


def run_minirl(corpus):
    verdicts, times = [], []
    grader.reset_stats()
    w0, p0 = _worker_cpu(), time.process_time()
    for c in corpus:
        t = time.process_time()
        verdicts.append(grader.grade(c["response"], c["gold"]).correct)
        times.append(time.process_time() - t)
    total = time.process_time() - p0 + (_worker_cpu() - w0)
    return verdicts, times, total, grader.stats()


def run_math_verify(corpus):
    from math_verify import parse, verify
    verdicts, times = [], []
    p0 = time.process_time()
    for c in corpus:
        t = time.process_time()
        verdicts.append(bool(verify(parse("$" + c["gold"] + "$"), parse(c["response"]))))
        times.append(time.process_time() - t)
    return verdicts, times, time.process_time() - p0


def device():
    from minirl.common import device_description      # the grader itself never needs torch
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{device_description('cpu')}, load average {load:.1f}, Python {platform.python_version()}"


_ATOMS = ["0", "1", "2", "7", "10", "0.5", "1e5", "x", "y", "e", "i", "\\pi", "\\infty", "+", "-", "*", "/", "^", "!",
          "%", "(", ")", "[", "]", "{", "}", "\\{", "\\}", ",", "=", "<", "\\le", "|", "_", "\\frac", "\\dfrac",
          "\\sqrt", "\\boxed", "\\fbox", "\\text{cm}", "\\textnormal{ miles}", "\\left(", "\\right)", "\\cdot",
          "\\times", "\\sin", "\\log_", "\\ln", "\\binom", "\\cup", "\\pm", "$", "\\(", "\\)", "\\[", "\\]", "\\\\",
          "&", "\\begin{pmatrix}", "\\end{pmatrix}", " ", "\u03c0", "\u221a", "\u00b2", "\u2074", "\u2082", "\u0663",
          "\uff15", "\u4e2d", "\U0001f600", "\x00", "\u00b0", "\u2212", "\\!", "\\,", ",\\!", "{,}", "10^{10^{10}}",
          "9^{9^{9}}", "^{-1}", "'", '"', "#### ", "The answer is ", "Final Answer: The final answer is ",
          ". I hope it is correct.", "<answer>", "</answer>", "<think>", "</think>", " and ", "AB=", "\\ge", "-x>"]


def fuzz_string(r):
    u = r.random()
    if u < 0.6:
        return "".join(r.choice(_ATOMS) for _ in range(r.randint(1, 30)))
    if u < 0.7:
        k = r.choice([10, 100, 1000])
        return r.choice(["(" * k + "1" + ")" * k, "\\frac{" * k + "1" + "}{2}" * k, "{" * k, "2^" * k + "2",
                         "\\boxed{" * k + "1", "1+" * k + "1", "$" * k, "\\boxed{1} and " * k])
    if u < 0.85:
        return "".join(r.choice(_ATOMS) for _ in range(r.randint(100, 1500)))
    return "".join(chr(r.randint(1, 0x2FFFF)) for _ in range(r.randint(1, 200)))


def run_fuzz(n, seed):
    r = random.Random(seed)
    strings = [fuzz_string(r) for _ in range(n)]
    grader.reset_stats()
    times = []
    for k, a in enumerate(strings):
        b = a if k % 3 == 0 else strings[k - 1]
        t = time.process_time()
        if k % 2:
            grader.is_equivalent(a, b)
        else:
            grader.grade("Let me think. " + b + " so " + a, b)
        times.append(time.process_time() - t)
    times.sort()
    return times, grader.stats()


def _ms(x):
    return f"{x * 1e3:.3f} ms"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fuzz", type=int, default=10000, help="random strings for the fuzz (0: skip)")
    ap.add_argument("--show", type=int, default=3, help="examples printed per disagreement kind")
    args = ap.parse_args()
    print(device())
    corpus = build_corpus(args.pairs, args.seed)
    print(f"corpus: {len(corpus)} pairs (seed {args.seed}), {sum(c['right'] for c in corpus)} right by construction, "
          f"{len({c['kind'] for c in corpus})} answer kinds, {len({c['style'] for c in corpus})} response styles")
    try:
        import math_verify  # noqa: F401
    except ImportError:
        sys.exit("bench_grader needs math-verify: pip install math-verify")
    if grader._have("sympy"):
        grader.warmup()                        # the one-time worker start is not a per-call cost
    mv, mv_times, mv_total = run_math_verify(corpus)
    mr, mr_times, mr_total, st = run_minirl(corpus)
    agree = sum(a == b for a, b in zip(mv, mr))
    print(f"agreement with math-verify: {agree}/{len(corpus)} = {agree / len(corpus):.2%}")
    only_minirl = [c for c, a, b in zip(corpus, mv, mr) if b and not a]
    only_mv = [c for c, a, b in zip(corpus, mv, mr) if a and not b]
    print(f"minirl accepts, math-verify rejects: {len(only_minirl)};  math-verify accepts, minirl rejects: {len(only_mv)}")
    for name, verdicts in (("minirl", mr), ("math-verify", mv)):
        ok = sum(v == c["right"] for v, c in zip(verdicts, corpus))
        fa = sum(v and not c["right"] for v, c in zip(verdicts, corpus))
        fr = sum(c["right"] and not v for v, c in zip(verdicts, corpus))
        print(f"{name:12s} vs construction label: {ok / len(corpus):.2%} right; accepts {fa} wrong answers, "
              f"rejects {fr} right ones")
    groups = defaultdict(list)
    for c, a, b in zip(corpus, mv, mr):
        if a != b:
            groups[("minirl accepts" if b else "math-verify accepts", c["kind"], c["style"],
                    "right" if c["right"] else "wrong")].append(c)
    print("disagreements by kind (who accepts, answer kind, response style, label by construction):")
    for key, cs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(cs):4d}  {' / '.join(key)}")
        for c in cs[:args.show]:
            print(f"          gold {c['gold']!r}  answer {c['answer']!r}  ...{c['response'][-70:]!r}")
    print(f"time per call, process CPU: minirl median {_ms(statistics.median(mr_times))}, mean "
          f"{_ms(mr_total / len(corpus))} (sympy worker included: {st['sympy_calls']} sympy calls); "
          f"math-verify median {_ms(statistics.median(mv_times))}, mean {_ms(mv_total / len(corpus))}")
    print(f"speed-up: {statistics.median(mv_times) / statistics.median(mr_times):.1f}x by median, "
          f"{mv_total / mr_total:.1f}x by mean;  minirl stats {st}")
    if args.fuzz:
        times, fst = run_fuzz(args.fuzz, args.seed + 1)
        print(f"fuzz: {args.fuzz} random strings (seed {args.seed + 1}): errors {fst['errors']}, timeouts "
              f"{fst['timeouts']}, p50 {_ms(times[len(times) // 2])}, p99 {_ms(times[int(0.99 * len(times))])}, "
              f"max {_ms(times[-1])} (process CPU per call)")


if __name__ == "__main__":
    main()
