"""Math answer grading: pull the final answer out of a response and decide whether it
equals the gold answer. It never raises and never hangs.

What is implemented, in the order a call goes through it:

1. ``extract_answer(text)``: the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested
   and escaped braces, ``\\boxed 5``); else the last ``<answer>...</answer>`` (R1-Zero
   template); else the last "The answer is ...", "#### ..." (GSM8K) or "Answer: ...";
   ``None`` when there is none.
2. Normalisation (pure string work): ``$``, ``\\left``/``\\right``, ``\\!``/``\\,`` spacing,
   ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\text{}``/``\\mathrm{}`` unwrapped, trailing units
   (``\\text{ cm}``, "dollars", ...), degrees, ``\\$``, ``\\%``, thousands separators
   (``1,000``, ``1{,}000``), trailing periods, unicode (``π √ × ≤ −``).
3. A small recursive-descent parser turns an answer into a structure: a number or
   expression (``\\frac12``, ``a/b``, ``\\sqrt2``, ``\\sqrt[3]{x}``, ``^``, ``!``, ``\\binom``,
   ``\\pi``, ``e``, ``i``, trig/log functions, mixed numbers ``3\\frac12``, ``50\\%``,
   scientific notation), a tuple / interval (the brackets matter: ``(1,2)`` != ``[1,2]``),
   a set (``\\{...\\}`` or a bare comma list; order and repeats do not matter), a union
   of intervals, a matrix, an equation, an inequality (turned into an interval), a
   multiple-choice letter or a text answer. ``x = 5`` and ``x \\in (0,1)`` count as
   their right-hand side.
4. Comparison, fast and pure Python: numbers exactly with ``fractions.Fraction``; a
   "long" decimal (6 or more significant digits) equals a value when it is that value
   correctly rounded (or within a relative 1e-9: float output such as
   ``0.30000000000000004``); short decimals must be exact (``0.33`` is not 1/3).
   Expressions without variables (``\\pi``, radicals, ``e^{i\\pi}``) are compared in
   complex floating point; expressions with variables are compared as functions at five
   fixed pseudo-random points (a randomised identity test). A percentage equals both its
   value and its value / 100.
5. Only when that test cannot decide (a value undefined at the sample points, or a
   difference between 1e-9 and 1e-6 relative) does sympy, when installed, decide
   symbolically, in a persistent worker *process* that is killed and restarted when
   it runs past the call's timeout. Expressions that could blow up (huge exponents,
   huge factorials, very large trees) are never sent; they are equal only if their
   structure is equal. The worker is a plain subprocess with pipes, so the bound holds
   in any thread and inside multiprocessing pools (no ``signal.alarm``).

A timeout counts as a wrong answer, and is counted: ``stats()`` returns per-process
counters (calls, timeouts, sympy_calls, refused, worker_starts, errors) for the trainer
to log; ``reset_stats()`` clears them. The first sympy use in a process also waits for
the worker to start (import sympy, up to ``STARTUP_TIMEOUT`` s, outside ``timeout``);
``warmup()`` starts it ahead of time.

``grade(response, gold, backend="math_verify")`` uses the math-verify package instead
(what Kim et al., arXiv 2505.14216, used), in the same kind of worker, with the same hard bound.

This module imports only the standard library at load time (the worker process loads
this file by path and must stay light).
"""
import atexit
import cmath
import collections
import functools
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction

DEFAULT_TIMEOUT = 5.0      # seconds per is_equivalent / grade call (sympy / math-verify part)
STARTUP_TIMEOUT = 60.0     # seconds a new worker may take to import sympy (once per worker)
MAX_WORKERS = 4            # worker processes per backend per process (threads share them)

_MAX_ANSWER_CHARS = 1000   # longer answers are compared as normalised strings only
_MAX_DEPTH = 60            # parser nesting limit (deeply nested input is not a math answer)
_MAX_NODES = 1500          # parser size limit
_MAX_DIGITS = 400          # longest number literal we turn into an int
_MAX_BITS = 100_000        # largest exact intermediate (numerator / denominator bits)
_MAX_BOXES = 200           # box commands examined from the end of a response before giving up
_MAX_ELEMENTS = 64         # longest tuple / set / list we compare element by element
_LONG_DECIMAL = 6          # significant digits from which a decimal may be a rounding
_CLOSE = 1e-9              # relative difference under which two floats are the same value
_FLOAT_NOISE = 1e-12       # relative difference a printed float may carry (0.30000000000000004)
_FAR = 1e-6                # relative difference over which two floats are different values


# --------------------------------------------------------------------------- results, stats

@dataclass(frozen=True)
class Grade:
    """The verdict on one response: ``correct``; the extracted ``answer`` (None if the
    response has none); ``timed_out`` when the time bound cut the check short (then
    ``correct`` is False)."""
    correct: bool
    answer: str | None
    timed_out: bool = False


_STATS_KEYS = ("calls", "correct", "timeouts", "sympy_calls", "refused", "worker_starts", "errors")
_stats = dict.fromkeys(_STATS_KEYS, 0)
_stats_lock = threading.Lock()


def _count(key, n=1):
    with _stats_lock:
        _stats[key] += n


def stats() -> dict:
    """Counters of this process since the last reset: ``calls`` (is_equivalent / grade),
    ``correct``, ``timeouts`` (checks cut short: counted as wrong), ``sympy_calls``,
    ``refused`` (undecided comparisons not sent to sympy because they could blow up:
    counted as wrong), ``worker_starts`` and ``errors`` (internal errors: counted as
    wrong; should stay 0)."""
    with _stats_lock:
        return dict(_stats)


def reset_stats():
    with _stats_lock:
        for k in _STATS_KEYS:
            _stats[k] = 0


# --------------------------------------------------------------------------- extraction

GRADER_MODES = ("strict", "lenient")
# math-verify, which Kim et al. used for rewards and evaluation, falls back to the last
# math / number when a response states no explicit answer: a user reproducing them expects that.
DEFAULT_GRADER_MODE = "lenient"

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ESCAPE_RE = re.compile(r"\\[^A-Za-z]")       # \{ \} \\ \, ...: characters, not grouping
_BRACE_RE = re.compile(r"[{}]")
_MAX_GROUP = 8                                # boxes read together as one answer ("\boxed{2} and \boxed{3}")
# What may stand between boxes that state one answer together: a comma, "and" or "or"
# (math-verify's connectors), with math delimiters and spaces around them.
_BOX_JOIN_RE = re.compile(r"(?:\s|\$|\\[()\[\]])*(?:,\s*(?:and|or)?|and|or)(?:\s|\$|\\[()\[\]])*", re.IGNORECASE)


def _check_mode(mode):
    if mode not in GRADER_MODES:
        from .common import MinirlError      # imported here: this module stays stdlib-only
        raise MinirlError(f"unknown grader mode {mode!r}; choose one of {', '.join(GRADER_MODES)}")


def _boxes_from_end(text):
    """(start, end, content) of each complete, non-empty box, the last one first.

    Linear time whatever the input: braces are found by a regex on a copy of the text
    whose escapes (``\\{``, ``\\}``, ``\\\\``) are blanked out; a box that never closes
    makes every earlier box that is still open at its start unclosable too, so earlier
    scans stop there; at most _MAX_BOXES boxes are tried."""
    found = collections.deque((m.span() for m in _BOX_RE.finditer(text)), maxlen=_MAX_BOXES)
    if not found:
        return
    offset = found[0][1]
    blank = _ESCAPE_RE.sub("  ", text[offset:])      # same length: indices still line up
    limit = len(blank)
    for start, after in reversed(found):
        j = after - offset
        while j < len(blank) and text[offset + j] in " \t":
            j += 1
        if j < len(blank) and blank[j] == "{":
            depth = 0
            for m in _BRACE_RE.finditer(blank, j, limit):
                depth += 1 if m.group() == "{" else -1
                if depth == 0:
                    content = text[offset + j + 1:offset + m.start()].strip()
                    if content:
                        yield start, offset + m.end(), content
                    break                        # \boxed{}: try the previous box
            else:
                limit = after - offset - 1       # never closes
        elif j > after - offset:                 # "\boxed 5": one token after a space
            m = re.match(r"[^\s$]+", text[offset + j:offset + j + 200])
            if m:
                yield start, offset + j + m.end(), m.group(0)


def _final_boxes(text):
    """The last box, together with the boxes just before it that it is joined to by only
    a comma / "and" / "or" ("\\boxed{2} and \\boxed{3}" -> "2, 3"); a box followed by
    other words ("\\boxed{3}. Wait ... \\boxed{4}") was corrected and is not read."""
    group = []
    for start, end, content in _boxes_from_end(text):
        if group and not _BOX_JOIN_RE.fullmatch(text[end:group[-1][0]]):
            break
        group.append((start, content))
        if len(group) >= _MAX_GROUP:
            break
    return ", ".join(c for _, c in reversed(group)) if group else None


