"""Synthetic tasks with exact difficulty levels, their verifiers and a teacher.

Two tasks, each with levels 1..6 (``LEVELS``):

- ``arithmetic``: an integer expression with + - * (question ``"3+4*5=?"``, answer
  ``"23"``). Levels grow the number of operands and digits:

      level        1    2    3    4    5    6
      operands     2    2    3    3    4    5
      digits       1    2    1    2    2    2
      operators   +-   +-  +-*  +-*  +-*  +-*

- ``countdown``: reach a target with some of the given numbers, each used at most once,
  and + - * / (question ``"Use 3 5 7 to make 22"``). Levels grow the count and size of
  the numbers (2 numbers up to 9 ... 5 numbers up to 50). Every target is built from
  the numbers during generation, so a solution always exists.

``make_problems(task, n, seed, levels)`` is deterministic: problem k depends only on
(task, seed, k), so a larger n extends a smaller one. Problem k has level
``levels[k % len(levels)]``; ``Problem.difficulty`` is that level. Its id encodes everything
that makes it what it is, ``"{task}-L{levels}-s{seed}-{k}"`` (``"arithmetic-L12-s7-0"`` for
levels [1, 2]), so two problem sets made with other levels or seeds never share an id.

``teacher_solution(problem)`` writes a short, regular, character-simple solution (for
distilling a character-level model): one rewrite step at a time, ending in the boxed
answer, e.g. ``"3+4*5 = 3+20 = 23. \\boxed{23}"`` and
``"5*3 = 15. 15+7 = 22. \\boxed{5*3+7}"`` (countdown steps are found by search).

``verify(problem, response)`` is 1.0 or 0.0 from the last ``\\boxed{}``: the integer for
arithmetic; for countdown a safe parse of the expression (a small recursive-descent
parser: integers, + - * /, parentheses; no ``eval``), each given number used at most
once, exact value (``Fraction``) equal to the target. Problems of other origins (no
``meta["task"]``) are graded with ``minirl.grader.grade`` against ``problem.answer``.

``load_reward_fn("path/file.py:function")`` loads a user reward ``(response, problem)
-> float``.
"""
import functools
import importlib.util
import os
import random
import re
from collections import Counter
from fractions import Fraction

from .common import MinirlError
from .data import Problem
from .grader import extract_answer, grade

TASKS = ("arithmetic", "countdown")
LEVELS = (1, 2, 3, 4, 5, 6)

# level -> (operands, digits, operators)
ARITHMETIC_LEVELS = {1: (2, 1, "+-"), 2: (2, 2, "+-"), 3: (3, 1, "+-*"), 4: (3, 2, "+-*"),
                     5: (4, 2, "+-*"), 6: (5, 2, "+-*")}
# level -> (how many numbers, largest number)
COUNTDOWN_LEVELS = {1: (2, 9), 2: (3, 9), 3: (3, 20), 4: (4, 20), 5: (4, 50), 6: (5, 50)}
_MAX_TARGET = 999


# --------------------------------------------------------------------------- generation

def make_problems(task: str, n: int, seed: int = 0, levels=None) -> list:
    """``n`` problems of ``task`` ("arithmetic" or "countdown") at the given levels (an
    int or a list; default all of LEVELS), deterministic in (task, seed)."""
    if task not in TASKS:
        raise MinirlError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if levels is None:
        levels = list(LEVELS)
    elif isinstance(levels, int):
        levels = [levels]
    levels = list(levels)
    bad = [lv for lv in levels if lv not in LEVELS]
    if not levels or bad:
        raise MinirlError(f"task levels must be among {list(LEVELS)}, got {levels}")
    if n < 0:
        raise MinirlError(f"number of problems must be >= 0, got {n}")
    make = _make_arithmetic if task == "arithmetic" else _make_countdown
    tag = "".join(str(lv) for lv in levels)  # levels are 1..6: one digit each, order kept
    problems = []
    for k in range(n):
        level = levels[k % len(levels)]
        # A string seed is hashed with SHA-512 by random.Random: the same in every process.
        rng = random.Random(f"{task}/{seed}/{k}")
        problems.append(make(rng, level, f"{task}-L{tag}-s{seed}-{k}"))
    return problems


def _make_arithmetic(rng, level, pid):
    operands, digits, ops = ARITHMETIC_LEVELS[level]
    numbers = [rng.randint(1, 10 ** digits - 1) for _ in range(operands)]
    operators = [rng.choice(ops) for _ in range(operands - 1)]
    tokens = [numbers[0]]
    for op, x in zip(operators, numbers[1:]):
        tokens += [op, x]
    expression = _render(tokens)
    value = _rewrite_steps(tokens)[-1][0]
    return Problem(id=pid, question=f"{expression}=?", answer=str(value), difficulty=level,
                   meta={"task": "arithmetic", "expression": expression})


