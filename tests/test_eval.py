"""Tests for eval.py: the statistics against oracles, then the model path on the tiny model (offline, CPU)."""
import itertools
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 0, 3), (5, 2, 1), (5, 2, 3), (5, 2, 4), (6, 3, 2),
                                   (8, 1, 8), (8, 5, 3), (10, 3, 5), (12, 7, 6), (12, 12, 4)])
def test_pass_at_k_matches_enumeration(n, c, k):
    """Oracle: the fraction of all k-subsets of the n samples (the first c correct) containing a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(i < c for i in s) for s in subsets) / len(subsets)
    assert ev.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    n, c, k = 200, 30, 100           # C(200, 100) ~ 9e58: the naive float ratio loses precision or overflows
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)   # python ints: exact
    assert ev.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert ev.pass_at_k(n, 1, 1) == pytest.approx(1 / n)


def _records(correct_greedy, correct_samples, length=3):
    return [{"id": i, "index": i, "question": f"q{i}", "answer": "0",
             "greedy": {"correct": bool(g), "length": length, "truncated": False, "text": ""},
             "samples": {"correct": [bool(x) for x in s], "length": [length] * len(s), "truncated": [False] * len(s)}}
            for i, (g, s) in enumerate(zip(correct_greedy, correct_samples))]


def test_per_problem_means():
    recs = _records([1, 0, 1, 1], [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    cols = ev.per_problem([ev.compact(r) for r in recs])
    assert cols["greedy acc"].mean() == 0.75
    assert cols["pass@1"].mean() == pytest.approx((0.25 + 0 + 1 + 0.5) / 4)     # = mean sample accuracy
    assert cols["pass@4"].mean() == 0.75                                          # any of the 4 correct
    assert set(cols) == {"greedy acc", "pass@1", "pass@2", "pass@3", "pass@4", "greedy len", "greedy trunc",
                         "sample len", "sample trunc"}


def test_bootstrap_ci_coverage():
    """200 simulated Bernoulli data sets of 100 problems: the 95% CI should cover the true mean ~95% of the time."""
    rng, p, covered = np.random.default_rng(0), 0.3, 0
    for d in range(200):
        s = ev.summarize({"acc": rng.binomial(1, p, 100).astype(float)}, 1000, seed=d)["acc"]
        covered += s["lo"] <= p <= s["hi"]
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_bootstrap_is_seeded():
    x = {"acc": np.random.default_rng(1).binomial(1, 0.5, 50).astype(float)}
    assert ev.summarize(x, 500, seed=3) == ev.summarize(x, 500, seed=3)


def test_bootstrap_in_chunks_draws_the_same_replicates(monkeypatch):
    """Resampling BOOT_CHUNK counts at a time (memory bounded) gives the CIs of resampling all at once (to rounding
    in the matrix product): the chunks continue one random stream, 7 replicates each here."""
    x = {m: np.random.default_rng(i).random(1001) for i, m in enumerate(("a", "b"))}
    whole = ev.summarize(x, 1000, seed=3)
    monkeypatch.setattr(ev, "BOOT_CHUNK", 7 * 1001)
    chunked = ev.summarize(x, 1000, seed=3)
    assert all(chunked[m][s] == pytest.approx(whole[m][s], rel=1e-12) for m in x for s in ("mean", "lo", "hi"))


def test_paired_bootstrap_detects_real_difference_not_null():
    """Problems with heterogeneous difficulty; B improves 8 points: the paired CI of B - A excludes 0 nearly always.
    Under the null (B an independent re-run of A) it excludes 0 only about 5% of the time."""
    rng, P = np.random.default_rng(0), 300
    hits_real = hits_null = 0
    for d in range(100):
        q = rng.beta(0.5, 0.5, P)                                       # per-problem solve rate
        a = rng.random(P) < q
        better = a | (rng.random(P) < 0.16)                             # fixes ~8% of all problems
        null = rng.random(P) < q
        real = ev.summarize({"d": better.astype(float) - a}, 1000, seed=d)["d"]
        zero = ev.summarize({"d": null.astype(float) - a}, 1000, seed=d)["d"]
        hits_real += real["lo"] > 0
        hits_null += zero["lo"] > 0 or zero["hi"] < 0
    assert hits_real >= 95 and hits_null <= 12, (hits_real, hits_null)


# ---------------------------------------------------------------------------------------------------------
# Tables and --compare on synthetic result files (no model needed)
# ---------------------------------------------------------------------------------------------------------
def _result(path, greedy, samples, model="m", adapter=None, task="arith"):
    res = {"config": {"model": model, "adapter": adapter, "samples": len(samples[0]), "temperature": 1.0},
           "tasks": {task: {"problems": _records(greedy, samples)}}}
    with open(path, "w") as f:
        json.dump(res, f)
    return str(path)


def test_compare_synthetic(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = rng.random(200) < 0.3
    b = a | (rng.random(200) < 0.5)
    fa = _result(tmp_path / "a.json", a, [[x] * 4 for x in a], model="a")
    run = tmp_path / "runs" / "better"
    (run / "checkpoint").mkdir(parents=True)
    _result(run / "eval-arith.json", b, [[x] * 4 for x in b], adapter=str(run / "checkpoint"))
    ev.main(["--compare", fa, str(run)])                                 # a run folder -> its latest eval json
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "| greedy acc |" in line)
    assert row.rstrip(" |").endswith("*"), out                           # the real difference is flagged
    assert "pass@4" in out and "pass@3" not in out                       # powers of two and n in the table


@pytest.mark.parametrize("breakage", ["no tasks' problems", "no config", "greedy missing", "samples unequal",
                                      "length a string", "problems empty", "not a dict", "adapter a number"])
def test_compare_refuses_malformed_result_files_with_one_line(tmp_path, capsys, breakage):
    good = _result(tmp_path / "a.json", [True, False], [[True, False], [False, False]], model="a")
    res = json.load(open(good))
    probs = res["tasks"]["arith"]["problems"]
    {"no tasks' problems": lambda: res["tasks"].update(arith={}), "no config": lambda: res.pop("config"),
     "greedy missing": lambda: probs[1].pop("greedy"),
     "samples unequal": lambda: probs[1]["samples"]["correct"].append(True),
     "length a string": lambda: probs[0]["greedy"].update(length="3"),
     "problems empty": lambda: res["tasks"]["arith"].update(problems=[]),
     "not a dict": lambda: probs.append(7), "adapter a number": lambda: res["config"].update(adapter=5)}[breakage]()
    json.dump(res, open(tmp_path / "b.json", "w"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ev.main(["--compare", good, str(tmp_path / "b.json")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "b.json is not an eval.py result file" in err, err


def test_table_letter_columns_legend_and_footnote(tmp_path, capsys):
    """Short column headers (A, B, B − A), a legend naming each, and one line saying what * means."""
    rng = np.random.default_rng(0)
    a = rng.random(100) < 0.3
    run = tmp_path / "runs" / "20250101-000000-arith-k1-in-reward-with-a-long-name"
    (run / "checkpoint").mkdir(parents=True)
    fa = _result(tmp_path / "a.json", a, [[x] * 4 for x in a], model="base")
    _result(run / "eval-arith.json", a, [[x] * 4 for x in a], adapter=str(run / "checkpoint"))
    ev.main(["--compare", fa, str(run), "--bootstrap", "200"])
    lines = capsys.readouterr().out.splitlines()
    assert "| metric | A | B | B − A |" in lines, lines
    assert any(line.startswith(f"- A = base: {fa}") for line in lines), lines
    assert any(line.startswith(f"- B = {run.name}: ") for line in lines), lines
    star = [line for line in lines if line.startswith("* = ")]
    assert len(star) == 1 and "excludes 0" in star[0] and f">= {ev.MIN_DIFF}" in star[0], lines


def test_star_needs_a_difference_that_matters(tmp_path, capsys):
    """B fixes 10 of 2,000 problems (+0.005): the paired CI excludes 0, but the difference is below MIN_DIFF (0.01),
    so no *. Fixing 100 (+0.05) gets one."""
    a = np.zeros(2000, bool)
    rows = {}
    for fixed in (10, 100):
        b = a.copy()
        b[:fixed] = True
        fa = _result(tmp_path / "a.json", a, [[x] * 2 for x in a])
        fb = _result(tmp_path / f"b{fixed}.json", b, [[x] * 2 for x in b])
        ev.main(["--compare", fa, fb, "--bootstrap", "200"])
        rows[fixed] = next(line for line in capsys.readouterr().out.splitlines() if "| greedy acc |" in line)
    small = rows[10].split("|")[-2].strip()
    assert small.startswith("+0.005 [+0.00") and not small.endswith("*"), rows[10]   # CI lo > 0, yet no *
    assert rows[100].rstrip(" |").endswith("*"), rows[100]


def test_note_when_every_model_scores_zero(tmp_path, capsys):
    zero = [0] * 50
    fa = _result(tmp_path / "a.json", zero, [[0] * 4] * 50, task="arith_ood")
    fb = _result(tmp_path / "b.json", zero, [[0] * 4] * 50, task="arith_ood")
    ev.main(["--compare", fa, fb, "--bootstrap", "200"])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Note: ")]
    assert notes == ["Note: arith_ood: A and B both score 0.000 on greedy acc and every pass@k -- the task is out of "
                     "reach for these models (its differences mean nothing)."], notes
    fc = _result(tmp_path / "c.json", zero, [[0] * 4] * 49 + [[0, 0, 0, 1]], task="arith_ood")   # one sample right
    ev.main(["--compare", fa, fc, "--bootstrap", "200"])
    assert "Note: " not in capsys.readouterr().out


def test_default_samples_match_the_readme():
    """The README's tables use n = 8 samples at T = 1; so do `python eval.py` and its demo."""
    args = ev.parse_args([])
    assert args.samples == 8 and args.temperature == 1.0
    assert ev.DEMO[ev.DEMO.index("--samples") + 1] == "8"