# "Final Answer: The final answer is X. I hope it is correct." (the Minerva / MATH few-shot format)
_MINERVA_RE = re.compile(r"final answer is\s*:?\s*([^\n]{1,300}?)\s*\.?\s*I hope it is correct", re.IGNORECASE)
# "the answer is X", "the final answer for (a) is X", "Answer: X", "#### X": markers found at
# every position (a lookahead), so "Answer: the answer is 5" yields its inner marker too.
_MARKER_RE = re.compile(r"(?=((?:\b(?:final\s+)?answer\b(?:[^\n.:$]{0,50}?\s)?(?:is|equals|=)\s*:?)"
                        r"|(?:\banswer\s*\**\s*:\s*)|(?:####\s*)))", re.IGNORECASE)
_NOT_ANSWERS = {"correct", "incorrect", "right", "wrong", "not", "that", "this", "the", "a", "an", "to", "in",
                "as", "because", "still", "indeed", "clear", "obvious", "simply", "given", "below", "above",
                "then", "therefore", "so", "thus", "likely", "probably", "unique", "valid", "as follows"}
_PHRASE_TOKEN = r"(?:[^\s,;]|,(?=\d{3}(?!\d)))+"       # a comma only as a thousands separator
_PHRASE_MATH_RE = re.compile(_PHRASE_TOKEN + r"(?:\s*[-+*/^=<>]\s*" + _PHRASE_TOKEN + ")*")
_DELIMITED_RE = re.compile(r"\s*(?:\$\$((?:[^$\\]|\\.){1,1000}?)\$\$|\$((?:[^$\\]|\\.){1,1000}?)\$|\\\((.{1,1000}?)\\\)|\\\[(.{1,1000}?)\\\])",
                           re.S)


def _clean_phrase_answer(s):
    """The math right after "The answer is": a ``$...$`` / ``\\(...\\)`` span, else the
    first expression-looking run ("8 because ..." -> "8"; "x = 5, so" -> "x = 5")."""
    s = s.strip().strip("*").strip()
    m = _DELIMITED_RE.match(s)
    if m:                                        # "The answer is $\\frac12$."
        inner = next(g for g in m.groups() if g is not None)
        return inner.strip().strip("$").strip() or None
    m = _PHRASE_MATH_RE.match(s)
    if not m:
        return None
    s = m.group(0).strip("$*").rstrip(".,;:!?").strip("*").strip()
    if not s or s.lower() in _NOT_ANSWERS:        # "the answer is correct": not an answer
        return None
    return s


def _last_answer_tag(text):
    """Content of the last ``<answer>...</answer>`` (the R1-Zero template's format)."""
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    content = text[start + len("<answer>"):end].strip()
    if _MARKER_RE.search(content) or _MINERVA_RE.search(content):   # "<answer>The answer is 5</answer>"
        inner = _phrase_answer(content)
        if inner is not None:
            return inner
    return content.strip("$").strip() or None


def _phrase_answer(text):
    """The Minerva format first; else the answer after the last marker that has one."""
    minerva = None
    for minerva in _MINERVA_RE.finditer(text):
        pass
    if minerva is not None:
        answer = _clean_phrase_answer(minerva.group(1))
        if answer is not None:
            return answer
    for m in reversed(list(_MARKER_RE.finditer(text))[-50:]):
        answer = _clean_phrase_answer(text[m.end(1):m.end(1) + 300].split("\n", 1)[0])
        if answer is not None:
            return answer
    return None


_NUMBER_TOKEN_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?\s*%?")


def _last_math_or_number(text):
    """math-verify's fallbacks: the last ``$...$`` / ``$$...$$`` / ``\\(...\\)`` /
    ``\\[...\\]`` span or the last number, whichever ends later."""
    span = None
    for span in _DELIMITED_RE.finditer(text):
        pass
    number = None
    for number in _NUMBER_TOKEN_RE.finditer(text):
        pass
    if span is not None and (number is None or span.end() >= number.end()):
        inner = next(g for g in span.groups() if g is not None).strip()
        if inner:
            return inner
    return number.group(0).strip() if number is not None else None


def extract_answer(text, mode: str = "strict") -> str | None:
    """The final answer in a response, by this order of precedence:

    1. the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``), read together
       with the boxes joined to it by only ", " / "and" / "or" (as one set or tuple);
    2. the last ``<answer>...</answer>`` (the R1-Zero template);
    3. "Final Answer: The final answer is X. I hope it is correct." (Minerva / MATH few-shot);
    4. the last "the answer is X" / "Answer: X" / "#### X" (the math right after it);
    5. mode="lenient" only: the last ``$...$`` / ``\\(...\\)`` / ``\\[...\\]`` span or the
       last number, whichever comes later (math-verify's fallbacks).

    None when there is none. ``mode`` defaults to "strict" here (gold solutions and the
    synthetic tasks' format checks want an explicit answer); ``grade`` defaults to
    DEFAULT_GRADER_MODE. An unknown mode raises MinirlError; any text never raises."""
    _check_mode(mode)
    try:
        if not isinstance(text, str) or not text:
            return None
        answer = _final_boxes(text)
        if answer is None:
            answer = _last_answer_tag(text)
        if answer is None:
            answer = _phrase_answer(text)
        if answer is None and mode == "lenient":
            answer = _last_math_or_number(text)
        return answer
    except Exception:                            # never raise on any input
        _count("errors")
        return None


# --------------------------------------------------------------------------- normalisation

_UNICODE = {"\u2212": "-", "\u2013": "-", "\u2010": "-", "\u2011": "-", "\ufe63": "-", "\uff0d": "-", "\u00d7": "\\times ", "\u22c5": "\\cdot ", "\u00b7": "\\cdot ",
            "\u00f7": "\\div ", "\u03c0": "\\pi ", "\u221a": "\\sqrt", "\u221e": "\\infty ",
            "\u2264": "\\le ", "\u2265": "\\ge ", "\u00b0": "", "\u00a0": " ", "\u222a": "\\cup ",
            "\u2208": "\\in ", "\u2205": "\\emptyset "}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))
_SUPERSCRIPTS = dict(zip("\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079\u207a\u207b\u207f",
                         "0123456789+-n"))
_SUBSCRIPTS = dict(zip("\u2080\u2081\u2082\u2083\u2084\u2085\u2086\u2087\u2088\u2089", "0123456789"))
_SUPERSCRIPT_RE = re.compile("[%s]+" % "".join(_SUPERSCRIPTS))
_SUBSCRIPT_RE = re.compile("[%s]+" % "".join(_SUBSCRIPTS))
# 10,\!000 and 1{,}000 (MATH's thousands separators); 3{,}5 with other than 3 digits after
# the comma is a decimal comma (nobody writes a list as {,}); a bare "3,5" stays a list.
_SEPARATOR_RE = re.compile(r"(?<=\d)\s*(?:,\s*\\!|\{,\})\s*(?=(\d+))")
_PERCENT_RE = re.compile(r"\\(?:text|textnormal|mbox|mathrm|textrm)\s*\{\s*(?:\\%|percent|pct)\s*\}"
                         r"|(?<=[\d}.])\s*(?:percent|pct)(?![A-Za-z])\.?")
_DELETE_RE = re.compile(
    r"\\(?:left|right)\.|\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![A-Za-z])"
    r"|(?<!\\)\\[!,;: ]|\\(?:q?quad|displaystyle|textstyle|limits|nonumber)(?![A-Za-z])"
    r"|\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|\\\$|\$")
_RENAME = [(re.compile(r"\\[dtc]frac(?![A-Za-z])"), r"\\frac"), (re.compile(r"\\[dt]binom(?![A-Za-z])"), r"\\binom"),
           (re.compile(r"\\(le|ge)q(?:slant)?(?![A-Za-z])"), r"\\\1"), (re.compile(r"\\lt(?![A-Za-z])"), "<"),
           (re.compile(r"\\gt(?![A-Za-z])"), ">"), (re.compile(r"\\%"), "%"), (re.compile(r"\{,\}"), ","),
           (re.compile(r"\\infin(?![A-Za-z])|(?<![\\A-Za-z])(?:infinity|inf)(?![A-Za-z])"), r"\\infty"),
           (re.compile(r"(?<![\\A-Za-z])(arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|cot|sec|csc|ln|log|"
                       r"exp|sqrt|pi)(?![A-Za-z])"), r"\\\1")]    # "sqrt(2)" -> "\sqrt(2)"
_WRAPPERS = ("text", "textnormal", "textbf", "textit", "textrm", "texttt", "textsf", "mathrm", "mathbf", "mathit", "mathsf",
             "mbox", "operatorname", "boldsymbol", "bm", "mathnormal", "hbox")
_WRAPPER_RE = re.compile(r"\\(?:%s)\s*\{" % "|".join(_WRAPPERS))
_WORD_UNITS = (r"(?:square |sq\.? |cubic )?(?:units?|cm|mm|km|meters?|metres?|inches|inch|feet|foot|ft|yards?|"
               r"miles?|dollars?|cents?|degrees?|radians?|seconds?|minutes?|hours?|hrs?|days?|weeks?|months?|"
               r"years?|mph|pounds?|lbs?|ounces?|oz|kg|grams?|liters?|litres?|ml|mL|people|students|ways|points|"
               r"miles per hour|square feet|square meters|cubic feet)")
