"""Hardening of the graders (issue 10): correct answers are not rejected for their padding, non-ASCII digits do not
count, no input makes a grader super-linear, and the math grader's child process never outlives its parent.

The only timed assertions are hard wall-clock budgets for hang checks: a call must finish in < 1 s (the math task:
< GRADE_TIMEOUT + 2 s, its documented timeout). The inputs below took from 5 s to "never finished" before the fix."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

import graders
import tasks
from tasks import reward

CD = {"numbers": [3, 5, 2], "target": 16, "answer": "(3 + 5) * 2"}
EXAMPLES = {"arith": {"answer": "17"}, "countdown": CD, "math": {"answer": "2"},
            "mmlu_college_physics": {"answer": "B"}}
MB = 1_000_000
BATTERY = {  # name -> adversarial text; each is also tried inside <answer></answer> and inside \boxed{}
    "answer + 300 spaces": "answer" + " " * 300 + "x",          # mmlu: 9 s before
    "answer + 20k spaces": "answer" + " " * 20_000 + "x",       # mmlu: never finished
    "answer is + 20k spaces": "The answer is" + " \t" * 10_000 + ": **",
    "100k newlines": "\n" * 100_000,                             # mmlu: never finished
    "100k blank lines": " \n" * 100_000 + "B x",
    "boxed + 20k spaces": "\\boxed{" + " " * 20_000,           # mmlu: 5 s
    "boxed text + 20k spaces": "\\boxed{ \\text{" + " " * 20_000 + "(",
    "100k boxed": "\\boxed{" * 100_000,
    "100k answer tags": "<answer>" * 100_000,                   # countdown: never finished (20k: 18 s)
    "100k answer pairs": "<answer>(3 + 5) * 2</answer>" * 40_000,
    "10k-deep parentheses": "(" * 10_000 + "1" + ")" * 10_000,
    "1 MB of digits": "1" * MB,
    "1 MB of 1+": "1+" * (MB // 2) + "1",
    "1 MB of stars": "Answer:" + "*_" * (MB // 2) + "x",
    "1 MB of letter lines": "B" + " " * 1000 + "\n" * 1000 + "(" * (MB - 2001) + "C",
    "1 MB mixed": ("answer: (\n *_ B. \\boxed{ <answer> 1+ ( " * (MB // 40))[:MB],
    "1 MB unicode spaces": "answer" + "\u2003\u2028\u00a0" * (MB // 3) + "x",
}


def warm_grader():
    """Start the math grader outside the timed call: a timed-out grader is restarted by the next call."""
    if graders._grader["proc"] is None or graders._grader["proc"].poll() is not None:
        graders._stop_grader()
        graders._grader["proc"] = graders._start_grader()


@pytest.mark.parametrize("case", list(BATTERY))
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_adversarial_battery_is_fast(name, case, monkeypatch):
    monkeypatch.setattr(tasks, "GRADE_TIMEOUT", 2.0)
    budget = tasks.GRADE_TIMEOUT + 2.0 if name == "math" else 1.0
    text = BATTERY[case]
    for completion in (text, f"<answer>{text}</answer>", f"\\boxed{{{text}}}"):
        if name == "math":
            warm_grader()
        t = time.time()
        assert reward(name, completion, EXAMPLES[name]) in (0.0, 1.0)
        assert time.time() - t < budget, (name, case, completion[:40])


# ------------------------------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("text", [
    "<answer>(3 + 5)" + " " * 300 + "* 2</answer>",             # > 200 characters: rejected before
    "<answer>\n  (3 + 5)\n  * 2\n</answer>",                    # an expression over several lines
    "<answer>(3 + 5) * 2" + " " * MB + "</answer>",
    "Let me think.\n" + " " * 500 + "((((3)) + 5)) * ((2))",   # no tags: the last line, padded
])
def test_countdown_accepts_padded_correct_answers(text):
    t = time.time()
    assert reward("countdown", text, CD) == 1.0
    assert time.time() - t < 1.0


def test_countdown_expression_bound_and_deep_nesting():
    assert graders.countdown_value("(" * 150 + "3 + 5" + ")" * 150 + " * 2", [3, 5, 2]) == 16   # 305 chars: fine
    assert graders.countdown_value("(" * 600 + "3 + 5" + ")" * 600 + " * 2", [3, 5, 2]) is None  # > CD_MAX_CHARS
    assert graders.countdown_value("(" * 300 + "3 + 5" + ")" * 300 + " * 2", [3, 5, 2]) is None  # parser: > 200 deep
    assert graders.countdown_value("3 5 + 2", [3, 5, 2]) is None and graders.countdown_value("35 + 2", [35, 2]) == 37


@pytest.mark.parametrize("text", ["١٧", "１７", "The sum is ١٧."])   # Arabic-Indic and full-width digits
def test_non_ascii_digits_do_not_count(text):
    assert reward("arith", text, {"answer": "17"}) == 0.0
    assert reward("arith", text.replace("١٧", "17").replace("１７", "17"), {"answer": "17"}) == 1.0


def test_non_ascii_digits_in_countdown_and_mmlu():
    assert reward("countdown", "<answer>(３ + 5) * 2</answer>", CD) == 0.0
    assert reward("countdown", "<answer>(\u0663 + 5) * 2</answer>", CD) == 0.0
    assert graders.mmlu_letter("Answer: Ｂ") is None


# ------------------------------------------------------------------------------------------------------ math grader
def test_math_repeated_timeouts_cost_the_timeout_once(monkeypatch):
    """A (gold, prediction) pair that times out is remembered, and so is a gold that math-verify cannot compare with
    anything in time: its later predictions are graded by exact text, at once."""
    monkeypatch.setattr(tasks, "GRADE_TIMEOUT", 1.5)
    slow = "9^{9^{9^{9}}}"
    for completion, gold in ((f"\\boxed{{{slow}}}", "2"), ("\\boxed{5}", slow)):
        warm_grader()
        t = time.time()
        assert reward("math", completion, {"answer": gold}) == 0.0
        assert time.time() - t < tasks.GRADE_TIMEOUT + 2.0
        t = time.time()
        assert reward("math500", completion, {"answer": gold}) == 0.0   # the same pair again: instant
        assert time.time() - t < 0.5
    t = time.time()
    assert reward("math", "\\boxed{6}", {"answer": slow}) == 0.0      # the same slow gold, another prediction
    assert reward("math", f"\\boxed{{ {slow} }}", {"answer": slow}) == 1.0
    assert time.time() - t < 0.5
    assert reward("math", "\\boxed{2}", {"answer": "2"}) == 1.0       # correct answers still score


def test_math_grader_survives_its_starting_thread():
    """Linux's parent-death signal fires when the *thread* that started the grader exits: a later request must
    still be graded (the grader is restarted), not scored 0."""
    graders._stop_grader()
    th = threading.Thread(target=warm_grader)
    th.start()
    th.join(60)
    assert reward("math", "\\boxed{\\frac{1}{2}}", {"answer": "0.5"}) == 1.0
    assert reward("math", "\\boxed{0.25}", {"answer": "\\frac14"}) == 1.0


CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import graders
import tasks
tasks.GRADE_TIMEOUT = 600
graders._grader["proc"] = graders._start_grader()
print(graders._grader["proc"].pid, flush=True)
tasks.reward("math", "\\boxed{9^{9^{9^{9}}}}", {"answer": "2"})   # keeps math-verify busy in C code for minutes
"""


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"   # a zombie: dead, waiting to be reaped
    except OSError:
        return True


