"""Tests of graders.py, mostly through tasks.reward (as train.py and eval.py call them): each task's rule, exact
countdown arithmetic, adversarial text (0, fast, no side effect), the math grader's timeout and threads, \\boxed{},
letters, and that graders.py never evaluates text."""
import ast
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import pytest

import graders
import tasks
from tasks import load_task, reward

FIX = Path(__file__).parent / "fixtures"


# ----------------------------------------------------------------------------------------------------------- arith
@pytest.mark.parametrize("text,ok", [("81", 1.0), (" 81\n", 1.0), ("The sum is 81.", 1.0), ("40+41=81", 1.0),
                                     ("80", 0.0), ("81 or 82", 0.0), ("-81", 0.0), ("", 0.0), ("eighty-one", 0.0),
                                     ("8" * 5000, 0.0)])
def test_arith_reward(text, ok):
    assert reward("arith", text, {"question": "40+41=", "answer": "81"}) == ok


# ----------------------------------------------------------------------------------------------------------- countdown
CD = {"numbers": [3, 5, 2], "target": 16, "answer": "(3 + 5) * 2"}


@pytest.mark.parametrize("text,ok", [
    ("<answer>(3 + 5) * 2</answer>", 1.0),
    ("I think so.\n<answer> 2*(5+3) = 16 </answer>", 1.0),           # "= target" is ignored
    ("Let me try.\n(5 + 3) × 2", 1.0),                              # no tags: last line
    ("<answer>3 + 5 + 2</answer>", 0.0),                            # wrong value
    ("<answer>(3 + 5) * 2</answer> no wait <answer>3*5+2</answer>", 0.0),  # the last answer counts
    ("<answer>3*5+2</answer> no wait <answer>(3+5)*2</answer>", 1.0),
    ("<answer>(3 + 5) * 2 * 1</answer>", 0.0),                      # a number not given
    ("<answer>(3 + 5) * (2 + 3 - 3)</answer>", 0.0),                # reused numbers
    ("<answer>8 * 2</answer>", 0.0),                                # not every number used
    ("<answer>(3 + 5) ** 2 / 4</answer>", 0.0),                     # ** is not allowed
    ("<answer>(3 + 5) // 1 * 2</answer>", 0.0),                     # nor //
    ("<answer>-(3 - 5) * 2 * 4</answer>", 0.0),                     # nor unary minus
    ("<answer>16</answer>", 0.0), ("", 0.0), ("<answer></answer>", 0.0), ("<answer>(3 + 5 * 2</answer>", 0.0),
])
def test_countdown_reward(text, ok):
    assert reward("countdown", text, CD) == ok


def test_countdown_arithmetic_is_exact():
    ex = {"numbers": [8, 3, 8, 3], "target": 24}  # 8 / (3 - 8/3) = 24 exactly, 23.99999999999999 in floats
    assert reward("countdown", "<answer>8 / (3 - 8 / 3)</answer>", ex) == 1.0
    assert reward("countdown", "<answer>8 / (3 - 3 / 8)</answer>", ex) == 0.0
    assert reward("countdown", "<answer>8 / (3 - 3) + 8 + 3</answer>", ex) == 0.0  # division by zero


ADVERSARIAL = ["__import__('os').system('touch {p}')", "open('{p}', 'w').write('x')", "().__class__.__bases__[0]",
               "9**9**9**9", "9**9**9**9**9**9", "(" * 5000 + "1" + ")" * 5000, "1" * 100_000, "1+" * 50_000 + "1",
               "lambda: 0", "\x00", "{p}", "\\input{{p}}", "\\boxed{__import__('os').system('touch {p}')}"]