def test_compare_of_a_large_result_costs_about_its_size(tmp_path):
    """Issue 26: a 40 MB result took 5.2 GB (the bootstrap built 1000 × problems counts at once, 80 MB each per 10k
    problems, and every greedy text stayed loaded). Here 10k problems, ~6 MB: reading keeps about its size (it was
    4.4 times), the paired table peaks under 64 MB (it was over 240 MB), measured by tracemalloc."""
    import tracemalloc
    rng = np.random.default_rng(0)
    recs = _records(rng.random(10_000) < 0.5, rng.random((10_000, 8)) < 0.4)
    for r in recs:
        r["greedy"]["text"] = "x" * 300                                # a greedy completion: dropped once parsed
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"config": {"model": "m", "samples": 8}, "tasks": {"arith": {"problems": recs}}}))
    size = path.stat().st_size
    del recs
    tracemalloc.start()
    try:
        res = ev.load_result(str(path))
        read_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        text = ev.table([res, res])
        table_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size > 5e6 and read_peak < 2.5 * size and table_peak < 64 << 20, (size, read_peak, table_peak)
    assert "### arith (10000 problems)" in text and "+0.000 [+0.000, +0.000]" in text


@pytest.mark.parametrize("argv,says", [(["--bootstrap", str(10**12)], "--bootstrap must be from 1 to 100000"),
                                       (["/dev/zero"], "/dev/zero is not a regular file")])   # was read forever