def child_after_parent_dies(script, sig, settle=0.0):
    """Run script (it prints its child's pid), kill it with sig -> (the child's pid, whether the child is gone within
    5 s). A child that outlived its parent is killed here, so a failing test leaves no orphan behind."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", script, root], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(parent.stdout.readline())
        time.sleep(settle)
        assert not gone(child)
        parent.send_signal(sig)
        parent.wait(10)
        deadline = time.time() + 5
        while not gone(child) and time.time() < deadline:
            time.sleep(0.1)
        return child, gone(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if child and not gone(child):  # the bug: clean up the orphan we caused
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_math_grader_dies_with_its_parent(sig):
    # settle: the request is in, so the grader is busy, not waiting on its stdin
    grader, ended = child_after_parent_dies(CHILD, sig, settle=1.0)
    assert ended, f"grader {grader} outlived its parent"


WORKER_PARENT = r"""
import subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import run_folder
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], preexec_fn=run_folder.die_with_parent)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_worker_processes_die_with_their_parent():
    """comedy.py's runs and bench.py's / gpu_check.py's measuring workers are started with run_folder.die_with_parent:
    killing the command (even with SIGKILL) ends them; before, a killed gpu_check.py left its 7B-wide worker running."""
    worker, ended = child_after_parent_dies(WORKER_PARENT, signal.SIGKILL)
    assert ended, f"worker {worker} outlived its parent"