@pytest.mark.parametrize("name", ["arith", "countdown", "mmlu_college_physics"])
def test_adversarial_text_scores_zero_fast_without_side_effects(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ex = {"answer": "81", "numbers": [9, 9, 9, 9], "target": 24} if name != "mmlu_college_physics" else {"answer": "B"}
    for text in ADVERSARIAL:
        text = text.replace("{p}", str(tmp_path / "PWNED"))
        for completion in (text, f"<answer>{text}</answer>", f"\\boxed{{{text}}}"):
            t = time.time()
            assert reward(name, completion, ex) == 0.0
            assert time.time() - t < 1.0
    assert not (tmp_path / "PWNED").exists() and not list(tmp_path.iterdir())


def test_math_adversarial_answers_cannot_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "GRADE_TIMEOUT", 1.5)
    ex = {"answer": "2"}
    for text in ADVERSARIAL + ["9^{9^{9^{9}}}", "(a+1)(b+1)(c+1)(d+1)(f+1)(g+1)(h+1)(i+1)(j+1)(k+1)(m+1)(n+1)"
                               "(o+1)(p+1)(q+1)(r+1)(s+1)(t+1)(u+1)(v+1)(w+1)(x+1)(y+1)(z+1)"]:
        t = time.time()
        assert reward("math", "\\boxed{" + text.replace("{p}", str(tmp_path / "PWNED")) + "}", ex) == 0.0
        assert time.time() - t < 15.0, text  # the grader is killed after 1.5 s and restarted
    assert not (tmp_path / "PWNED").exists()
    assert reward("math", "\\boxed{2}", ex) == 1.0  # the grader recovers after being killed


# ----------------------------------------------------------------------------------------------------------- math
@pytest.mark.parametrize("text,expected", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"), ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"), ("\\boxed{\\}}", "\\}"),  # escaped braces are not grouping
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("$\\boxed 5$", "5"),
    ("\\fbox{7}", "7"), ("\\boxed{1} and \\boxed{2", None), ("no box", None), ("\\boxed", None), ("\\boxed{}", ""),
])
def test_last_boxed(text, expected):
    assert graders.last_boxed(text) == expected


@pytest.mark.parametrize("completion,answer,ok", [
    ("Hence $\\boxed{\\frac12}$.", "0.5", 1.0), ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.49}", "\\frac12", 0.0), ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{\\text{(E)}}", "\\text{(E)}", 1.0), ("\\boxed{E}", "\\text{(E)}", 1.0),
    ("\\boxed{(3,\\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0), ("\\boxed{3, 2}", "2, 3", 1.0),
    ("\\boxed{7} no, \\boxed{56}", "56", 1.0), ("\\boxed{56} no, \\boxed{7}", "56", 0.0),
    ("The answer is 56.", "56", 0.0), ("\\boxed{56", "56", 0.0), ("", "56", 0.0),
])
def test_math_reward(completion, answer, ok):
    assert reward("math", completion, {"answer": answer}) == ok
    assert reward("math500", completion, {"answer": answer}) == ok


def test_math_reward_from_worker_threads():
    exs = load_task("math500", "test", path=str(FIX / "math500.jsonl"))
    jobs = [(f"So the answer is $\\boxed{{{ex['answer']}}}$.", ex, 1.0) for ex in exs]
    jobs += [("\\boxed{12345}", ex, 0.0) for ex in exs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: reward("math500", job[0], job[1]), jobs * 2))
    assert got == [want for _, _, want in jobs * 2]

# ----------------------------------------------------------------------------------------------------------- mmlu
@pytest.mark.parametrize("text,letter", [
    ("Answer: B", "B"), ("The answer is (C).", "C"), ("\\boxed{D}", "D"), ("$\\boxed{\\text{A}}$", "A"), ("B", "B"),
    ("B.", "B"), ("**Answer:** C", "C"), ("(A) is tempting, but the answer is D", "D"),
    ("(A) is tempting, yet (C) fits", "C"), ("A. 3 m/s\nB. 4 m/s\nSo the answer: B", "B"), ("Answer: B\n\nC", "B"),
    ("\\boxed{C}\nAnswer: A", "C"), ("Because energy", None), ("\\boxed{Because}", None), ("", None),
    ("the answer is a vector", None), ("A. 1\nB. 2", None),
])
def test_mmlu_letter(text, letter):
    assert graders.mmlu_letter(text) == letter


# ----------------------------------------------------------------------------------------------------------- source
def test_graders_are_a_leaf_that_never_evaluates_text():
    """graders.py imports nothing of the project (tasks imports it, never the reverse), and no line of it, the math
    grader child's code included, calls eval, exec, compile or sympy's sympify / parse_expr."""
    tree = ast.parse(Path(graders.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported and not imported & {"tasks", "train", "eval", "policy", "tools"}
    calls = [n.func for code in (tree, ast.parse(graders._GRADER_CODE)) for n in ast.walk(code)
             if isinstance(n, ast.Call)]
    names = {getattr(f, "id", None) or getattr(f, "attr", None) for f in calls}
    assert {"parse", "verify", "fullmatch"} <= names           # the walk sees the calls (math-verify's in the child)
    assert not names & {"eval", "exec", "compile", "sympify", "parse_expr", "__import__"}