# Inside \text{} a unit may be a single letter ("5\text{ m}"); bare, only a word after a space
# ("5 cm"), since "5h" or "2 s" may be algebra.
_TEXT_UNITS = r"(?:" + _WORD_UNITS + r"|m|s|h|g|L|in|mi|yd|min|sec|hr)"
_POWER_SUFFIX = r"(?:\^\s*\{?\s*[23]\s*\}?)?"
# A trailing \text{...} of words after a number is a unit or a comment ("\frac34\text{ of
# the pie}"): dropped. Single letters count only when they are units ("5\text{ m}").
_TEXT_UNIT_RE = re.compile(r"\\(?:text|textnormal|mbox|mathrm|textrm)\s*\{\s*(?:" + _TEXT_UNITS +
                           r"|[A-Za-z]{2,}(?:[ \-][A-Za-z]+)*)\s*\}\s*" + _POWER_SUFFIX + r"\s*$")
_BARE_UNIT_RE = re.compile(r"(?<=[\d})])\s+" + _WORD_UNITS + _POWER_SUFFIX + r"\s*$")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:(?:,\d{3})+|(?: \d{3})+)(?:\.\d+)?")
_PAREN_LETTER_RE = re.compile(r"\(\s*([A-Za-z])\s*\)")


def _matching_braces(s):
    """Index of the closing brace for each opening brace (escaped braces skipped)."""
    match, stack, i = {}, [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            match[stack.pop()] = i
        i += 1
    return match


def _unwrap(s):
    """``\\text{abc}`` -> ``abc`` (and the other font / text wrappers), in one pass."""
    if "\\" not in s:
        return s
    starts = list(_WRAPPER_RE.finditer(s))
    if not starts:
        return s
    match = _matching_braces(s)
    drop = set()
    for m in starts:
        close = match.get(m.end() - 1)
        if close is None:
            continue
        drop.update(range(m.start(), m.end()))
        drop.add(close)
    return "".join(c for i, c in enumerate(s) if i not in drop)


def _normalize(s):
    """Answer string -> normalised string (no meaning changes beyond notation)."""
    s = s.strip()
    if len(s) > _MAX_ANSWER_CHARS:
        return s
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group(0)], s)
    s = _SUPERSCRIPT_RE.sub(lambda m: "^{" + "".join(_SUPERSCRIPTS[c] for c in m.group(0)) + "}", s)   # x² -> x^{2}
    s = _SUBSCRIPT_RE.sub(lambda m: "_{" + "".join(_SUBSCRIPTS[c] for c in m.group(0)) + "}", s)
    s = _SEPARATOR_RE.sub(lambda m: "," if len(m.group(1)) == 3 else ".", s)
    s = _PERCENT_RE.sub("%", s)
    s = _DELETE_RE.sub(" ", s)
    for pattern, repl in _RENAME:
        s = pattern.sub(repl, s)
    s = s.strip()
    if re.search(r"\d", s[:-1] if s else s):      # "5 \text{ cm}" -> "5" (only after a number)
        s = _TEXT_UNIT_RE.sub("", s)
    s = _unwrap(s)
    s = re.sub(r"\s+", " ", s).strip()
    if re.search(r"\d", s):
        s = _BARE_UNIT_RE.sub("", s).strip()
    s = s.rstrip(".").rstrip("\\").strip()
    s = re.sub(r"^(?:the )?(?:final )?answer\b(?: is)?\s*:?\s*", "", s, flags=re.IGNORECASE)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    m = _PAREN_LETTER_RE.fullmatch(s)
    if m:
        s = m.group(1)                             # "(C)" -> "C"
    return s


def _compact(s):
    return re.sub(r"\s+", "", s)


# --------------------------------------------------------------------------- the expression parser
# AST nodes are tuples (JSON-friendly once Fractions become strings):
#   ("num", Fraction, info)   info = None for exact literals, (significant digits, ulp) for decimals
#   ("sym", name) ("const", "pi"|"e"|"i"|"inf") ("neg", x) ("pow", base, exp)
#   ("add", ((sign, term), ...)) ("mul", (("*"|"/", factor), ...))   (n-ary: long sums stay shallow)
#   ("fn", name, x) ("log", base, x) ("root", n, x) ("fact", x) ("binom", n, k) ("pct", x)
#   ("abs", x) ("floor", x) ("ceil", x)

class _ParseError(Exception):
    pass


_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
          "ln", "log", "exp"}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
          "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi",
          "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}
_PRIMARY_COMMANDS = {"frac", "sqrt", "binom", "pi", "infty", "lfloor", "lceil"} | _FUNCS | _GREEK
_NUMBER_RE = re.compile(r"(\d+\.?\d*|\.\d+)(?:[eE]([+-]?\d+))?")


class _Parser:
    """Recursive descent over the characters of a normalised answer.

    expr := term (('+'|'-') term)*      term := unary (op unary | implicit unary)*
    unary := ('-'|'+') unary | power    power := postfix ('^' superscript)?
    postfix := primary ('!'|'%')*       primary := number | (expr) | {expr} | |expr| | \\command | letter
    """

    def __init__(self, s):
        self.s, self.i, self.depth, self.nodes, self.abs_depth = s, 0, 0, 0, 0

    def parse(self):
        node = self.expr()
        if self.peek():
            raise _ParseError("trailing text")
        return node

    # -- helpers
    def peek(self):
        s, i = self.s, self.i
        while i < len(s) and s[i] == " ":
            i += 1
        self.i = i
        return s[i] if i < len(s) else ""

    def expect(self, c):
        if self.peek() != c:
            raise _ParseError(f"expected {c}")
        self.i += 1

    def command_at(self):
        """Name of the ``\\command`` at the cursor (letters only), or None."""
        if self.peek() != "\\":
            return None
        m = re.match(r"\\([A-Za-z]+)", self.s[self.i:self.i + 40])
        return m.group(1) if m else None

    def take_command(self, name):
        self.i += 1 + len(name)

    def enter(self):
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise _ParseError("too deep")

    def leave(self):
        self.depth -= 1

    def count(self):
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise _ParseError("too large")

    # -- grammar
    def expr(self):
        self.enter()
        terms = [(1, self.term())]
        while self.peek() in ("+", "-"):
            sign = 1 if self.s[self.i] == "+" else -1
            self.i += 1
            terms.append((sign, self.term()))
        self.leave()
        return terms[0][1] if len(terms) == 1 and terms[0][0] == 1 else ("add", tuple(terms))

    def starts_primary(self):
        c = self.peek()
        if not c:
            return False
        if "0" <= c <= "9" or c in "({" or ("a" <= c <= "z") or ("A" <= c <= "Z"):
            return True
        if c == "|":
            return self.abs_depth == 0
        return self.command_at() in _PRIMARY_COMMANDS

    def term(self):
        factors = [("*", self.unary())]
        while True:
            c, cmd = self.peek(), self.command_at()
            if c in ("*", "/"):
                op = c
                self.i += 1
            elif cmd in ("cdot", "times", "ast", "div"):
                op = "/" if cmd == "div" else "*"
                self.take_command(cmd)
            elif self.starts_primary():
                is_frac = cmd == "frac"
                node = self.unary()
                mixed = _mixed_number(factors, node) if is_frac else None
                if mixed is not None:            # 3\frac12 is 3 + 1/2 (a mixed number)
                    factors = [("*", mixed)]
                else:
                    factors.append(("*", node))
                continue
            else:
                break
            factors.append((op, self.unary()))
        return factors[0][1] if len(factors) == 1 else ("mul", tuple(factors))

    def unary(self):
        c = self.peek()
        if c in ("-", "+"):
            self.i += 1
            self.enter()
            node = self.unary()
            self.leave()
            return ("neg", node) if c == "-" else node
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek() == "^":
            self.i += 1
            return ("pow", base, self.superscript())
        return base

    def superscript(self):
        self.enter()
        c = self.peek()
        if c == "{":
            node = self.group()
        elif c in ("-", "+"):
            self.i += 1
            node = self.superscript()
            node = ("neg", node) if c == "-" else node
        else:
            node = self.power()
        self.leave()
        return node

    def postfix(self):
        node = self.primary()
        while self.peek() in ("!", "%"):
            node = ("fact", node) if self.s[self.i] == "!" else ("pct", node)
            self.i += 1
        return node

    def group(self):
        self.expect("{")
        node = self.expr()
        self.expect("}")
        return node

    def primary(self):
        self.count()
        c = self.peek()
        if "0" <= c <= "9" or (c == "." and "0" <= self.s[self.i + 1:self.i + 2] <= "9"):
            return self.number()
        if c in ("(", "["):
            self.i += 1
            node = self.expr()
            self.expect(")" if c == "(" else "]")
            return node
        if c == "{":
            return self.group()
        if c == "|":
            self.i += 1
            self.abs_depth += 1
            node = self.expr()
            self.expect("|")
            self.abs_depth -= 1
            return ("abs", node)
        if c == "\\":
            return self.command()
        if ("a" <= c <= "z") or ("A" <= c <= "Z"):
            self.i += 1
            return self.symbol(c)
        raise _ParseError("unexpected character")

    def symbol(self, name):
        if self.s.startswith("_", self.i):       # x_1, a_{n}
            self.i += 1
            if self.peek() == "{":
                m = re.match(r"\{\s*([A-Za-z0-9]+)\s*\}", self.s[self.i:self.i + 20])
            else:
                m = re.match(r"([A-Za-z0-9])", self.s[self.i:self.i + 1])
            if not m:
                raise _ParseError("bad subscript")
            self.i += m.end()
            return ("sym", name + "_" + m.group(1))
        if name in ("e", "i"):                   # Euler's number and the imaginary unit
            return ("const", name)
        return ("sym", name)

    def number(self):
        m = _NUMBER_RE.match(self.s, self.i)
        mantissa, exp = m.group(1), m.group(2)
        if len(mantissa) > _MAX_DIGITS or (exp and (len(exp) > 5 or abs(int(exp)) > 1000)):
            raise _ParseError("number too long")
        self.i = m.end()
        value = Fraction(mantissa)
        info = None
        if "." in mantissa or exp:
            e = int(exp) if exp else 0
            value *= Fraction(10) ** e
            digits = mantissa.replace(".", "").lstrip("0")
            decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
            info = (len(digits), Fraction(10) ** (e - decimals))
        return ("num", value, info)

    def argument(self):
        """A ``\\frac`` / ``\\sqrt`` argument: ``{...}`` or one character (``\\frac12``)."""
        c = self.peek()
        if c == "{":
            return self.group()
        if c == "(":                             # \sqrt(2), written like a function call
            return self.primary()
        if "0" <= c <= "9":
            self.i += 1
            return ("num", Fraction(int(c)), None)
        if ("a" <= c <= "z") or ("A" <= c <= "Z"):
            self.i += 1
            return self.symbol(c)
        if c == "\\":
            return self.command()
        raise _ParseError("bad argument")

    def command(self):
        name = self.command_at()
        if name is None:
            raise _ParseError("bad command")
        self.take_command(name)
        self.count()
        if name == "frac":
            num, den = self.argument(), self.argument()
            return ("mul", (("*", num), ("/", den)))
        if name == "sqrt":
            n = ("num", Fraction(2), None)
            if self.peek() == "[":
                self.i += 1
                n = self.expr()
                self.expect("]")
            return ("root", n, self.argument())
        if name == "binom":
            return ("binom", self.argument(), self.argument())
        if name == "pi":
            return ("const", "pi")
        if name == "infty":
            return ("const", "inf")
        if name in ("lfloor", "lceil"):
            node = self.expr()
            closing = "rfloor" if name == "lfloor" else "rceil"
            if self.command_at() != closing:
                raise _ParseError("unclosed floor/ceil")
            self.take_command(closing)
            return ("floor" if name == "lfloor" else "ceil", node)
        if name in _GREEK:
            return ("sym", "\\" + name)
        if name in _FUNCS:
            return self.function(name)
        raise _ParseError("unknown command")

    def function_argument(self):
        """``\\sin 2x`` is sin(2x): implicit factors up to an operator or the next function
        (``\\sin x \\cos x`` is sin(x) cos(x))."""
        if self.peek() in ("(", "{"):
            return self.power()
        factors = [("*", self.power())]
        while self.starts_primary() and self.command_at() not in _FUNCS and self.peek() not in ("(", "{"):
            factors.append(("*", self.power()))
        return factors[0][1] if len(factors) == 1 else ("mul", tuple(factors))

    def function(self, name):
        power = base = None
        if name == "log" and self.peek() == "_":
            self.i += 1
            base = self.argument()
        if self.peek() == "^":                   # \sin^2 x
            self.i += 1
            power = self.superscript()
        self.enter()
        arg = self.function_argument()
        self.leave()
        node = ("log", base, arg) if base is not None else ("fn", name, arg)
        return ("pow", node, power) if power is not None else node


