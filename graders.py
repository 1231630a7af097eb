"""Graders: is a completion right? Pure functions of text that know no task names; tasks.reward(name, completion,
example) picks the one a task uses and returns 1.0 or 0.0 (train.py's reward, eval.py's accuracy).

    last_integer(text)              -> the last integer in text (ASCII digits), or None          arith, arith_q, mul_q
    countdown_value(countdown_expr(text), numbers) -> the exact value of the expression, or None  countdown
    math_reward(text, answer, timeout) -> 1.0 if math-verify finds text's last \\boxed{} equal    math, math500
    mmlu_letter(text)               -> the answer letter A-D, or None                             mmlu_*
    last_boxed(text)                -> the content of the last \\boxed{...} (also reads MATH's gold answers)

Why no completion can harm or stall a run: a completion is model output, i.e. untrusted text, so it is only parsed,
never executed, and every parse is linear in its length (a megabyte of adversarial text grades in milliseconds).
  * No eval, no sympify on raw text. countdown: a character whitelist, then bounds (one int literal per given number,
    at most CD_MAX_CHARS = 1000 non-whitespace characters), then ast.parse (parsing runs nothing) and our own
    evaluation of the tree with Fractions (exact: 8 / (3 - 8/3) is 24, not 23.999...). math: math-verify's LaTeX
    extractor only (its plain-expression extractor calls sympy's parse_expr, which is eval).
  * Linear time: rfind and a brace-matching scan instead of lazy regexes that rescan from every unclosed tag; each
    whitespace run is squeezed before mmlu_letter's patterns, whose \\s* runs would otherwise try every split of it.
    Digits are [0-9]: \\d also matches "١٧", which int() reads as 17.
  * math-verify (sympy) in a child process: sympy can take forever on a short answer (9^{9^{9^9}}), inside C code that
    no signal interrupts, so the child is killed after `timeout` seconds and restarted, holds at most 4 GiB, and dies
    with its parent (a killed train.py leaves no orphan at 100% CPU). Verdicts are cached per (answer, prediction):
    a slow pair costs the timeout once. A gold answer that math-verify cannot parse, or not compare with 0 within the
    timeout, is matched as exact text instead. No \\boxed{} scores 0.

Rules per task (1.0 or 0.0):
  arith, arith_ood, arith_spaced, arith_q, mul_q  the last integer (-?[0-9]+) in the completion equals the answer.
  countdown  the expression (the last <answer>...</answer>, else the last non-empty line; "= target" after it is
             ignored) is + - * / and parentheses over int literals, uses each number exactly once and evaluates
             exactly to the target. Whitespace and line breaks in it are free.
  math, math500  math-verify finds the completion's last \\boxed{...} equal to the answer.
  mmlu_*     the letter from mmlu_letter(): \\boxed{B}, then "Answer: B", then a line that is just "B", then "(B)".
"""
import ast
import atexit
import json
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction

CD_MAX_CHARS = 1000  # non-whitespace characters of a countdown expression; a real one has ~20: "(12 + 3) * (30 - 4)"


def last_integer(text):
    """The last integer in text ("12+5=17", "The sum is 17."), or None (also one of over 50 digits)."""
    ints = re.findall(r"-?[0-9]+", text)  # [0-9], as \d also matches "١٧", which int() reads as 17
    return int(ints[-1]) if ints and len(ints[-1]) <= 50 else None


# ---------------------------------------------------------------------------------------------------------------------
# countdown: parsed with ast, evaluated here with Fractions
# ---------------------------------------------------------------------------------------------------------------------
def countdown_expr(completion):
    """The expression a countdown completion answers with: the last <answer>...</answer>, else its last non-empty line;
    the left side of "=", common Unicode operators as ASCII."""
    # the last <answer>...</answer> by rfind: "<answer>(.*?)</answer>" rescans the text from every unclosed tag
    end = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, max(end, 0))
    if start >= 0:
        expr = completion[start + len("<answer>"):end]
    else:  # the last non-empty line
        expr = next((line for line in reversed(completion.splitlines()) if line.strip()), "")
    expr = expr.split("=")[0]  # "(3 + 5) * 2 = 16": only the left side is graded
    return expr.replace("×", "*").replace("÷", "/").replace("−", "-").strip().rstrip(".").strip()


