"""comedy.py: the smoke study writes its files with the right columns and resumes without redoing finished runs;
stats.py: the claim verdicts follow their stated rule on synthetic seed results; the README's study numbers are the
committed studies' (results/comedy, results/comedy-smollm2); every comedy.<name> / stats.<name> the notebooks and docs
call exists."""
import json
import os
import random
import re
import subprocess
import sys

import pytest

from tools import comedy, stats
from conftest import docs_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "assets", "tiny-arith")), reason="no shipped model")
def test_smoke_study_writes_every_file_and_skips_finished_runs(tmp_path):
    """In-process (comedy.main): the study's own train.py / eval.py runs are still processes, but a comedy.py start
    costs ~5-10 s of imports and proves nothing here; the lock test below starts `python tools/comedy.py` (so the
    script's own start, its imports included, is still run) where the process is the point."""
    argv = ["--smoke", "--out", str(tmp_path), "--jobs", "2"]
    assert comedy.main(argv) == 0
    recs = [json.loads(line) for line in open(tmp_path / "runs.jsonl")]
    assert sorted(r["arm"] for r in recs) == ["k1-in-reward", "k3-in-loss"]
    for key in ("beta", "seed", "in_greedy", "in_pass1", "in_pass4", "ood_greedy", "ood_pass1", "token_rkl",
                "token_fkl", "entropy", "reward_drop", "grad_spikes"):
        assert all(key in r for r in recs), key
    assert all(0 <= r["in_greedy"] <= 1 and 0 <= r["ood_pass1"] <= 1 and r["steps"] == 3 for r in recs)
    text = open(tmp_path / "summary.md").read()
    assert "| k1-in-reward | 0.3 |" in text and "## Claims" in text and "K3-in-loss is worse than K1-in-reward in" in text
    assert "K3-in-reward collapses" not in text                     # no k3-in-reward runs: that claim is left out
    for f in os.listdir(tmp_path / "runs"):                          # the runs name no machine (outside tmp_path)
        assert ROOT not in open(tmp_path / "runs" / f / "config.json").read()
    assert os.path.getsize(tmp_path / "curves.png") > 1000
    # a re-run skips finished runs; a truncated eval.json is a run not finished: that one is redone (evaluated
    # again), the finished one is not touched (one re-run checks both: each re-run starts train.py and eval.py)
    stamps = {f: os.path.getmtime(tmp_path / "runs" / f / "eval.json") for f in os.listdir(tmp_path / "runs")}
    good = tmp_path / "runs" / "k1-in-reward-b0.3-s0" / "metrics.jsonl"
    trained = os.path.getmtime(good)
    bad = tmp_path / "runs" / "k3-in-loss-b0.3-s0" / "eval.json"
    bad.write_text(bad.read_text()[:100])
    assert comedy.main(argv) == 0
    assert json.load(open(bad))["tasks"] and os.path.getmtime(tmp_path / "runs" / "k1-in-reward-b0.3-s0" /
                                                              "eval.json") == stamps["k1-in-reward-b0.3-s0"]
    assert os.path.getmtime(good) == trained                         # the finished run was not trained again
    # a re-summary with another --eval-n states the evaluations' own sizes (issue 26.10: it printed the flag's)
    assert comedy.main(["--report", "--out", str(tmp_path), "--eval-n", "7", "--arms", "k1-in-reward", "k3-in-loss",
                        "--betas", "0.3", "--seeds", "0"]) == 0
    assert "accuracy on 40 held-out problems in domain" in open(tmp_path / "summary.md").read()
    # runs from another commit: the study refuses to mix them, before training anything
    cfg_path = tmp_path / "runs" / "k1-in-reward-b0.3-s0" / "config.json"
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "code_commit": "0" * 40}, open(cfg_path, "w"))
    with pytest.raises(SystemExit, match="mixes code versions.*0000000"):
        comedy.main(argv)