def _is_int_literal(node):
    return node[0] == "num" and node[2] is None and node[1].denominator == 1


def _mixed_number(factors, frac):
    """``3\\frac{1}{2}`` -> 3 + 1/2 when the integer stands alone before a proper fraction."""
    if len(factors) != 1 or frac[0] != "mul" or len(frac[1]) != 2:
        return None
    whole = factors[0][1]
    sign = 1
    if whole[0] == "neg":
        sign, whole = -1, whole[1]
    num, den = frac[1][0][1], frac[1][1][1]
    if not (_is_int_literal(whole) and _is_int_literal(num) and _is_int_literal(den)):
        return None
    if not (0 < num[1] < den[1]):
        return None
    mixed = ("add", ((1, whole), (1, frac)))
    return ("neg", mixed) if sign < 0 else mixed


def _parse_expr(s):
    try:
        return _Parser(s).parse()
    except (_ParseError, ValueError, ZeroDivisionError, RecursionError, IndexError):
        return None


# --------------------------------------------------------------------------- answer structure
# ("expr", ast) ("tuple", open, close, [answers]) ("set", [answers]) ("list", [answers])
# ("union", [answers]) ("matrix", [[ast]]) ("eq", lhs, rhs) ("text", lower) ("raw", compact)

_SIMPLE_NAME = r"(?:[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z, ]*\))?|\\[A-Za-z]+)"
_NAME_RE = re.compile(_SIMPLE_NAME)
_VARIABLE_RE = re.compile(r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?|\\[A-Za-z]+")   # a name that can be a variable
# What labels an answer ("AB = 4", "|AB| = 1", "\overline{AC} = 3", "m\angle A = 30", "area = 5").
_LABEL_RE = re.compile(r"%s|[A-Za-z]{2,20}(?:_\{?[A-Za-z0-9]+\}?)?|\|[A-Za-z]{1,4}\||\\overline\{[A-Za-z]{1,4}\}"
                       r"|(?:m\s*)?\\angle\s*[A-Za-z]{1,3}" % _SIMPLE_NAME)
_NAMES_TUPLE_RE = re.compile(r"\(\s*%s(?:\s*,\s*%s)*\s*\)" % (_SIMPLE_NAME, _SIMPLE_NAME))
_IN_RE = re.compile(r"^(%s|\(.*?\))\s*\\in(?![A-Za-z])\s*(.+)$" % _SIMPLE_NAME)
_WORD_RE = re.compile(r"[A-Za-z]+(?:[ '\-][A-Za-z]+)*")
_MATRIX_RE = re.compile(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[lcr|]*\})?(.*)\\end\{\1\}", re.S)
_RELATION_RE = re.compile(r"\\le(?![A-Za-z])|\\ge(?![A-Za-z])|<=|>=|<|>")
_OPEN, _CLOSE_BR = "([{", ")]}"
_PM_RE = re.compile(r"\\pm(?![A-Za-z])")


def _split_top(s, seps):
    """Split on separators that are outside all brackets (``\\{`` counts as a bracket)."""
    if not any(sep in s for sep in seps):
        return [s]
    parts, depth, start, i, n = [], 0, 0, 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            if i + 1 < n and s[i + 1] in "{}":
                depth += 1 if s[i + 1] == "{" else -1
                i += 2
                continue
            if depth == 0:
                for sep in seps:
                    if sep.startswith("\\") and s.startswith(sep, i) and not s[i + len(sep):i + len(sep) + 1].isalpha():
                        parts.append(s[start:i])
                        i += len(sep)
                        start = i
                        break
                else:
                    i += 1
                continue
            i += 1
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE_BR:
            depth -= 1
        elif depth == 0:
            for sep in seps:
                if not sep.startswith("\\") and s.startswith(sep, i):
                    parts.append(s[start:i])
                    i += len(sep)
                    start = i
                    break
            else:
                i += 1
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _wraps_whole(s):
    """True when the bracket opening at 0 closes exactly at the end (any bracket kinds)."""
    depth, i, n = 0, 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
        else:
            if c in _OPEN:
                depth += 1
            elif c in _CLOSE_BR:
                depth -= 1
            i += 1
        if depth == 0:
            return i == n
    return False


