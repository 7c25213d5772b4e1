"""Synthetic tasks: deterministic generation, difficulty levels, a teacher that is always
right, a countdown verifier that cannot be fooled, and user reward functions."""
import re

import pytest

from minirl.common import MinirlError
from minirl.data import Problem
from minirl.tasks import (ARITHMETIC_LEVELS, COUNTDOWN_LEVELS, LEVELS, check_countdown, load_reward_fn,
                          make_problems, solve_countdown, teacher_solution, verify)


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_generation_is_deterministic_and_prefix_stable(task):
    a = make_problems(task, 40, seed=3)
    assert a == make_problems(task, 40, seed=3)
    assert make_problems(task, 15, seed=3) == a[:15]
    assert [p.question for p in make_problems(task, 40, seed=4)] != [p.question for p in a]
    assert len({p.id for p in a + make_problems(task, 40, seed=4)}) == 80


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_every_problem_carries_its_level(task):
    problems = make_problems(task, 60, seed=0, levels=[2, 5])
    assert [p.difficulty for p in problems] == [2, 5] * 30
    assert {p.difficulty for p in make_problems(task, 12, seed=0)} == set(LEVELS)
    assert all(p.difficulty == 4 for p in make_problems(task, 5, seed=0, levels=4))


def test_arithmetic_levels_and_answers():
    for p in make_problems("arithmetic", 600, seed=1):
        operands, digits, ops = ARITHMETIC_LEVELS[p.difficulty]
        expression = p.meta["expression"]
        assert p.question == expression + "=?"
        numbers = re.findall(r"\d+", expression)
        assert len(numbers) == operands and all(len(n) <= digits for n in numbers)
        assert set(re.findall(r"\D", expression)) <= set(ops)
        assert re.fullmatch(r"[0-9+*-]+", expression)
        assert int(p.answer) == eval(expression)      # test-only reference: digits and + - * only


def test_countdown_levels_and_targets():
    for p in make_problems("countdown", 600, seed=1):
        count, largest = COUNTDOWN_LEVELS[p.difficulty]
        numbers, target = p.meta["numbers"], p.meta["target"]
        assert len(numbers) == count and all(1 <= x <= largest for x in numbers)
        assert 1 <= target <= 999 and target not in numbers and p.answer == str(target)
        assert p.question == f"Use {' '.join(map(str, numbers))} to make {target}"


def test_teacher_format():
    p = Problem("a", "3+4*5=?", "23", 3, {"task": "arithmetic", "expression": "3+4*5"})
    assert teacher_solution(p) == "3+4*5 = 3+20 = 23. \\boxed{23}"
    p = Problem("b", "9-2*3-4=?", "-1", 3, {"task": "arithmetic", "expression": "9-2*3-4"})
    assert teacher_solution(p) == "9-2*3-4 = 9-6-4 = 3-4 = -1. \\boxed{-1}"
    p = Problem("c", "Use 3 5 7 to make 22", "22", 2, {"task": "countdown", "numbers": [3, 5, 7], "target": 22})
    text = teacher_solution(p)
    assert re.fullmatch(r"(\d+[-+*/]\d+ = \d+\. )+\\boxed\{[\d+*/()-]+\}", text), text
    assert verify(p, text) == 1.0


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_teacher_is_always_right(task):
    for seed in range(3):
        for p in make_problems(task, 300, seed=seed):
            text = teacher_solution(p)
            assert verify(p, text) == 1.0, (p, text)
            # character-simple: what a tiny character-level model learns from
            assert set(text) <= set("0123456789+-*/=() .\\boxed{}"), text


def test_arithmetic_verifier():
    p = make_problems("arithmetic", 1, seed=0, levels=3)[0]
    right = p.answer
    assert verify(p, f"so \\boxed{{{right}}}") == 1.0
    assert verify(p, f"\\boxed{{{int(right) + 1}}}") == 0.0
    assert verify(p, f"\\boxed{{{right}}} no wait \\boxed{{{int(right) + 1}}}") == 0.0   # the last box counts
    assert verify(p, f"{right}") == 0.0                                                 # no box
    assert verify(p, f"\\boxed{{{right}.5}}") == 0.0
    assert verify(p, "\\boxed{" + "9" * 5000 + "}") == 0.0