def test_one_writer_per_study_folder_and_no_rm_of_a_live_run(tmp_path):
    """Issue 26.3: a second comedy.py on a study folder exits 2 naming the holder's PID, before touching anything; and
    a run folder whose lock a live process holds (a train.py started by hand) is never rm -rf'ed by the study."""
    import argparse
    from run_folder import lock_run, release_run
    made = lock_run(str(tmp_path), what="study folder")        # this process plays the first comedy.py
    try:
        p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "comedy.py"), "--smoke", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        release_run(str(tmp_path), made)
    assert p.returncode == 2 and f"(PID {os.getpid()})" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == [".lock"]                # nothing started, nothing written
    run = tmp_path / "runs" / "k1-in-reward-b0.3-s0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("precious\n")
    made = lock_run(str(run))                                         # a live writer of that run folder
    try:
        args = argparse.Namespace(out=str(tmp_path))
        with pytest.raises(RuntimeError, match="in use by another process"):
            comedy.run_one(args, "k1-in-reward", 0.3, 0)
    finally:
        release_run(str(run), made)
    assert (run / "metrics.jsonl").read_text() == "precious\n"


def synthetic(arm_means, spread=0.01, seeds=(0, 1, 2), betas=(0.05, 1.0)):
    """Seed results with given per-arm means of every metric, jittered by ±spread across seeds."""
    recs = []
    for arm, mean in arm_means.items():
        for beta in ([0.0] if arm == "none" else betas):
            for s in seeds:
                v = mean + spread * random.Random(f"{arm}-{beta}-{s}").uniform(-1, 1)   # fixed, arm-specific jitter
                recs.append({"arm": arm, "beta": beta, "seed": s, "in_greedy": v, "ood_greedy": v,
                             "entropy": v, "reward_drop": v})
    return recs


def verdicts_of(recs, betas):
    return {(c["claim"].split(":")[0], c["at"]): c for c in stats.claims(recs, betas)}


def test_claim_verdicts_follow_the_ci_rule():
    big_gap = synthetic({"none": 0.8, "k1-in-reward": 0.8, "k1-in-loss": 0.8, "k3-in-reward": 0.2,
                         "k3-in-loss": 0.6, "k3-in-both": 0.8}, spread=0.002)
    v = verdicts_of(big_gap, [0.05, 1.0])
    assert v[("K3-in-reward collapses", "β = 0.05")]["verdict"] == v[("K3-in-reward collapses", "β = 1")]["verdict"] \
        == "holds"                                          # reported at every β the study has
    assert v[("K3-in-loss is worse than K1-in-reward in domain", "every β")]["verdict"] == "holds"
    assert v[("K3-in-both matches K1-in-reward", "every β")]["verdict"] == "holds"
    entropy = ("K3-in-loss keeps a higher entropy than K1-in-reward (forward-KL-like, mass-covering)", "every β")
    assert v[entropy]["verdict"] == "does not hold: the opposite"     # the synthetic k3-in-loss entropy is lower
    reversed_gap = synthetic({"none": 0.5, "k1-in-reward": 0.5, "k1-in-loss": 0.5, "k3-in-reward": 0.9,
                              "k3-in-loss": 0.9, "k3-in-both": 0.2}, spread=0.002)
    v = verdicts_of(reversed_gap, [0.05, 1.0])
    assert v[("K3-in-reward collapses", "β = 1")]["verdict"] == "does not hold: the opposite"
    assert v[("K3-in-both matches K1-in-reward", "every β")]["verdict"] == "does not hold"
    noisy = synthetic({"none": 0.5, "k1-in-reward": 0.52, "k1-in-loss": 0.5, "k3-in-reward": 0.5,
                       "k3-in-loss": 0.5, "k3-in-both": 0.5}, spread=0.2)
    v = verdicts_of(noisy, [0.05, 1.0])
    c = v[("K3-in-loss is worse than K1-in-reward in domain", "every β")]
    assert c["verdict"] == "cannot tell" and c["settle"] > 3    # and says how many seeds would settle it
    assert f"~{c['settle']} seeds would settle it" in stats.claim_row(c)
    on_margin = dict(c, kind="match", xs=[0.02 + d for d in (-0.3, 0.3, -0.2, 0.2, 0.0)], n=5)   # mean 0.02 = δ
    assert stats.seeds_to_settle("match", on_margin["xs"], 0.02) is None
    assert "not even 500 seeds would settle it" in stats.claim_row(dict(on_margin, settle=None))