def _make_countdown(rng, level, pid):
    count, largest = COUNTDOWN_LEVELS[level]
    for _ in range(1000):
        numbers = [rng.randint(1, largest) for _ in range(count)]
        used = rng.sample(numbers, rng.randint(max(2, count - 1), count))
        target = _random_combination(rng, used)
        if target is not None and 1 <= target <= _MAX_TARGET and target not in numbers:
            break
    else:                                      # practically unreachable; still a valid problem
        numbers, target = [1, 2], 3
    return Problem(id=pid, question=_countdown_question(numbers, target), answer=str(target),
                   difficulty=level, meta={"task": "countdown", "numbers": numbers, "target": target})


def _countdown_question(numbers, target):
    return f"Use {' '.join(map(str, numbers))} to make {target}"


def _random_combination(rng, values):
    """Combine the values pairwise with random operations that keep every intermediate
    a positive integer (the Countdown rules); the final value, or None."""
    values = list(values)
    while len(values) > 1:
        a = values.pop(rng.randrange(len(values)))
        b = values.pop(rng.randrange(len(values)))
        options = [a + b, a * b] + ([abs(a - b)] if a != b else []) + \
                  ([max(a, b) // min(a, b)] if max(a, b) % min(a, b) == 0 and min(a, b) > 1 else [])
        values.append(rng.choice(options))
    return values[0]


# --------------------------------------------------------------------------- arithmetic teacher

def _render(tokens):
    return "".join(str(t) for t in tokens)


def _rewrite_steps(tokens):
    """Evaluate one operation at a time: the leftmost * first (precedence), then the
    leftmost + or -. Returns the successive token lists, ending with [value]."""
    tokens = list(tokens)
    steps = []
    while len(tokens) > 1:
        i = tokens.index("*") if "*" in tokens else 1
        a, op, b = tokens[i - 1], tokens[i], tokens[i + 1]
        value = a * b if op == "*" else a + b if op == "+" else a - b
        tokens[i - 1:i + 2] = [value]
        steps.append(list(tokens))
    return steps


def _parse_arithmetic(expression):
    tokens = []
    for m in re.finditer(r"\d+|[-+*]", expression):
        t = m.group()
        tokens.append(int(t) if t.isdigit() else t)
    return tokens


def teacher_solution(problem) -> str:
    """A correct step-by-step solution ending in ``\\boxed{answer}`` (see module doc)."""
    task = problem.meta.get("task")
    if task == "arithmetic":
        tokens = _parse_arithmetic(problem.meta["expression"])
        chain = [problem.meta["expression"]] + [_render(t) for t in _rewrite_steps(tokens)]
        return f"{' = '.join(chain)}. \\boxed{{{chain[-1]}}}"
    if task == "countdown":
        numbers, target = _countdown_numbers(problem)
        found = solve_countdown(numbers, target)
        if found is None:
            raise MinirlError(f"problem {problem.id}: no way to make {target} from {numbers}")
        steps, expression = found
        lines = [f"{a}{op}{b} = {c}." for a, op, b, c in steps]
        return " ".join(lines + [f"\\boxed{{{expression}}}"])
    raise MinirlError(f"problem {problem.id}: the teacher knows the tasks {', '.join(TASKS)}, "
                      f"not meta task {task!r}")


# --------------------------------------------------------------------------- countdown search

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _expr(node):
    """Expression text of a search tree with only the parentheses precedence needs."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    a, b = _expr(left), _expr(right)
    if not isinstance(left, int) and _PREC[left[0]] < _PREC[op]:
        a = f"({a})"
    if not isinstance(right, int) and (_PREC[right[0]] < _PREC[op]
                                      or (_PREC[right[0]] == _PREC[op] and op in "-/")):
        b = f"({b})"
    return a + op + b


def solve_countdown(numbers, target):
    """Depth-first search over pairs of the remaining values (positive integer results,
    exact division), visiting each multiset of values once. Returns (steps, expression)
    with steps [(a, op, b, result), ...], or None when no solution exists."""
    if target in numbers:
        return [], str(target)
    seen = set()

    def search(items, steps):
        key = tuple(sorted(v for v, _ in items))
        if key in seen:
            return None
        seen.add(key)
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                (a, ta), (b, tb) = items[i], items[j]
                candidates = [("+", a + b), ("*", a * b)] if i < j else []   # commutative: once
                if a > b:
                    candidates.append(("-", a - b))
                if b > 1 and a % b == 0:
                    candidates.append(("/", a // b))
                for op, value in candidates:
                    node = (op, ta, tb)
                    step = steps + [(a, op, b, value)]
                    if value == target:
                        return step, _expr(node)
                    rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                    if rest:
                        found = search(rest + [(value, node)], step)
                        if found:
                            return found
        return None

    return search([(v, v) for v in numbers], [])


def _countdown_numbers(problem):
    meta = problem.meta
    if "numbers" in meta and "target" in meta:
        return [int(x) for x in meta["numbers"]], int(meta["target"])
    m = re.fullmatch(r"Use ([\d ]+) to make (\d+)", problem.question.strip())
    if not m:
        raise MinirlError(f"problem {problem.id}: countdown problem without numbers / target")
    return [int(x) for x in m.group(1).split()], int(m.group(2))


# --------------------------------------------------------------------------- verification

class _ExprError(Exception):
    pass


class _CountdownParser:
    """expr := term (('+'|'-') term)*; term := atom (('*'|'/') atom)*;
    atom := integer | '(' expr ')'. Nothing else is accepted (no names, no calls)."""

    def __init__(self, text):
        self.tokens = re.findall(r"\d+|[-+*/()]|\S", text)
        self.i, self.depth, self.numbers = 0, 0, []

    def parse(self):
        value = self.expr()
        if self.i != len(self.tokens):
            raise _ExprError("trailing input")
        return value

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def expr(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.tokens[self.i]
            self.i += 1
            right = self.term()
            value = value + right if op == "+" else value - right
        return value

    def term(self):
        value = self.atom()
        while self.peek() in ("*", "/"):
            op = self.tokens[self.i]
            self.i += 1
            right = self.atom()
            if op == "/" and right == 0:
                raise _ExprError("division by zero")
            value = value * right if op == "*" else value / right
        return value

    def atom(self):
        t = self.peek()
        if t is None:
            raise _ExprError("unexpected end")
        self.i += 1
        if t.isdigit():
            if len(t) > 6:
                raise _ExprError("number too long")
            self.numbers.append(int(t))
            return Fraction(int(t))
        if t == "(":
            self.depth += 1
            if self.depth > 30:
                raise _ExprError("too deep")
            value = self.expr()
            if self.peek() != ")":
                raise _ExprError("missing )")
            self.i += 1
            self.depth -= 1
            return value
        raise _ExprError(f"unexpected {t!r}")


def check_countdown(expression, numbers, target) -> bool:
    """True when ``expression`` uses each of ``numbers`` at most once and equals
    ``target`` exactly. Never evaluates Python; never raises."""
    if not isinstance(expression, str) or len(expression) > 200:
        return False
    text = (expression.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/")
            .replace("\u00d7", "*").replace("\u00f7", "/").replace("\\left", "").replace("\\right", ""))
    if "=" in text:                            # "5*3+7=22": the left side is the expression
        text = text.split("=", 1)[0]
    parser = _CountdownParser(text)
    try:
        value = parser.parse()
    except (_ExprError, ZeroDivisionError, RecursionError):
        return False
    if Counter(parser.numbers) - Counter(numbers):   # a number not given, or used twice
        return False
    return value == target


def verify(problem, response) -> float:
    """1.0 when the last ``\\boxed{}`` of ``response`` solves ``problem``, else 0.0."""
    task = problem.meta.get("task") if isinstance(problem.meta, dict) else None
    if task == "arithmetic":
        answer = extract_answer(response)
        if answer is None:
            return 0.0
        answer = answer.replace(" ", "")
        return 1.0 if re.fullmatch(r"[-+]?\d{1,30}", answer) and int(answer) == int(problem.answer) else 0.0
    if task == "countdown":
        answer = extract_answer(response)
        if answer is None:
            return 0.0
        numbers, target = _countdown_numbers(problem)
        return 1.0 if check_countdown(answer, numbers, target) else 0.0
    return 1.0 if grade(response, problem.answer).correct else 0.0


# --------------------------------------------------------------------------- custom rewards

def load_reward_fn(spec: str):
    """Load ``function`` from ``path/file.py`` given as "path/file.py:function". The
    function is called as ``fn(response, problem)`` and must return a number; the
    returned wrapper converts it to float and names the function when it does not."""
    if not isinstance(spec, str) or ":" not in spec:
        raise MinirlError(f"--reward must look like path/to/file.py:function, got {spec!r}")
    path, name = spec.rsplit(":", 1)
    if not os.path.isfile(path):
        raise MinirlError(f"--reward {spec}: file {path!r} not found")
    if not name.isidentifier():
        raise MinirlError(f"--reward {spec}: {name!r} is not a function name")
    module_name = "minirl_user_reward_" + re.sub(r"\W", "_", os.path.abspath(path))
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise MinirlError(f"--reward {spec}: cannot load {path!r} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise MinirlError(f"--reward {spec}: importing {path} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise MinirlError(f"--reward {spec}: {path} has no function {name!r} (it has: {', '.join(public) or 'none'})")
    if not callable(fn):
        raise MinirlError(f"--reward {spec}: {name!r} in {path} is not callable")

    @functools.wraps(fn)
    def reward(response, problem):
        value = fn(response, problem)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise MinirlError(f"--reward {spec}: returned {value!r:.60}, expected a number") from None

    return reward