def test_compare_refuses_unbounded_work_with_one_line(tmp_path, capsys, argv, says):
    fa = _result(tmp_path / "a.json", [1, 0], [[1], [0]])
    flags = argv if argv[0].startswith("--") else []
    with pytest.raises(SystemExit) as e:
        ev.main(["--compare", fa, *[a for a in argv if a not in flags], *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err, err


def test_compare_refuses_a_result_file_over_the_cap_before_parsing_it(tmp_path, capsys, monkeypatch):
    """--compare parses a result whole (~6x its size in memory): a file over RESULT_LIMIT (1 GiB) is refused with one
    line before it is read; here the cap is lowered to 1 KiB and the second file padded past it."""
    fa = _result(tmp_path / "a.json", [1, 0], [[1], [0]])
    big = tmp_path / "big.json"
    big.write_text(open(fa).read() + " " * 2048)              # a valid result, only larger
    monkeypatch.setattr(ev, "RESULT_LIMIT", 1024)
    assert os.path.getsize(fa) < 1024 and "is over 0 MiB: not an eval.py result" in _error(["--compare", fa, str(big)],
                                                                                             capsys)


def test_compare_rejects_different_problem_sets(tmp_path, capsys):
    fa = _result(tmp_path / "a.json", [1, 0, 1], [[1], [0], [1]])
    fb = _result(tmp_path / "b.json", [1, 0], [[1], [0]])
    res = json.load(open(fa))
    probs = res["tasks"]["arith"]["problems"]
    probs[2] = probs[1]                                   # the same 3 problems twice over: [0, 1, 1] vs [0, 1, 2]
    json.dump(res, open(tmp_path / "twice.json", "w"))
    for pair in ([fa, fb], [fa, str(tmp_path / "twice.json")], [str(tmp_path / "twice.json"), fa]):
        with pytest.raises(SystemExit) as e:
            ev.main(["--compare", *pair])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "different problem set" in err, (pair, err)


# ---------------------------------------------------------------------------------------------------------
# The model path: tiny model (the shipped one, else a random tiny Llama), zero-initialised LoRA, subprocesses
# ---------------------------------------------------------------------------------------------------------
FAST = ["--tasks", "arith", "--samples", "2", "--limit", "24", "--max-new-tokens", "6", "--batch-size", "12",
        "--bootstrap", "200"]


def evaluate(argv):
    return ev.run_eval(ev.resolve(ev.parse_args(argv)))


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    """A run folder as train.py writes it, whose adapter is peft's fresh LoRA (B = 0): base + adapter == base."""
    from policy import load_policy
    d = tmp_path_factory.mktemp("eval")
    model = ev.TINY
    if not os.path.isdir(model):
        from tools import tiny_model
        model = tiny_model.build_random_model(str(d / "tiny"))
    peft_model, _ = load_policy(model)
    run = d / "runs" / "zero"
    peft_model.save_pretrained(str(run / "checkpoint"))
    (run / "config.json").write_text(json.dumps({"model": model}))
    return model, run


def test_zero_adapter_equals_base_and_json_round_trip(zero_run, tmp_path, capsys):
    model, run = zero_run
    base = evaluate(FAST + ["--model", model, "--out", str(tmp_path / "base.json")])
    tuned = evaluate(FAST + ["--adapter", str(run)])                       # --model read from the run
    assert tuned["path"] == os.path.join(str(run), "eval-arith.json")
    assert tuned["config"]["model"] == os.path.relpath(model, ROOT) == "assets/tiny-arith"   # no machine's path in it
    b, t = base["tasks"]["arith"]["problems"], tuned["tasks"]["arith"]["problems"]
    assert [p["greedy"] for p in b] == [p["greedy"] for p in t]            # same texts, flags, lengths
    assert [p["samples"] for p in b] == [p["samples"] for p in t]          # same seeds -> same samples
    saved = json.load(open(tuned["path"]))
    assert {"config", "versions", "seed", "git_sha", "tasks"} <= set(saved) and len(b) == 24
    assert saved["tasks"]["arith"]["metrics"]["pass@2"]["lo"] <= saved["tasks"]["arith"]["metrics"]["pass@2"]["hi"]
    capsys.readouterr()
    ev.main(["--compare", str(tmp_path / "base.json"), str(run), "--bootstrap", "200"])
    row = next(line for line in capsys.readouterr().out.splitlines() if "| greedy acc |" in line)
    assert row.split("|")[-2].strip() == "+0.000 [+0.000, +0.000]", row     # paired diff exactly 0, not flagged


def _error(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert e.value.code == 2 and len(errors) == 1, errors
    return errors[0]


def test_bad_inputs_exit_2_with_one_line(zero_run, tmp_path, capsys):
    model, run = zero_run
    assert "unknown task 'nope'" in _error(["--tasks", "nope"], capsys)
    assert "no peft adapter" in _error(["--adapter", str(tmp_path / "missing")], capsys)
    assert "invalid int" in _error(["--samples", "two"], capsys)                       # argparse
    other = tmp_path / "other"                                                          # adapter of another base
    (other / "checkpoint").mkdir(parents=True)
    cfg = json.loads((run / "checkpoint" / "adapter_config.json").read_text())
    (other / "checkpoint" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "x/y"}))
    assert "trained on base model 'x/y'" in _error(["--adapter", str(other), "--model", model], capsys)
    from tools import tiny_model                                                                # same name, other shapes
    from policy import load_policy
    wide, _ = load_policy(tiny_model.build_random_model(str(tmp_path / "wide"), hidden_size=64))
    wide.save_pretrained(str(tmp_path / "wide-lora"))
    cfg_path = tmp_path / "wide-lora" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "base_model_name_or_path": model}))
    assert "size mismatch" in _error(FAST + ["--adapter", str(tmp_path / "wide-lora")], capsys)