def test_a_second_beta_with_three_arms_adds_the_beta_claims_and_leaves_the_pooled_ones_alone():
    """The real-model study's shape: all six arms at β = 0.05, only the arms whose claims depend on β at a second β.
    The β claims appear at both β (collapse at each, instability and lower-β as 0.05 → 1); the pooled claims keep the
    values of β = 0.05 alone and say so ("β = 0.05", not "every β": the second β does not hold their arms)."""
    means = {"none": 0.5, "k1-in-reward": 0.7, "k1-in-loss": 0.5, "k3-in-reward": 0.1, "k3-in-loss": 0.6,
             "k3-in-both": 0.7}
    full = synthetic(means, spread=0.05, seeds=tuple(range(6)), betas=(0.05,))
    second = [dict(r, beta=1.0, in_greedy=r["in_greedy"] - 0.2, reward_drop=r["reward_drop"] + 0.3 * (r["arm"] == "k1-in-loss"))
              for r in full if r["arm"] in ("k1-in-reward", "k1-in-loss", "k3-in-reward")]
    only = verdicts_of(full, [0.05])
    both = verdicts_of(full + second, [0.05, 1.0])
    assert set(both) - set(only) - {(claim, "β = 0.05") for claim, _ in only} == {("K3-in-reward collapses", "β = 1"),
                                     ("K1-in-loss becomes unstable as β grows", "β 0.05 → 1"),
                                     ("Lower β does better", "β 0.05 vs 1")}
    for claim, at in only:
        if claim.startswith(("K3-in-loss", "... and", "K3-in-both")):
            assert at == "every β" and both[claim, "β = 0.05"]["xs"] == only[claim, at]["xs"]   # same seeds, same values
    assert both["Lower β does better", "β 0.05 vs 1"]["mean"] == pytest.approx(0.2)
    assert both["K1-in-loss becomes unstable as β grows", "β 0.05 → 1"]["mean"] == pytest.approx(0.3)
    assert both["K3-in-reward collapses", "β = 1"]["mean"] == pytest.approx(0.1 - 0.2 - 0.5, abs=0.1)


def test_the_real_model_grid_runs_only_the_beta_arms_at_its_second_beta():
    """`comedy.py --setup smollm2` is the committed study, no more: six arms × 6 seeds at the first β, and at each
    further β only the arms of setup["beta_arms"] (a k3-in-loss run at the second β would be hours the claims never
    read). An explicit --betas runs every arm at every β, as for the toy."""
    import argparse
    setup = comedy.SETUPS["smollm2"]
    args = argparse.Namespace(arms=list(comedy.ARMS), betas=list(setup["betas"]), seeds=list(setup["seeds"]),
                              beta_arms=setup.get("beta_arms", {}))
    runs = comedy.grid(args)
    first, *rest = setup["betas"]
    assert sorted(rest) == sorted(args.beta_arms) and len(runs) == len(set(runs))
    assert {(a, s) for a, b, s in runs if b in (0.0, first)} == {(a, s) for a in comedy.ARMS for s in setup["seeds"]}
    for beta in rest:
        assert {a for a, b, _ in runs if b == beta} == {"k1-in-reward", "k1-in-loss", "k3-in-reward"}
    assert len(runs) == 6 * len(setup["seeds"]) + 3 * len(setup["seeds"]) * len(rest)
    assert len(comedy.grid(argparse.Namespace(**{**vars(args), "beta_arms": {}}))) == \
        len(setup["seeds"]) * (1 + 5 * len(setup["betas"]))                 # every arm at every β