def test_bench_and_gpu_check_workers_are_tied_to_their_parent(monkeypatch):
    from tools import bench
    from tools import gpu_check
    import run_folder
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(kwargs.get("preexec_fn"))
        tag = "BENCH " if "bench.py" in cmd[1] else "MEMORY "
        return subprocess.CompletedProcess(cmd, 0, stdout=tag + "{}\n", stderr="")
    monkeypatch.setattr(subprocess, "run", fake_run)
    bench.run_arm({"threads": 1, "arm": "x"})
    gpu_check.run_worker({"threads": 1, "folder": "x"})
    assert seen == [run_folder.die_with_parent] * 2


# ------------------------------------------------------------------------------------------------ data files (issue 17)
ROW = {"problem": "What is 1+1?", "answer": "2"}


def test_data_files_are_read_within_limits_and_without_a_cache_copy(tmp_path, monkeypatch):
    import datasets.config
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "MAX_LINE_BYTES", 1000, raising=False)
    monkeypatch.setattr(tasks, "MAX_DATA_BYTES", 20_000, raising=False)
    ok = tmp_path / "ok.jsonl"
    ok.write_text("".join(json.dumps({**ROW, "answer": str(i)}) + "\n\n" for i in range(10)))   # blank lines: skipped
    assert [ex["answer"] for ex in tasks.load_task("math", "test", path=str(ok))] == [str(i) for i in range(10)]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([ROW, ROW]))
    assert len(tasks.load_task("math", "test", path=str(as_list))) == 2
    assert not os.path.exists(tmp_path / "cache")                   # no Arrow copy of the file in the datasets cache
    long = tmp_path / "long.jsonl"                                 # a 5000-byte second row: 1000 bytes are read
    long.write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "problem": "x" * 5000}) + "\n")
    with pytest.raises(tasks.TaskError, match=r"long.jsonl line 2 is longer than 1,000 bytes"):
        tasks.load_task("math", "test", path=str(long))
    big = tmp_path / "big.jsonl"
    big.write_text((json.dumps(ROW) + "\n") * 1000)
    with pytest.raises(tasks.TaskError, match=r"holds 43,000 bytes, over the limit of 20,000"):
        tasks.load_task("math", "test", path=str(big))


@pytest.mark.parametrize("answer,says", [
    ("NaN", "row 1: field 'answer' is nan"), ("Infinity", "row 1: field 'answer' is inf"),
    ("-1e400", "row 1: field 'answer' is -inf"),
    ("12345678901234567890.0", "row 1: field 'answer' is 1.2345678901234567e+19"),   # a float that lost digits
    ("1" * 5000, "line 2: Exceeds the limit (4300 digits)"),
    ('["2"]', "row 1: field 'answer' must be a string"),
])
def test_gold_answers_that_cannot_be_right_are_refused_with_the_row(tmp_path, answer, says):
    path = tmp_path / "gold.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + '{"problem": "b", "answer": %s}\n' % answer)
    with pytest.raises(tasks.TaskError) as e:
        tasks.load_task("math", "test", path=str(path))
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_exact_gold_answers_are_kept_exactly(tmp_path):
    path = tmp_path / "gold.jsonl"
    path.write_text("".join(json.dumps({"problem": "p", "answer": a}) + "\n"
                            for a in (12345678901234567890, 0.5, -3, "\\frac13")))
    assert [ex["answer"] for ex in tasks.load_task("math", "test", path=str(path))] == \
        ["12345678901234567890", "0.5", "-3", "\\frac13"]                 # main: "1.2345678901234567e+19", ...
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "answer": 2.5}, {"problem": "q", "answer": float("nan")}]),
                   tmp_path / "gold.parquet")
    with pytest.raises(tasks.TaskError, match="row 1: field 'answer' is nan"):
        tasks.load_task("math", "test", path=str(tmp_path / "gold.parquet"))