@pytest.mark.parametrize("change,says", [
    ({"r": 10**9}, "r = 1000000000;"),                         # peft would allocate 10^9 × d floats per layer
    ({"r": 1e9}, "r = 1000000000.0;"), ({"r": 0}, "r = 0;"),
    ({"rank_pattern": {"q_proj": 10**9}}, "rank_pattern['q_proj'] = 1000000000;"),
    ({"lora_alpha": "big"}, "lora_alpha = 'big'"), ({"peft_type": "IA3"}, "not a LoRA adapter"),
])
def test_adapter_config_is_checked_before_anything_is_allocated(zero_run, tmp_path, capsys, change, says):
    model, run = zero_run
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((run / "checkpoint" / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    line = _error(FAST + ["--adapter", str(bad)], capsys)
    assert says in line, line
    if "r" in change:                                          # the bound: the smallest adapted layer, named
        from run_folder import max_lora_rank
        assert f"from 1 to {max_lora_rank(model)} " in line


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_malformed_adapter_config_is_one_line(zero_run, tmp_path, capsys, text):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(text)
    assert "not a JSON object" in _error(FAST + ["--adapter", str(tmp_path / "a")], capsys)


def test_cli_no_arguments_offline_demo(zero_run, tmp_path):
    """`python eval.py` from a folder whose runs/ holds the zero-adapter run: both evaluated, compared, < 60 s."""
    model, run = zero_run
    if model != ev.TINY:
        pytest.skip("assets/tiny-arith not built yet")
    os.symlink(run.parent, tmp_path / "runs")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "### arith_ood (500 problems)" in p.stdout and "| metric | A | B | B − A |" in p.stdout, p.stdout
    assert "- A = tiny-arith: " in p.stdout and "- B = zero: " in p.stdout, p.stdout
    assert "Note: arith_ood: A and B both score 0.000" in p.stdout, p.stdout      # the tiny model cannot add 3 digits
    assert os.path.isfile(tmp_path / "eval-results" / "tiny-arith-arith+arith_spaced+arith_ood.json")


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_result(tmp_path):
    """Issue 26: Ctrl-C mid-generation (a real SIGINT, once the progress line shows it generating) ends eval.py with
    one line and exit 130 (it was a traceback), and --out is not there, not even as a temporary file."""
    if not os.path.isdir(ev.TINY):
        pytest.skip("assets/tiny-arith not built yet")
    out = tmp_path / "r.json"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "eval.py"), "--tasks", "arith", "--samples", "1",
                          "--limit", "400", "--batch-size", "2", "--max-new-tokens", "4", "--out", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # even from a `cmd &` shell
    try:
        lines = []
        for line in p.stderr:                                  # wait until it is generating: its first progress line
            lines.append(line)
            if line.startswith("eval.py: arith ") and "problems" in line:
                break
        p.send_signal(signal.SIGINT)
        err = "".join(lines) + p.communicate(timeout=120)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    said = [x for x in err.splitlines()[len(lines):] if x.strip()]
    assert p.returncode == 130 and "Traceback" not in err, (p.returncode, err[-2000:])
    assert said == ["eval.py: interrupted (Ctrl-C); a result file is written whole or not at all"], err
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)   # no r.json, no r.json.PID.tmp


def test_cli_unknown_task_subprocess():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--tasks", "arith,nope"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "nope" in p.stderr, p.stderr