def test_pilot_chose_the_second_beta_by_its_rule():
    """results/pilot-smollm2/: the rule committed before the pilot (README), applied to the committed pilot runs,
    gives the second β that second_beta.txt and the smollm2 setup use; the README's table is those runs' values."""
    from run_folder import read_metrics
    pilot = os.path.join(ROOT, "results", "pilot-smollm2")
    readme = open(os.path.join(pilot, "README.md"), encoding="utf-8").read()
    rule_at, measured_at = readme.index("**The rule**"), readme.index("## What the pilot measured")
    assert rule_at < measured_at                                      # the rule stands above what was measured
    learns = {}
    for beta in (0.3, 1):
        folder = os.path.join(pilot, f"k1-in-reward-b{beta:g}-s0")
        cfg, steps = json.load(open(os.path.join(folder, "config.json"))), read_metrics(folder, "train")
        assert (cfg["kl"], cfg["beta"], cfg["seed"], len(steps)) == ("k1-in-reward", beta, 0, 30)
        assert cfg["code_commit"].startswith("afcb46b") and cfg["code_dirty"] is False   # the study's code version
        last, first = [r["reward"] for r in steps[-10:]], [r["reward"] for r in steps[:10]]
        penalty = sum(r["kl_penalty"] for r in steps[-10:]) / 10
        row = (f"| {beta:g} | {sum(last) / 10:.3f} | {sum(first) / 10:.3f} | {max(r['reward'] for r in steps):.3f} | "
               f"{penalty:.3f} | {'yes' if sum(last) / 10 >= 0.30 else 'no'} |")
        assert row in readme, row
        learns[beta] = sum(last) / 10 >= 0.30
    second = next((b for b in (1, 0.3) if learns[b]), 0.1)
    assert float(open(os.path.join(pilot, "second_beta.txt")).read()) == second
    assert f"**the second β\nis {second:g}**" in readme
    setup = comedy.SETUPS["smollm2"]
    assert setup["betas"] == (0.05, second) and set(setup["beta_arms"]) == {second}


def test_verdict_rule_cannot_overlap_and_shows_significant_but_small():
    """Issue 25: +0.013 ± 0.007 with δ = 0.02 both 'held' and 'did not hold' under the old wording. Each (lo, hi)
    now has one verdict, and a CI inside (0, δ) is its own visible case."""
    assert stats.verdict("direction", 0.006, 0.019, 0.02) == "holds, but smaller than the margin"
    assert stats.verdict("direction", 0.006, 0.021, 0.02) == "holds"
    assert stats.verdict("direction", -0.019, 0.019, 0.02) == "does not hold: no practical difference"
    assert stats.verdict("direction", -0.05, -0.01, 0.02) == "does not hold: the opposite"
    assert stats.verdict("direction", -0.058, 0.001, 0.02) == "cannot tell"      # the corrected "gap" claim
    assert stats.verdict("match", -0.023, -0.005, 0.02) == "cannot tell"
    assert stats.verdict("match", -0.019, 0.019, 0.02) == "holds"
    assert stats.verdict("match", 0.021, 0.05, 0.02) == "does not hold"
    grid = [x / 200 for x in range(-20, 21)]                 # every CI on a grid: the if-chain's cases partition it
    for lo in grid:
        for hi in (h for h in grid if h >= lo):
            v = stats.verdict("direction", lo, hi, 0.02)
            cases = {"holds": lo > 0 and hi >= 0.02, "holds, but smaller than the margin": lo > 0 and hi < 0.02,
                     "does not hold: the opposite": hi < 0,
                     "does not hold: no practical difference": lo <= 0 <= hi and -0.02 < lo and hi < 0.02}
            cases["cannot tell"] = not any(cases.values())
            assert [k for k, on in cases.items() if on] == [v], (lo, hi, v)