def _answer(s, depth=0):
    """Normalised answer string -> answer structure (see the table above)."""
    s = s.strip()
    if depth > 4 or len(s) > _MAX_ANSWER_CHARS:
        return ("raw", _compact(s))
    if not s:
        return ("raw", "")
    if s in ("\\emptyset", "\\varnothing", "\\{\\}", "\\{ \\}", "{}"):
        return ("set", [])
    if s in ("\\mathbb{R}", "\\mathbb R", "\\R", "(-\\infty,\\infty)"):
        s = "(-\\infty,\\infty)"
    if _WORD_RE.fullmatch(s) and re.search(r"[A-Za-z]{3}", s):
        return ("text", " ".join(s.lower().split()))
    if len(_PM_RE.findall(s)) == 1:              # 1 \pm \sqrt2 is a set of two values
        return ("set", [_answer(_PM_RE.sub("+", s), depth + 1), _answer(_PM_RE.sub("-", s), depth + 1)])
    parts = _split_top(s, ("\\cup",))
    if len(parts) > 1:
        return ("union", [_answer(p, depth + 1) for p in parts])
    m = _IN_RE.match(s)
    if m:
        return _answer(m.group(2), depth + 1)
    m = _MATRIX_RE.fullmatch(s)
    if m:
        return _matrix(m.group(2))
    if s.startswith("\\{") and s.endswith("\\}") and _wraps_whole(s):
        return ("set", _elements(s[2:-2], depth))
    if s[0] in "([" and s[-1] in ")]" and _wraps_whole(s):
        inner = _split_top(s[1:-1], (",",))
        if len(inner) > 1:
            return ("tuple", s[0], s[-1], [_answer(p, depth + 1) for p in inner[:_MAX_ELEMENTS + 1]])
    parts = _split_top(s, (",", ";", " and ", " or "))
    if len(parts) > 1:
        return ("list", [_answer(p, depth + 1) for p in parts[:_MAX_ELEMENTS + 1] if p.strip()])
    rel = _relation(s)
    if rel is not None:
        return rel
    sides = _split_top(s, ("=",))
    if len(sides) > 1:
        lhs, rhs = sides[0].strip(), sides[-1].strip()
        if _LABEL_RE.fullmatch(lhs) or _NAMES_TUPLE_RE.fullmatch(lhs):
            return _labelled(lhs, rhs, len(sides), depth)   # "x = 5" answers 5
        if len(sides) == 2 and _NAME_RE.fullmatch(rhs):
            return _answer(lhs, depth + 1)        # "x + 1 = y" answers x + 1
        if len(sides) == 2:
            left, right = _parse_expr(lhs), _parse_expr(sides[1].strip())
            if left is not None and right is not None:
                return ("eq", left, right)
        return ("raw", _compact(s))
    node = _parse_expr(s)
    return ("expr", node) if node is not None else ("raw", _compact(s))


def _labelled(name, rhs, n_sides, depth):
    """``name = rhs``: ("labelled", answer of rhs, equation or None). The equation is kept
    when the name is a variable, so ``y = -x/2 + 3/4`` can still equal ``2x + 4y - 3 = 0``."""
    inner = _answer(rhs, depth + 1)
    eq = None
    if n_sides == 2 and inner[0] == "expr" and _VARIABLE_RE.fullmatch(name):
        var = _parse_expr(name)
        if var is not None and var[0] == "sym":
            eq = ("eq", var, inner[1])
    return ("labelled", inner, eq)


def _elements(inner, depth):
    return [_answer(p, depth + 1) for p in _split_top(inner, (",",))[:_MAX_ELEMENTS + 1] if p.strip()]


def _matrix(body):
    rows = [r for r in re.split(r"\\\\", body) if r.strip()]
    cells = [[_parse_expr(c.strip()) for c in r.split("&")] for r in rows[:_MAX_ELEMENTS]]
    if not cells or any(c is None for r in cells for c in r) or len({len(r) for r in cells}) != 1:
        return ("raw", _compact(body))
    return ("matrix", cells)


_NEG_INF = ("neg", ("const", "inf"))
_POS_INF = ("const", "inf")


def _relation(s):
    """``x \\le 3`` -> (-oo, 3]; ``-1 < x < 2`` -> (-1, 2); other relations -> None."""
    pieces, ops, last = [], [], 0
    for m in _RELATION_RE.finditer(s):
        pieces.append(s[last:m.start()].strip())
        ops.append(m.group(0))
        last = m.end()
    if not ops:
        return None
    pieces.append(s[last:].strip())
    less = [o in ("<", "\\le", "<=") for o in ops]
    closed = [o in ("\\le", "\\ge", "<=", ">=") for o in ops]
    if len(ops) == 1:
        a, b = pieces
        if _NAME_RE.fullmatch(a):      # x < b  /  x > b
            node, var_left = _parse_expr(b), True
        elif _NAME_RE.fullmatch(b):    # a < x  /  a > x
            node, var_left = _parse_expr(a), False
        else:                          # -x > -1, 2x + 3 \le 7: linear in one variable
            node, var_left = _solve_linear(a, b)
        if node is None:
            return None
        upper = less[0] == var_left    # x < b, b > x: the value is an upper bound
        if upper:
            return ("tuple", "(", "]" if closed[0] else ")", [("expr", _NEG_INF), ("expr", node)])
        return ("tuple", "[" if closed[0] else "(", ")", [("expr", node), ("expr", _POS_INF)])
    if len(ops) == 2 and less[0] == less[1] and _NAME_RE.fullmatch(pieces[1]):
        lo, hi = (pieces[0], pieces[2]) if less[0] else (pieces[2], pieces[0])
        lo_closed, hi_closed = (closed[0], closed[1]) if less[0] else (closed[1], closed[0])
        lo, hi = _parse_expr(lo), _parse_expr(hi)
        if lo is None or hi is None:
            return None
        return ("tuple", "[" if lo_closed else "(", "]" if hi_closed else ")", [("expr", lo), ("expr", hi)])
    return None


_LINEAR_POINTS = (Fraction(0), Fraction(1), Fraction(2), Fraction(-3, 2), Fraction(7, 3), Fraction(11, 5))