def countdown_value(expr, numbers):
    """Exact value (Fraction) of an arithmetic expression that uses each of `numbers` exactly once, else None.

    Allowed: int literals, + - * / and parentheses; no unary minus (a number must be used as given), no **, //, names
    or calls. The text is checked with a character whitelist, parsed with ast (parsing runs nothing) and the tree is
    evaluated here with Fractions, so the result is exact and nothing in the text is ever executed. Whitespace is
    free; at most CD_MAX_CHARS other characters.
    """
    if not expr or not re.fullmatch(r"[0-9\s+\-*/()]+", expr, flags=re.ASCII):  # ASCII: no "٣" or "３"
        return None
    # Bounds before ast sees it: one int literal per number keeps the tree at <= 2*len(numbers)-1 nodes (no 50k-deep
    # "1+1+...+1"), CD_MAX_CHARS bounds the parentheses (the parser itself rejects nesting deeper than 200).
    expr = " ".join(expr.split())  # a multi-line or padded answer is still one expression; "1 2" stays an error
    if len(expr.replace(" ", "")) > CD_MAX_CHARS or len(re.findall(r"[0-9]+", expr)) != len(numbers):
        return None
    try:
        tree = ast.parse(expr, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used, ops = [], {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__,
                     ast.Div: Fraction.__truediv__}

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("disallowed syntax")

    try:
        value = ev(tree)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None
    return value if sorted(used) == sorted(numbers) else None


# ---------------------------------------------------------------------------------------------------------------------
# math: the last \boxed{}, compared by math-verify in a child process
# ---------------------------------------------------------------------------------------------------------------------
def last_boxed(text):
    """Content of the last \\boxed{...} (or \\fbox{...}) in text with braces matched, or None (also if unclosed)."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    j = i
    while text[j:j + 1] == " ":
        j += 1
    if text[j:j + 1] != "{":  # "\boxed 5" (no braces): the token after the space, up to a space or $
        m = re.match(r"[^\s${}]+", text[j:]) if j > i else None
        return m.group(0) if m else None
    depth, i = 0, j
    while j < len(text):
        c = text[j]
        if c == "\\":  # \{ and \} are literal braces, not grouping
            j += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return text[i + 1:j].strip()
        j += 1
    return None


# math-verify runs in a child process that is killed after `timeout` seconds: sympy can take forever on a short
# adversarial answer (9^{9^{9^9}} is one C-level big-int power, (a+1)(b+1)...(z+1) expands to 2^25 terms), and
# math-verify's own timeouts use signal.alarm, which fails outside the main thread and cannot interrupt C code anyway.
# Inside the child: parse/verify with timeouts off (as recommended for threads), the LaTeX extractor only for model
# text (the plain-expression extractor calls sympy's parse_expr, i.e. eval), and a 4 GiB memory cap.
# The child dies with its parent (killed train.py: no orphan at 100% CPU): Linux's parent-death signal stops it even
# inside C code; elsewhere a CPU-time limit of the request's timeout (+2 s) does, and an idle child exits on stdin EOF.
CACHE_SIZE = 100_000  # remembered verdicts; the oldest is dropped first
_GRADER_CODE = r"""
import ctypes, json, logging, resource, sys, time
try:  # die with the parent: PR_SET_PDEATHSIG (1) = SIGKILL (9); Linux only, elsewhere the CPU limit below
    ctypes.CDLL(None).prctl(1, 9)
except (AttributeError, OSError):
    pass
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU dumps core by default: no core file in the cwd
logging.disable(logging.WARNING)
out, sys.stdout = sys.stdout, sys.stderr  # a stray print in a library must not be taken for a verdict
from math_verify import LatexExtractionConfig, parse, verify
golds, zero, cpu_hard = {}, parse("$0$"), resource.getrlimit(resource.RLIMIT_CPU)[1]
print("ready", file=out, flush=True)
for line in sys.stdin:
    gold, pred, timeout = json.loads(line)
    soft = int(time.process_time() + timeout) + 2  # SIGXCPU kills us after this much more CPU time
    resource.setrlimit(resource.RLIMIT_CPU, (soft if cpu_hard < 0 else min(soft, cpu_hard), cpu_hard))
    try:
        if gold not in golds:
            golds[gold] = parse("$" + gold + "$", parsing_timeout=None)
        if pred is None:  # a new gold: it must parse, and compare with a plain number in time
            ok = bool(golds[gold]) and verify(golds[gold], zero, timeout_seconds=None) in (True, False)
        else:
            got = parse("\\boxed{" + pred + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
            ok = bool(got) and verify(golds[gold], got, timeout_seconds=None)
    except Exception:
        ok = False
    print(int(bool(ok)), file=out, flush=True)
"""
_grader = {"proc": None}
_grader_lock = threading.Lock()
_cache = {}  # (gold, prediction) -> reward; (gold, None) -> whether math-verify handles the gold in time


def math_reward(completion, answer, timeout):
    """1.0 if math-verify finds the completion's last \\boxed{} equal to `answer`, else 0.0 (also after `timeout` s)."""
    pred, gold = last_boxed(completion), str(answer)
    if not pred or len(pred) > 1000:
        return 0.0
    with _grader_lock:  # one request at a time: callers may grade from several threads
        # The cache makes a slow answer cost the timeout once, not every time it is graded: a (gold, prediction)
        # pair, and a gold that math-verify cannot parse, or not compare with 0 in time (then graded by exact text).
        if (gold, None) not in _cache:
            _cache[gold, None] = _ask(gold, None, timeout) == 1.0
        if (gold, pred) not in _cache:
            _cache[gold, pred] = (_ask(gold, pred, timeout) if _cache[gold, None] else
                                  float("".join(pred.split()) == "".join(gold.split())))
        while len(_cache) > CACHE_SIZE:
            del _cache[next(iter(_cache))]  # dicts keep insertion order: the oldest entry
        return _cache[gold, pred]


def _ask(gold, pred, timeout):
    """The grader's verdict (1.0 or 0.0); 0.0 after `timeout` s, and the grader is restarted for the next call."""
    for _ in range(2):
        proc = _grader["proc"]
        if proc is None or proc.poll() is not None:
            _stop_grader()
            proc = _grader["proc"] = _start_grader()
        try:
            proc.stdin.write(json.dumps([gold, pred, timeout]) + "\n")
            proc.stdin.flush()
            verdict = _reply(proc, timeout)
        except OSError:  # it died before reading the request
            verdict = ""
        if verdict:
            return float(verdict.strip() == "1")
        _stop_grader()
        if verdict is None:  # too slow
            return 0.0
        # It died. The parent-death signal also fires when the *thread* that started the grader exits (prctl(2)), so
        # a grader started by a finished worker thread is gone: one more try with a fresh one (else out of memory).
    return 0.0


def _start_grader():
    proc = subprocess.Popen([sys.executable, "-c", _GRADER_CODE], text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if (_reply(proc, 120.0) or "").strip() != "ready":  # it imports sympy: a few seconds, more on a cold disk
        proc.kill()
        proc.communicate()
        raise RuntimeError("the math reward's grader process did not start (pip install math-verify?)")
    return proc


@atexit.register
def _stop_grader():
    proc, _grader["proc"] = _grader["proc"], None
    if proc is not None:
        proc.kill()
        proc.communicate()  # reaps it and closes the pipes


def _reply(proc, timeout):
    """One line from the grader: "" if it died (end of file), None if nothing came within timeout seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else None


# ---------------------------------------------------------------------------------------------------------------------
# mmlu: the answer letter
# ---------------------------------------------------------------------------------------------------------------------
def mmlu_letter(text):
    """The answer letter A-D of a multiple-choice completion, or None. Most explicit form wins, then the last one:
    \\boxed{B}, then "answer: B" / "answer is (B)", then a line that is only the letter, then "(B)"."""
    # Squeeze each whitespace run to one character (a newline if it holds one), keeping lines: the patterns' \s* runs
    # then cannot try the many splits of one long run (quadratic or worse: "answer" + 500 spaces took a minute).
    text = re.sub(r"\s*\n\s*", "\n", re.sub(r"[^\S\n]+", " ", text))
    for pattern in (r"\\boxed\{\s*(?:\\text(?:bf)?\{)?\s*\(?([A-D])\)?\s*\}",
                    r"(?i:answer)\s*(?:(?i:is)|:)?\s*:?\s*[*_]*\s*\(?([A-D])\b",
                    r"(?m)^\s*[*_]*\(?([A-D])\)?[*_]*[.:)]?\s*$",
                    r"\(([A-D])\)"):
        found = re.findall(pattern, text)
        if found:
            return found[-1]
    return None