def test_instability_is_a_difference_in_differences():
    """'K1-in-loss becomes unstable as β grows' compares k1-in-loss's β effect on the reward drop with k1-in-reward's
    own: the same growth in both arms is no instability of k1-in-loss; more growth in k1-in-loss holds; the claim
    and 'lower β does better' are reported for every larger β, oriented as written."""
    def study(loss_hi, reward_hi, acc_lo, acc_hi):
        recs = synthetic({"none": 0.5, "k1-in-reward": 0.5, "k1-in-loss": 0.5, "k3-in-reward": 0.5,
                          "k3-in-loss": 0.5, "k3-in-both": 0.5}, spread=0.002, seeds=range(6), betas=(0.05, 0.3, 1.0))
        for r in recs:
            if r["arm"] == "k1-in-loss" and r["beta"] > 0.05:
                r["reward_drop"] += loss_hi * r["beta"]
            if r["arm"] == "k1-in-reward":
                r["reward_drop"] += reward_hi * r["beta"] if r["beta"] > 0.05 else 0
                r["in_greedy"] += acc_lo if r["beta"] == 0.05 else acc_hi
        return verdicts_of(recs, [0.05, 0.3, 1.0])
    unstable, lower = "K1-in-loss becomes unstable as β grows", "Lower β does better"
    both_grow = study(0.3, 0.3, 0.2, 0.0)
    assert {both_grow[(unstable, at)]["verdict"] for at in ("β 0.05 → 0.3", "β 0.05 → 1")} \
        == {"does not hold: no practical difference"}                    # was "holds" when k1-in-reward was ignored
    only_loss = study(0.3, 0.0, 0.2, 0.0)
    c = only_loss[(unstable, "β 0.05 → 1")]
    assert c["verdict"] == "holds" and c["mean"] == pytest.approx(0.3, abs=0.01)
    assert only_loss[(lower, "β 0.05 vs 1")]["verdict"] == "holds" and only_loss[(lower, "β 0.05 vs 0.3")]["mean"] > 0.19
    reversed_ = study(-0.3, 0.0, 0.0, 0.2)
    assert reversed_[(unstable, "β 0.05 → 1")]["verdict"] == "does not hold: the opposite"
    assert reversed_[(lower, "β 0.05 vs 1")]["verdict"] == "does not hold: the opposite"


def test_exact_t_quantiles_and_the_interval():
    """Known t_{0.975} quantiles (any table: df 1 12.706, 5 2.571, 17 2.110, 30 2.042, 100 1.984); the old table
    fell back to 1.96 past df 10."""
    for df, t in ((1, 12.7062), (5, 2.5706), (17, 2.1098), (30, 2.0423), (100, 1.9840)):
        assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    m, h = stats.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.3027 / 3 ** 0.5, rel=1e-4)
    xs = [random.Random(i).gauss(0, 1) for i in range(18)]
    sd = (sum((x - sum(xs) / 18) ** 2 for x in xs) / 17) ** 0.5
    assert stats.mean_ci(xs)[1] == pytest.approx(2.1098 * sd / 18 ** 0.5, rel=1e-4)


def test_p_values_agree_with_the_intervals_and_holm_steps_down():
    """A 95% CI excludes 0 iff the t-test's p < 0.05 (direction); it lies in ±δ iff the TOST p < 0.05 (match). Holm:
    p = (0.01, 0.04, 0.03, 0.005) tests 0.005 at α/4 and 0.01 at α/3 (both pass), 0.03 at α/2 (fails): it and 0.04
    keep level 1 − α/2."""
    for i in range(40):
        rng = random.Random(i)
        xs = [rng.gauss(rng.uniform(-0.03, 0.03), rng.uniform(0.005, 0.03)) for _ in range(rng.choice((3, 6, 18)))]
        m, h = stats.mean_ci(xs)
        assert (stats.p_value("direction", xs, 0.02) < 0.05) == (m - h > 0 or m + h < 0)
        assert (stats.p_value("match", xs, 0.02) < 0.05) == (-0.02 < m - h and m + h < 0.02)
    levels = stats.holm_levels([0.01, 0.04, 0.03, 0.005])
    assert levels == pytest.approx([1 - 0.05 / 3, 0.975, 0.975, 1 - 0.05 / 4])