def _solve_linear(a, b):
    """``a op b`` with a - b = c x + d linear in one variable x (checked exactly at six
    points): (the bound -d/c as a node, whether x ends up on the left of ``op``, which
    flips when c < 0). (None, None) otherwise."""
    left, right = _parse_expr(a), _parse_expr(b)
    if left is None or right is None:
        return None, None
    diff = ("add", ((1, left), (-1, right)))
    names = _symbols(diff)
    if len(names) != 1:
        return None, None
    (name,) = names
    try:
        values = [_exact(_substitute(diff, name, ("num", x, None))) for x in _LINEAR_POINTS]
    except (_NotExact, _TooBig, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None, None
    d, c = values[0], values[1] - values[0]
    if c == 0 or any(v != c * x + d for x, v in zip(_LINEAR_POINTS, values)):
        return None, None
    return ("num", -d / c, None), c > 0


def _substitute(node, name, value):
    """``node`` with the symbol ``name`` replaced by the node ``value``."""
    tag = node[0]
    if tag == "sym":
        return value if node[1] == name else node
    if tag in ("num", "const"):
        return node
    if tag in ("add", "mul"):
        return (tag, tuple((op, _substitute(c, name, value)) for op, c in node[1]))
    if tag == "fn":
        return ("fn", node[1], _substitute(node[2], name, value))
    return (tag,) + tuple(None if c is None else _substitute(c, name, value) for c in node[1:])


# --------------------------------------------------------------------------- evaluation

class _NotExact(Exception):
    pass


class _TooBig(Exception):
    pass


class _Undefined(Exception):
    pass


def _check_bits(x):
    if x.numerator.bit_length() > _MAX_BITS or x.denominator.bit_length() > _MAX_BITS:
        raise _TooBig()
    return x


def _exact(node):
    """Exact rational value of a node, or _NotExact (irrational, symbolic) / _TooBig."""
    tag = node[0]
    if tag == "num":
        return node[1]
    if tag == "neg":
        return -_exact(node[1])
    if tag == "add":
        return _check_bits(sum((sign * _exact(t) for sign, t in node[1]), Fraction(0)))
    if tag == "mul":
        value = Fraction(1)
        for op, f in node[1]:
            v = _exact(f)
            if op == "/":
                if v == 0:
                    raise _NotExact()
                value /= v
            else:
                value *= v
            _check_bits(value)
        return value
    if tag == "pow":
        base = _exact(node[1])
        exp = _exact(node[2])
        if exp.denominator != 1:
            raise _NotExact()
        e = exp.numerator
        if base == 0 and e < 0:
            raise _NotExact()
        if base in (0, 1):
            return base
        if base == -1:
            return Fraction(-1) if e % 2 else Fraction(1)
        bits = max(base.numerator.bit_length(), base.denominator.bit_length())
        if bits * abs(e) > _MAX_BITS:      # never build a giant integer (10^{10^{10}})
            raise _TooBig()
        return base ** e
    if tag == "pct":
        return _exact(node[1]) / 100
    if tag == "fact":
        n = _exact(node[1])
        if n.denominator != 1 or n < 0:
            raise _NotExact()
        if n > 2000:
            raise _TooBig()
        return Fraction(math.factorial(int(n)))
    if tag == "binom":
        n, k = _exact(node[1]), _exact(node[2])
        if n.denominator != 1 or k.denominator != 1 or n < 0 or k < 0:
            raise _NotExact()
        if n > 20000:
            raise _TooBig()
        return Fraction(math.comb(int(n), int(k)))
    if tag == "abs":
        return abs(_exact(node[1]))
    if tag == "floor":
        return Fraction(math.floor(_exact(node[1])))
    if tag == "ceil":
        return Fraction(math.ceil(_exact(node[1])))
    raise _NotExact()


_CMATH = {"sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "arcsin": cmath.asin, "arccos": cmath.acos,
          "arctan": cmath.atan, "sinh": cmath.sinh, "cosh": cmath.cosh, "tanh": cmath.tanh, "ln": cmath.log,
          "log": cmath.log, "exp": cmath.exp, "cot": lambda z: 1 / cmath.tan(z), "sec": lambda z: 1 / cmath.cos(z),
          "csc": lambda z: 1 / cmath.sin(z)}
_CONSTS = {"pi": complex(math.pi), "e": complex(math.e), "i": 1j}


def _real(z):
    if abs(z.imag) > 1e-12 * max(1.0, abs(z.real)):
        raise _Undefined()
    return z.real


def _z(z):
    """Drop a negative zero imaginary part: (-1-0j)**0.5 is -1j, (-1+0j)**0.5 is 1j, and
    which one we get must not depend on how the -1 was written."""
    return complex(z.real, 0.0) if z.imag == 0 else z


def _num(node, env):
    """Complex value of a node with symbols taken from ``env`` (raises _Undefined)."""
    tag = node[0]
    if tag == "num":
        return complex(node[1])
    if tag == "sym":
        return env[node[1]]
    if tag == "const":
        if node[1] == "inf":
            raise _Undefined()
        return _CONSTS[node[1]]
    if tag == "neg":
        return -_num(node[1], env)
    if tag == "add":
        return sum((sign * _num(t, env) for sign, t in node[1]), 0j)
    if tag == "mul":
        value = 1 + 0j
        for op, f in node[1]:
            v = _num(f, env)
            value = value / v if op == "/" else value * v
        return value
    if tag == "pow":
        base, exp = _z(_num(node[1], env)), _num(node[2], env)
        if base == 0 and exp.real <= 0:
            raise _Undefined()
        return base ** exp
    if tag == "root":
        n, x = _num(node[1], env), _z(_num(node[2], env))
        if n.imag == 0 and n.real % 2 == 1 and x.imag == 0 and x.real < 0:
            return -((-x.real) ** (1 / n.real)) + 0j     # the real odd root: \sqrt[3]{-8} = -2
        return x ** (1 / n)
    if tag == "fn":
        return _CMATH[node[1]](_z(_num(node[2], env)))
    if tag == "log":
        return cmath.log(_z(_num(node[2], env))) / cmath.log(_z(_num(node[1], env)))
    if tag == "pct":
        return _num(node[1], env) / 100
    if tag == "abs":
        return complex(abs(_num(node[1], env)))
    if tag in ("floor", "ceil"):
        x = _real(_num(node[1], env))
        return complex(math.floor(x) if tag == "floor" else math.ceil(x))
    if tag == "fact":
        x = _real(_num(node[1], env))
        return complex(math.gamma(x + 1))
    if tag == "binom":
        n, k = _real(_num(node[1], env)), _real(_num(node[2], env))
        if n != int(n) or k != int(k) or n > 10000 or n < 0 or k < 0:
            raise _Undefined()
        return complex(math.comb(int(n), int(k)))
    raise _Undefined()


def _numeric(node, env):
    try:
        z = _num(node, env)
    except (_Undefined, OverflowError, ZeroDivisionError, ValueError, KeyError, TypeError):
        return None
    if not (math.isfinite(z.real) and math.isfinite(z.imag)):
        return None
    return z


def _walk(node):
    """All sub-nodes (iterative: no recursion limit)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        tag = n[0]
        if tag in ("add", "mul"):
            stack.extend(child for _, child in n[1])
        elif tag in ("neg", "pct", "abs", "floor", "ceil", "fact"):
            stack.append(n[1])
        elif tag in ("pow", "root", "binom"):
            stack.extend((n[1], n[2]))
        elif tag == "fn":
            stack.append(n[2])
        elif tag == "log":
            stack.extend(c for c in (n[1], n[2]) if c is not None)


def _symbols(node):
    return {n[1] for n in _walk(node) if n[0] == "sym"}


def _has_inf(node):
    return any(n[0] == "const" and n[1] == "inf" for n in _walk(node))


def _inf_sign(node):
    """+1 for oo, -1 for -oo (also written -\\infty or +\\infty), 0 for anything else."""
    sign = 1
    while node[0] == "neg":
        sign, node = -sign, node[1]
    return sign if node == _POS_INF else 0


def _decimal_info(node):
    while node[0] == "neg":
        node = node[1]
    if node[0] == "num" and node[2] is not None and node[2][0] >= _LONG_DECIMAL:
        return node[2]
    return None


def _suspicious(node):
    """Could sympy blow up on this (giant powers, factorials, trees)? Then it is not sent."""
    count = 0
    for n in _walk(node):
        count += 1
        if count > 300:
            return True
        tag = n[0]
        if tag == "num" and max(n[1].numerator.bit_length(), n[1].denominator.bit_length()) > 300:
            return True
        if tag == "pow":
            exp = n[2]
            if any(m[0] in ("pow", "fact", "binom") for m in _walk(exp)):
                return True
            v = _numeric(exp, {s: 1.5 + 0j for s in _symbols(exp)})
            if v is None or abs(v) > 1000:
                return True
        if tag in ("fact", "binom"):
            v = _numeric(n[1], {s: 1.5 + 0j for s in _symbols(n[1])})
            if v is None or abs(v) > 1000:
                return True
    return False


# --------------------------------------------------------------------------- comparison

def _points(names):
    """Five fixed pseudo-random points (deterministic across runs and processes)."""
    return _points_for(tuple(sorted(names)))


@functools.lru_cache(maxsize=1024)
def _points_for(names):
    pts = []
    for k in range(5):
        rng = random.Random(7919 * (k + 1))
        sign = (lambda: 1.0) if k < 3 else (lambda: rng.choice((1.0, -1.0)))
        pts.append({n: complex(sign() * rng.uniform(0.5, 2.5)) for n in names})
    return tuple(pts)


def _scale(a, b):
    return max(abs(a), abs(b), 1e-4)


class _Context:
    """One comparison: its deadline, whether it timed out, and per-node caches."""

    def __init__(self, timeout, use_sympy=True):
        self.deadline = time.monotonic() + max(0.0, float(timeout))
        self.use_sympy = use_sympy
        self.timed_out = False
        self._exact = {}

    def exact(self, node):
        key = id(node)
        if key not in self._exact:
            try:
                value = _exact(node)
            except _NotExact:
                value = None
            except _TooBig:
                value = _TooBig
            except (ValueError, ZeroDivisionError, OverflowError):
                value = None
            self._exact[key] = (node, value)      # keep node alive: ids stay unique
        return self._exact[key][1]

    # -- scalars
    def scalar(self, a, b):
        variants = [(a, b)]
        if a[0] == "pct":                          # 50% is 50 and 0.5
            variants.append((a[1], b))
        if b[0] == "pct":
            variants.append((a, b[1]))
        return any(self._scalar(x, y) for x, y in variants)

    def _scalar(self, a, b):
        if a == b:
            return True
        if _has_inf(a) or _has_inf(b):
            sa, sb = _inf_sign(a), _inf_sign(b)
            return sa != 0 and sa == sb
        ea, eb = self.exact(a), self.exact(b)
        if ea is _TooBig or eb is _TooBig:
            return False                           # structurally different giant numbers
        if ea is not None and eb is not None:
            return ea == eb or _decimal_close(a, b, ea, eb)
        names = _symbols(a) | _symbols(b)
        if not names:
            va, vb = _numeric(a, {}), _numeric(b, {})
            if va is None or vb is None:
                return False                       # 1/0, log 0, overflow: not an answer
            if abs(va - vb) <= _CLOSE * _scale(va, vb) or _decimal_close(a, b, va, vb):
                return True
            if abs(va - vb) > _FAR * _scale(va, vb):
                return False
            return self.sympy(a, b)
        agree = defined_a = defined_b = 0
        for env in _points(names):
            va, vb = _numeric(a, env), _numeric(b, env)
            defined_a += va is not None
            defined_b += vb is not None
            if va is None or vb is None:
                continue
            diff = abs(va - vb)
            if diff > _FAR * _scale(va, vb):
                return False
            if diff > _CLOSE * _scale(va, vb):
                return self.sympy(a, b)
            agree += 1
        if agree >= 3:
            return True
        if (defined_a == 0) != (defined_b == 0):   # undefined wherever we look: not an answer
            return False
        return self.sympy(a, b)

    def sympy(self, a, b):
        """Symbolic check in the worker process, bounded by the deadline."""
        if not self.use_sympy or not _have("sympy"):
            return False
        if _suspicious(a) or _suspicious(b):
            _count("refused")
            return False
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.timed_out = True
            return False
        _count("sympy_calls")
        try:
            reply = _pool("sympy").call({"op": "sympy", "a": _to_json(a), "b": _to_json(b)}, remaining)
        except _Timeout:
            self.timed_out = True
            return False
        except _WorkerDied:
            _count("errors")
            return False
        return reply.get("equal") is True

    # -- equations
    def equation(self, A, B):
        da = ("add", ((1, A[1]), (-1, A[2])))
        db = ("add", ((1, B[1]), (-1, B[2])))
        if self.scalar(da, db) or self.scalar(da, ("neg", db)):
            return True
        names = _symbols(da) | _symbols(db)        # 2x+2y=4 is x+y=2: a constant ratio
        ratios = []
        for env in _points(names):
            va, vb = _numeric(da, env), _numeric(db, env)
            if va is not None and vb is not None and abs(vb) > 1e-9:
                ratios.append(va / vb)
        return (len(ratios) >= 3 and abs(ratios[0]) > 1e-9
                and all(abs(r - ratios[0]) <= _CLOSE * _scale(r, ratios[0]) for r in ratios))

    # -- structures
    def equal(self, A, B):
        if A[0] == "labelled" or B[0] == "labelled":
            return self.labelled(A, B)
        ka, kb = A[0], B[0]
        if ka in ("raw", "text") or kb in ("raw", "text"):
            return ka == kb and A[1] == B[1]
        if ka == "expr" and kb == "expr":
            return self.scalar(A[1], B[1])
        if ka in ("set", "list") and len(A[1]) == 1 and kb not in ("set", "list"):
            return self.equal(A[1][0], B)          # {3} is 3
        if kb in ("set", "list") and len(B[1]) == 1 and ka not in ("set", "list"):
            return self.equal(A, B[1][0])
        if ka in ("set", "list", "union") and kb in ("set", "list", "union"):
            if (ka == "union") != (kb == "union"):
                return False
            return self.same_set(A[1], B[1])
        if ka == "tuple" and kb == "tuple":
            return A[1] == B[1] and A[2] == B[2] and self.same_seq(A[3], B[3])
        if {ka, kb} == {"tuple", "list"}:          # "1, 2" answers the point (1, 2)
            t, lst = (A, B) if ka == "tuple" else (B, A)
            return t[1] == "(" and t[2] == ")" and self.same_seq(t[3], lst[1])
        if ka == "matrix" and kb == "matrix":
            return (len(A[1]) == len(B[1]) and all(len(r) == len(s) for r, s in zip(A[1], B[1]))
                    and all(self.scalar(x, y) for r, s in zip(A[1], B[1]) for x, y in zip(r, s)))
        if {ka, kb} == {"matrix", "tuple"}:        # a column or row vector written as (1, 2)
            m, t = (A, B) if ka == "matrix" else (B, A)
            flat = [c for r in m[1] for c in r]
            vector = len(m[1]) == 1 or all(len(r) == 1 for r in m[1])
            return vector and t[1] == "(" and self.same_seq([("expr", c) for c in flat], t[3])
        if ka == "eq" and kb == "eq":
            return self.equation(A, B)
        return False

    def labelled(self, A, B):
        """``y = -x/2 + 3/4`` vs ``2x + 4y = 3``: the same equation; else the labels are
        ignored (``AB = 4`` answers 4, ``x = 5`` and ``y = 5`` both answer 5)."""
        ea = A[2] if A[0] == "labelled" else (A if A[0] == "eq" else None)
        eb = B[2] if B[0] == "labelled" else (B if B[0] == "eq" else None)
        if ea is not None and eb is not None and self.equation(ea, eb):
            return True
        if A[0] == "eq" or B[0] == "eq":
            return False
        return self.equal(A[1] if A[0] == "labelled" else A, B[1] if B[0] == "labelled" else B)

    def same_seq(self, xs, ys):
        if len(xs) != len(ys) or len(xs) > _MAX_ELEMENTS:
            return False
        return all(self.equal(x, y) for x, y in zip(xs, ys))

    def same_set(self, xs, ys):
        """Set equality (order and repeats do not matter): every element of each side
        equals some element of the other."""
        if len(xs) > _MAX_ELEMENTS or len(ys) > _MAX_ELEMENTS:
            return False
        if not xs or not ys:
            return not xs and not ys
        return (all(any(self.equal(x, y) for y in ys) for x in xs)
                and all(any(self.equal(x, y) for x in xs) for y in ys))


def _decimal_close(a, b, va, vb):
    """A long decimal literal equals a value it is a correct rounding of (or within a
    relative 1e-9: float noise). Short decimals get no tolerance."""
    ulps = [info[1] for info in (_decimal_info(a), _decimal_info(b)) if info is not None]
    if not ulps:
        return False
    diff = abs(va - vb)
    if diff <= _FLOAT_NOISE * max(abs(va), abs(vb)):
        return True
    if isinstance(diff, Fraction):                 # exact values: exact half-ulp test
        return any(diff <= ulp / 2 for ulp in ulps)
    return any(diff <= float(ulp) / 2 * (1 + 1e-9) for ulp in ulps)


def _to_json(node):
    """AST -> JSON-able lists (Fractions as "p/q")."""
    tag = node[0]
    if tag == "num":
        return ["num", f"{node[1].numerator}/{node[1].denominator}"]
    if tag in ("sym", "const"):
        return list(node)
    if tag in ("add", "mul"):
        return [tag, [[op, _to_json(c)] for op, c in node[1]]]
    if tag == "fn":
        return ["fn", node[1], _to_json(node[2])]
    return [tag] + [None if c is None else _to_json(c) for c in node[1:]]


def _multiple_choice(pred, gold):
    """Gold "C" / "(C)": the prediction may be "C", "(C)", "C)" or "(C) 12"."""
    g = re.fullmatch(r"\(?([A-J])\)?", gold)
    if not g:
        return None
    p = re.match(r"\(?([A-Ja-j])\)?(?:[\s.:]|$)", pred)
    return bool(p) and p.group(1).upper() == g.group(1)


def _check(pred, gold, timeout, use_sympy=True):
    """(equal, timed_out) for two answer strings. Every failure is 'not equal'."""
    if pred is None or gold is None:
        return False, False
    pred, gold = str(pred), str(gold)
    if "\\boxed" in pred or "\\fbox" in pred:       # \boxed{\boxed{5}}, or a gold given boxed
        pred = extract_answer(pred) or pred
    if "\\boxed" in gold or "\\fbox" in gold:
        gold = extract_answer(gold) or gold
    p, g = _normalize(pred), _normalize(gold)
    cp, cg = _compact(p), _compact(g)
    if cp == cg:
        return True, False
    if cp.isalpha() and cg.isalpha() and cp.lower() == cg.lower():   # "yes" / "Yes", "c" / "C"
        return True, False
    choice = _multiple_choice(p, g)
    if choice is not None:
        return choice, False
    if len(p) > _MAX_ANSWER_CHARS or len(g) > _MAX_ANSWER_CHARS:
        return False, False
    ctx = _Context(timeout, use_sympy)
    return bool(ctx.equal(_answer(p), _answer(g))), ctx.timed_out


def is_equivalent(pred, gold, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True when answer ``pred`` equals answer ``gold`` (both strings, without the
    surrounding response). Never raises; returns within ``timeout`` seconds (plus a
    one-time worker start); a timeout is counted in ``stats()`` and returns False."""
    return _grade_answer(pred, gold, timeout)[0]


def _grade_answer(pred, gold, timeout):
    _count("calls")
    try:
        ok, timed_out = _check(pred, gold, timeout)
    except Exception:              # a bug must cost a reward, never a training run
        _count("errors")
        return False, False
    if timed_out:
        _count("timeouts")
    if ok:
        _count("correct")
    return ok, timed_out


def canonical_answer(answer) -> str | None:
    """A canonical string for grouping equal answers (majority vote, answer entropy):
    exact numbers become ``p/q`` / integers (``0.5``, ``\\frac12`` -> ``1/2``), everything
    else its normalised string without spaces. Cheap; never raises."""
    try:
        if answer is None:
            return None
        s = _normalize(str(answer))
        if len(s) <= _MAX_ANSWER_CHARS:
            A = _answer(s)
            while A[0] == "labelled":            # "x = 5" groups with 5
                A = A[1]
            if A[0] == "expr":
                value = _Context(0).exact(A[1])
                if isinstance(value, Fraction):
                    return str(value)
            if A[0] == "text":
                return A[1]
        return _compact(s)
    except Exception:
        _count("errors")
        return None


def grade(response, gold, backend: str = "minirl", timeout: float = DEFAULT_TIMEOUT,
          mode: str = DEFAULT_GRADER_MODE) -> Grade:
    """Grade a whole response against a gold answer.

    backend="minirl": ``extract_answer(response, mode)`` then ``is_equivalent``; mode
    "strict" reads explicit answers only (a format-following reward), "lenient" (the
    default) also math-verify's fallbacks (the last math span or number).
    backend="math_verify": math-verify's ``parse`` + ``verify`` (needs ``pip install
    math-verify``), run in a worker process under the same hard time bound.
    Never raises on any response / gold; an unknown backend or a missing math-verify
    package raises MinirlError (those are configuration errors)."""
    _check_mode(mode)
    if backend == "minirl":
        answer = extract_answer(response, mode)
        if answer is None:
            _count("calls")
            return Grade(False, None, False)
        ok, timed_out = _grade_answer(answer, gold, timeout)
        return Grade(ok, answer, timed_out)
    if backend == "math_verify":
        if not _have("math_verify"):
            from .common import MinirlError   # imported here: this module stays stdlib-only
            raise MinirlError("grader backend 'math_verify' needs the math-verify package: "
                              "pip install math-verify (or use backend='minirl')")
        return _grade_math_verify(response, gold, timeout)
    from .common import MinirlError
    raise MinirlError(f"unknown grader backend {backend!r}; choose 'minirl' or 'math_verify'")


def _grade_math_verify(response, gold, timeout):
    _count("calls")
    if not isinstance(response, str) or gold is None:
        return Grade(False, None, False)
    try:
        reply = _pool("math_verify").call({"op": "math_verify", "response": response, "gold": str(gold)},
                                          float(timeout))
    except _Timeout:
        _count("timeouts")
        return Grade(False, None, True)
    except Exception:
        _count("errors")
        return Grade(False, None, False)
    if "error" in reply:
        _count("errors")
    ok = reply.get("correct") is True
    if ok:
        _count("correct")
    return Grade(ok, reply.get("answer"), False)


# --------------------------------------------------------------------------- worker processes
# A worker is `python -c _BOOT <this file> <kind>`: it loads this file by path (not the
# minirl package, which would import torch), imports sympy (and math-verify) once, says
# "ready", then answers one JSON request per line. The parent waits on the pipe with
# poll() and a deadline; on timeout it kills the worker (SIGKILL: a stuck sympy cannot
# ignore it) and the next call starts a new one. Plain pipes + poll work from any thread
# and inside daemonic multiprocessing workers (which may not use multiprocessing.Process).

_BOOT = ("import importlib.util, sys; "
         "spec = importlib.util.spec_from_file_location('_minirl_grader_worker', sys.argv[1]); "
         "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m._worker_main(sys.argv[2])")


class _Timeout(Exception):
    pass


class _WorkerDied(Exception):
    pass


_have_cache = {}


def _have(module):
    if module not in _have_cache:
        _have_cache[module] = importlib.util.find_spec(module) is not None
    return _have_cache[module]


class _Worker:
    def __init__(self, kind):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, os.path.abspath(__file__), kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        self.buf = b""
        _count("worker_starts")
        try:
            if self._read_line(time.monotonic() + STARTUP_TIMEOUT) != b"ready":
                raise _WorkerDied()
        except BaseException:
            self.kill()
            raise

    def _read_line(self, deadline):
        import select
        fd = self.proc.stdout.fileno()
        poller = select.poll()                  # poll, not select: fds above 1024 are fine
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise _Timeout()
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _WorkerDied()
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.strip()

    def request(self, obj, deadline):
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()
        return json.loads(self._read_line(deadline))

    def kill(self):
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass


class _Pool:
    """Up to MAX_WORKERS workers of one kind; a thread takes an idle one or starts one."""

    def __init__(self, kind):
        self.kind = kind
        self.idle = []
        self.live = 0
        self.failed_starts = 0       # after 3 failed starts in a row, stop trying (no sympy there)
        self.cond = threading.Condition()

    def _acquire(self, deadline):
        with self.cond:
            while not self.idle and self.live >= MAX_WORKERS:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Timeout()
                self.cond.wait(remaining)
            if self.idle:
                return self.idle.pop(), False
            if self.failed_starts >= 3:
                raise _WorkerDied()
            self.live += 1
        try:
            worker = _Worker(self.kind)          # start-up waits outside the call's timeout
        except BaseException:
            with self.cond:
                self.failed_starts += 1
            self._release(None)
            raise
        with self.cond:
            self.failed_starts = 0
        return worker, True

    def _release(self, worker):
        with self.cond:
            if worker is None:
                self.live -= 1
            else:
                self.idle.append(worker)
            self.cond.notify()

    def call(self, obj, timeout):
        """Send one request and return the reply. Raises _Timeout when no answer comes
        within ``timeout`` seconds (the worker is killed), _WorkerDied when no worker
        could answer (a worker that died while idle is replaced once)."""
        deadline = time.monotonic() + timeout
        for attempt in range(2):
            try:
                worker, fresh = self._acquire(deadline)
                if fresh:                        # a worker just started: its start-up is not billed
                    deadline = max(deadline, time.monotonic() + timeout)
            except (_Timeout, _WorkerDied):
                raise
            except Exception:                    # could not start a process at all
                raise _WorkerDied() from None
            try:
                reply = worker.request(obj, deadline)
            except BaseException as e:
                worker.kill()                    # stuck or dead: a fresh one next time
                self._release(None)
                if isinstance(e, _Timeout):
                    raise
                if isinstance(e, (_WorkerDied, OSError, ValueError)) and attempt == 0:
                    continue
                if isinstance(e, (_WorkerDied, OSError, ValueError)):
                    raise _WorkerDied() from None
                raise
            self._release(worker)
            return reply
        raise _WorkerDied()

    def close(self):
        with self.cond:
            workers, self.idle = self.idle, []
            self.live -= len(workers)
        for w in workers:
            w.kill()


_pools = {}
_pools_lock = threading.Lock()


def _pool(kind):
    with _pools_lock:
        if kind not in _pools:
            _pools[kind] = _Pool(kind)
        return _pools[kind]


def _after_fork_in_child():
    # A forked child must not talk to its parent's workers (shared pipes) nor wait on a
    # lock another parent thread held at fork time: start from scratch.
    global _pools_lock, _stats_lock
    _pools.clear()
    _pools_lock = threading.Lock()
    _stats_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def shutdown():
    """Stop this process's worker processes (they also exit on their own when it ends)."""
    with _pools_lock:
        pools = list(_pools.values())
    for p in pools:
        p.close()


atexit.register(shutdown)


def warmup(backend: str = "minirl"):
    """Start one worker now (import sympy / math-verify) so the first undecided
    comparison does not wait for it. Optional; never raises."""
    kind = "math_verify" if backend == "math_verify" else "sympy"
    if not _have("math_verify" if kind == "math_verify" else "sympy"):
        return
    try:
        p = _pool(kind)
        w, _ = p._acquire(time.monotonic() + STARTUP_TIMEOUT)
        p._release(w)
    except Exception:
        _count("errors")


# --------------------------------------------------------------------------- inside the worker

def _to_sympy(node, sp):
    tag = node[0]
    if tag == "num":
        p, q = node[1].split("/")
        return sp.Rational(int(p), int(q))
    if tag == "sym":
        return sp.Symbol(node[1])
    if tag == "const":
        return {"pi": sp.pi, "e": sp.E, "i": sp.I, "inf": sp.oo}[node[1]]
    if tag == "neg":
        return -_to_sympy(node[1], sp)
    if tag == "add":
        return sp.Add(*[(1 if s == 1 else -1) * _to_sympy(c, sp) for s, c in node[1]])
    if tag == "mul":
        return sp.Mul(*[_to_sympy(c, sp) if op == "*" else sp.Pow(_to_sympy(c, sp), -1) for op, c in node[1]])
    if tag == "pow":
        return sp.Pow(_to_sympy(node[1], sp), _to_sympy(node[2], sp))
    if tag == "root":
        return sp.root(_to_sympy(node[2], sp), _to_sympy(node[1], sp))
    if tag == "fn":
        f = {"ln": sp.log, "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan}.get(node[1])
        return (f or getattr(sp, node[1]))(_to_sympy(node[2], sp))
    if tag == "log":
        return sp.log(_to_sympy(node[2], sp), _to_sympy(node[1], sp))
    if tag == "pct":
        return _to_sympy(node[1], sp) / 100
    if tag == "fact":
        return sp.factorial(_to_sympy(node[1], sp))
    if tag == "binom":
        return sp.binomial(_to_sympy(node[1], sp), _to_sympy(node[2], sp))
    if tag == "abs":
        return sp.Abs(_to_sympy(node[1], sp))
    if tag == "floor":
        return sp.floor(_to_sympy(node[1], sp))
    if tag == "ceil":
        return sp.ceiling(_to_sympy(node[1], sp))
    raise ValueError(f"unknown node {tag}")


def _sympy_equal(a, b):
    import sympy as sp
    x, y = _to_sympy(a, sp), _to_sympy(b, sp)
    undefined = (sp.zoo, sp.nan, sp.oo, -sp.oo)
    if x.has(*undefined) or y.has(*undefined):   # 1/0 is not an answer (infinities never get here)
        return False
    diff = sp.simplify(x - y)
    if diff == 0:
        return True
    if diff.is_number and diff.is_zero is False:
        return False
    return bool(x.equals(y))


def _math_verify_grade(response, gold):
    from math_verify import parse, verify
    target = gold if ("\\boxed" in gold or "$" in gold) else "$" + gold + "$"
    gold_parsed = parse(target, parsing_timeout=None)
    pred_parsed = parse(response, parsing_timeout=None)
    ok = bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))
    answer = None
    if len(pred_parsed) > 1 and isinstance(pred_parsed[1], str):
        answer = pred_parsed[1]
    elif pred_parsed:
        answer = str(pred_parsed[0])
    return {"correct": ok, "answer": answer}


def _worker_main(kind):
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                 # stray prints from libraries must not corrupt the protocol
    importlib.import_module("sympy")   # imported before "ready": start-up is not billed to a call
    if kind == "math_verify":
        importlib.import_module("math_verify")
    proto.write("ready\n")
    proto.flush()
    while True:
        line = sys.stdin.readline()
        if not line:              # the parent closed the pipe (or died): exit
            return
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "sympy":
                out = {"equal": _sympy_equal(req["a"], req["b"])}
            elif op == "math_verify":
                out = _math_verify_grade(req["response"], req["gold"])
            elif op == "sleep":   # used by the tests to exercise the hard timeout
                time.sleep(float(req["seconds"]))
                out = {"slept": True}
            else:
                out = {"error": f"unknown op {op!r}"}
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}"[:500]}
        proto.write(json.dumps(out) + "\n")
        proto.flush()