def _countdown(numbers, target):
    return Problem("t", f"Use {' '.join(map(str, numbers))} to make {target}", str(target), 1,
                   {"task": "countdown", "numbers": numbers, "target": target})


def test_countdown_verifier_accepts_right_expressions():
    p = _countdown([3, 5, 7], 22)
    for expr in ["5*3+7", "(5*3)+7", "7+3*5", "5 \\times 3 + 7", "5*3+7=22", "\\left(5\\cdot 3\\right)+7"]:
        assert verify(p, f"\\boxed{{{expr}}}") == 1.0, expr
    assert verify(_countdown([1, 3, 9], 3), "\\boxed{9*(1/3)}") == 1.0          # exact fractions
    assert verify(_countdown([8, 3, 6], 4), "\\boxed{8/(6/3)}") == 1.0
    assert verify(_countdown([4, 4, 2], 8), "\\boxed{4+4}") == 1.0             # not every number needed


@pytest.mark.parametrize("expr", [
    "5*5+7",                                   # 5 used twice
    "5*3+7+3",                                 # 3 used twice
    "5*3+8",                                   # 8 was not given
    "5*3+7-0",                                 # 0 was not given
    "5*3",                                     # wrong value
    "5/(3-3)+7",                               # division by zero
    "__import__('os').system('echo hi')",      # not arithmetic
    "5*3+7; import os",
    "22",                                      # the target itself is not a given number
    "5**3",
    "-5*-3+7",                                 # no unary minus
    "(" * 200 + "5*3+7" + ")" * 200,
    "",
])
def test_countdown_verifier_rejects(expr):
    p = _countdown([3, 5, 7], 22)
    assert verify(p, f"\\boxed{{{expr}}}") == 0.0
    assert check_countdown(expr, [3, 5, 7], 22) is False


def test_countdown_search():
    steps, expr = solve_countdown([2, 3, 4, 5], 26)
    assert check_countdown(expr, [2, 3, 4, 5], 26)
    assert solve_countdown([2, 2], 7) is None
    with pytest.raises(MinirlError, match="no way to make"):
        teacher_solution(_countdown([2, 2], 7))


def test_generic_problems_use_the_math_grader():
    p = Problem("m", "What is 1/2?", "\\frac12")
    assert verify(p, "The answer is $\\boxed{0.5}$") == 1.0
    assert verify(p, "\\boxed{0.6}") == 0.0


def test_task_errors():
    with pytest.raises(MinirlError, match="unknown task"):
        make_problems("chess", 3, seed=0)
    with pytest.raises(MinirlError, match="levels"):
        make_problems("arithmetic", 3, seed=0, levels=[0, 9])
    with pytest.raises(MinirlError, match="teacher"):
        teacher_solution(Problem("x", "q", "1"))


def test_load_reward_fn(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def length_bonus(response, problem):\n    return len(response) / 10\n"
                 "def bad(response, problem):\n    return 'high'\nVALUE = 3\n")
    reward = load_reward_fn(f"{f}:length_bonus")
    assert reward("12345", None) == 0.5
    with pytest.raises(MinirlError, match="expected a number"):
        load_reward_fn(f"{f}:bad")("x", None)
    with pytest.raises(MinirlError, match="no function 'nope'.*length_bonus"):
        load_reward_fn(f"{f}:nope")
    with pytest.raises(MinirlError, match="not callable"):
        load_reward_fn(f"{f}:VALUE")
    with pytest.raises(MinirlError, match="not found"):
        load_reward_fn(f"{tmp_path / 'missing.py'}:fn")
    with pytest.raises(MinirlError, match="path/to/file.py:function"):
        load_reward_fn(str(f))
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(MinirlError, match="importing .* failed"):
        load_reward_fn(f"{broken}:fn")


def test_countdown_a_number_used_twice_is_refused_even_when_the_value_is_right():
    # 5*5-3 = 22 from [3, 5, 7] uses 5 twice; the same expression is fine when 5 is given twice.
    assert check_countdown("5*5-3", [3, 5, 7], 22) is False
    assert verify(_countdown([3, 5, 7], 22), "\\boxed{5*5-3}") == 0.0
    assert check_countdown("5*5-3", [5, 3, 5], 22) is True
    assert check_countdown("(7-3)*(7-2)", [7, 3, 2], 20) is False