@pytest.mark.parametrize("study", ["comedy", "comedy-smollm2"])
def test_committed_summaries_are_exact_t_recomputations(study):
    """Every 'mean ± half-width' in a committed summary.md is the exact-t interval of its runs.jsonl (scipy's t
    quantile, computed here without stats.py), and every claim line is stats.claim_row of those runs."""
    from scipy.stats import t as student_t                  # scipy's own, not stats.py's t_quantile
    folder = os.path.join(ROOT, "results", study)
    recs = [json.loads(line) for line in open(os.path.join(folder, "runs.jsonl"))]
    text = open(os.path.join(folder, "summary.md"), encoding="utf-8").read()
    table = text[text.index("| arm |"):text.index("## Claims")].strip().splitlines()[2:]   # the arms × β table
    rows = [line for line in table if line.startswith("| ")]
    assert len(rows) == len({(r["arm"], r["beta"]) for r in recs})
    for row in rows:
        arm, beta, *cells = [c.strip() for c in row.strip("|").split("|")]
        runs = [r for r in recs if r["arm"] == arm and r["beta"] == float(beta)]
        for key, shown in zip(("in_greedy", "in_pass1", "ood_greedy", "ood_pass1", "token_rkl", "token_fkl",
                               "entropy", "reward_drop"), cells):
            xs = [r[key] for r in runs]
            n, m = len(xs), sum(xs) / len(xs)
            h = student_t.ppf(0.975, n - 1) * (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5 / n ** 0.5
            assert shown == f"{m:.3f} ± {h:.3f}", (arm, beta, key)
    betas = sorted({r["beta"] for r in recs if r["arm"] != "none"})
    for c in stats.claims(recs, betas):
        assert stats.claim_row(c) in text, c["claim"]


def test_every_name_the_notebooks_and_docs_call_exists():
    """The statistics moved to tools/stats.py; notebooks 03 and 05 (not re-executed by the suite) call them as
    comedy.<name>, docs and summary.md name comedy.MARGINS, stats.verdict: each such name resolves, and a comedy.<name>
    of a statistic is stats.py's own function, not a copy that could drift."""
    import glob
    paths = [os.path.join(ROOT, "README.md")] + [f for pattern in ("docs/*.md", "notebooks/*.ipynb", "results/*/summary.md")
                                                 for f in glob.glob(os.path.join(ROOT, pattern))]
    texts = {f: open(f, encoding="utf-8").read() for f in paths}
    used = {(mod, name, os.path.relpath(f, ROOT)) for f, text in texts.items()
            for mod, name in re.findall(r"(?<![\w.])(comedy|stats)\.(?!py\b)([A-Za-z_]\w*)", text)}
    assert {("comedy", "claims"), ("comedy", "t_quantile"), ("stats", "verdict")} <= {u[:2] for u in used}
    for mod, name, where in used:
        assert hasattr({"comedy": comedy, "stats": stats}[mod], name), f"{where}: {mod}.{name} does not exist"
        if mod == "comedy" and hasattr(stats, name):
            assert getattr(comedy, name) is getattr(stats, name), name


# ---------------------------------------------------------------------------------------------------------
# The README's study numbers are the committed studies' numbers (prose cannot drift from results)
# ---------------------------------------------------------------------------------------------------------
MEAN_CI = re.compile(r"[+-]?\d\.\d{3} ± \d\.\d{3}")      # "0.815 ± 0.018", "-0.215 ± 0.126" as in summary.md


def readme_span(start, end):
    text = docs_text()
    i = text.index(start)
    return text[i:text.index(end, i)].replace("−", "-")


def test_readme_toy_study_numbers_are_its_summary():
    """Every 'mean ± CI' in the toy-study doc, and its claims table (every verdict, Holm's too), is in
    results/comedy/summary.md: a re-run study that changes a number or a verdict fails here until the README says it."""
    summary = open(os.path.join(ROOT, "results", "comedy", "summary.md"), encoding="utf-8").read()
    section = readme_span("# The paper's study at toy scale", "[Back to the README]")
    pairs = MEAN_CI.findall(section)
    assert len(pairs) >= 8, pairs
    for pair in pairs:
        assert pair in summary, f"README toy section: {pair} is not in results/comedy/summary.md"
    rows = [line for line in section.splitlines() if line.startswith("| ") and "**" in line]
    claims = [line.replace("−", "-") for line in summary.splitlines() if line.startswith("| ") and "**" in line]
    assert rows == claims and len(rows) >= 8            # the claims table is summary.md's, verbatim: every verdict
    runs = [json.loads(line) for line in open(os.path.join(ROOT, "results", "comedy", "runs.jsonl"))]
    n_seeds = len({r["seed"] for r in runs})
    assert f"{len(runs)} runs" in section and f"{n_seeds} seeds" in summary.splitlines()[2] and n_seeds >= 6
    assert len({r["code_commit"] for r in runs}) == 1, "the committed toy study mixes code versions"


def test_real_model_study_doc_is_its_summary():
    """docs/real-model.md's study section speaks of the committed real-model study: its arms table and claims table
    are results/comedy-smollm2/summary.md's rows verbatim (every mean ± CI, every verdict, Holm's too), every other
    'mean ± CI' in the section is in one of the two summaries, and the study is what issue 25 asked for: at least 6
    seeds of each of the six arms at β = 0.05, at a second β the three arms whose claims depend on β with as many,
    one clean code version, its run count stated."""
    folder = os.path.join(ROOT, "results", "comedy-smollm2")
    runs = [json.loads(line) for line in open(os.path.join(folder, "runs.jsonl"))]
    summary = open(os.path.join(folder, "summary.md"), encoding="utf-8").read().replace("−", "-")
    section = readme_span("## The real-model study", "[Back to the README]")
    def table_rows(text, claims):                       # claim rows carry a bold verdict; arm rows a "±" and no bold
        return [line for line in text.splitlines() if line.startswith("| ") and ("**" in line) == claims
                and " ± " in line]
    assert table_rows(section, True) == table_rows(summary, True) and len(table_rows(summary, True)) >= 6
    assert table_rows(section, False) == table_rows(summary, False)
    summaries = summary + open(os.path.join(ROOT, "results", "comedy", "summary.md"), encoding="utf-8").read()
    for pair in MEAN_CI.findall(section):
        assert pair in summaries, f"docs/real-model.md: {pair} is in neither summary.md"
    for arm in comedy.ARMS:
        assert len({r["seed"] for r in runs if r["arm"] == arm and r["beta"] in (0.0, 0.05)}) >= 6, arm
    for beta in {r["beta"] for r in runs} - {0.0, 0.05}:   # a second β: the three arms its claims need, as many seeds
        at = {arm: {r["seed"] for r in runs if r["arm"] == arm and r["beta"] == beta} for arm in comedy.ARMS}
        assert {arm for arm in at if at[arm]} == {"k1-in-reward", "k1-in-loss", "k3-in-reward"}, beta
        assert all(len(at[arm]) >= 6 for arm in ("k1-in-reward", "k1-in-loss", "k3-in-reward")), beta
        assert f"β = {beta:g}" in section
    assert len({(r["code_commit"], r["code_dirty"]) for r in runs}) == 1 and runs[0]["code_dirty"] is False
    assert f"{len(runs)} runs" in section and runs[0]["code_commit"][:7] in section
