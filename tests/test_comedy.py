"""comedy.py: the smoke study writes its files with the right columns and resumes without redoing finished runs;
the claim verdicts follow their stated rule on synthetic seed results; the README's study numbers are the committed
studies' (results/comedy, results/comedy-smollm2)."""
import json
import os
import random
import re
import subprocess
import sys

import pytest

import comedy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "assets", "tiny-arith")), reason="no shipped model")
def test_smoke_study_writes_every_file_and_skips_finished_runs(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "comedy.py"), "--smoke", "--out", str(tmp_path), "--jobs", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
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
    # again), the finished one is not touched (one re-run checks both: each comedy.py start costs ~10 s of imports)
    stamps = {f: os.path.getmtime(tmp_path / "runs" / f / "eval.json") for f in os.listdir(tmp_path / "runs")}
    good = tmp_path / "runs" / "k1-in-reward-b0.3-s0" / "metrics.jsonl"
    trained = os.path.getmtime(good)
    bad = tmp_path / "runs" / "k3-in-loss-b0.3-s0" / "eval.json"
    bad.write_text(bad.read_text()[:100])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.load(open(bad))["tasks"] and os.path.getmtime(tmp_path / "runs" / "k1-in-reward-b0.3-s0" /
                                                              "eval.json") == stamps["k1-in-reward-b0.3-s0"]
    assert os.path.getmtime(good) == trained                         # the finished run was not trained again
    # runs from another commit: the study refuses to mix them, before training anything
    cfg_path = tmp_path / "runs" / "k1-in-reward-b0.3-s0" / "config.json"
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "code_commit": "0" * 40}, open(cfg_path, "w"))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0 and "mixes code versions" in p.stderr and "0000000" in p.stderr


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


def test_claim_verdicts_follow_the_ci_rule():
    big_gap = synthetic({"none": 0.8, "k1-in-reward": 0.8, "k1-in-loss": 0.8, "k3-in-reward": 0.2,
                         "k3-in-loss": 0.6, "k3-in-both": 0.8}, spread=0.002)
    verdicts = {c.split(":")[0]: v for c, v, _ in comedy.claims(big_gap, [0.05, 1.0])}
    assert verdicts["K3-in-reward collapses"] == "holds"
    assert verdicts["K3-in-loss is worse than K1-in-reward in domain"] == "holds"
    assert verdicts["K3-in-both matches K1-in-reward (within ±0.02)"] == "holds"
    assert verdicts["K3-in-loss keeps a higher entropy than K1-in-reward (forward-KL-like, mass-covering)"] \
        == "does not hold"                                    # the synthetic k3-in-loss entropy is lower
    reversed_gap = synthetic({"none": 0.5, "k1-in-reward": 0.5, "k1-in-loss": 0.5, "k3-in-reward": 0.9,
                              "k3-in-loss": 0.9, "k3-in-both": 0.2}, spread=0.002)
    verdicts = {c.split(":")[0]: v for c, v, _ in comedy.claims(reversed_gap, [0.05, 1.0])}
    assert verdicts["K3-in-reward collapses"] == "does not hold"
    assert verdicts["K3-in-both matches K1-in-reward (within ±0.02)"] == "does not hold"
    noisy = synthetic({"none": 0.5, "k1-in-reward": 0.52, "k1-in-loss": 0.5, "k3-in-reward": 0.5,
                       "k3-in-loss": 0.5, "k3-in-both": 0.5}, spread=0.2)
    verdicts = {c.split(":")[0]: v for c, v, _ in comedy.claims(noisy, [0.05, 1.0])}
    assert verdicts["K3-in-loss is worse than K1-in-reward in domain"] == "cannot tell at this scale"


def test_beta_claims_are_oriented_as_written():
    """'K1-in-loss becomes unstable as β grows': a larger reward drop at the larger β is +, holds; 'lower β does
    better': higher accuracy at the smaller β is +, holds. Reversing either data set reverses sign and verdict."""
    def with_drops(drop_lo, drop_hi, acc_lo, acc_hi):
        recs = synthetic({"none": 0.5, "k1-in-reward": 0.5, "k1-in-loss": 0.5, "k3-in-reward": 0.5,
                          "k3-in-loss": 0.5, "k3-in-both": 0.5}, spread=0.002)
        for r in recs:
            if r["arm"] == "k1-in-loss":
                r["reward_drop"] += drop_lo if r["beta"] == 0.05 else drop_hi
            if r["arm"] == "k1-in-reward":
                r["in_greedy"] += acc_lo if r["beta"] == 0.05 else acc_hi
        return {c.split(":")[0]: (v, n) for c, v, n in comedy.claims(recs, [0.05, 1.0])}
    unstable, lower = "K1-in-loss becomes unstable as β grows", "Lower β does better"
    as_claimed = with_drops(0.0, 0.3, 0.2, 0.0)
    assert as_claimed[unstable][0] == "holds" and as_claimed[unstable][1].startswith("+0.3")
    assert "at β = 1 − at β = 0.05" in as_claimed[unstable][1]
    assert as_claimed[lower][0] == "holds" and as_claimed[lower][1].startswith("+0.2")
    reversed_ = with_drops(0.3, 0.0, 0.0, 0.2)
    assert reversed_[unstable][0] == "does not hold" and reversed_[unstable][1].startswith("-0.3")
    assert reversed_[lower][0] == "does not hold" and reversed_[lower][1].startswith("-0.2")


def test_mean_ci_is_the_t_interval():
    m, h = comedy.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.30 * 1.0 / 3 ** 0.5, rel=1e-3)


# ---------------------------------------------------------------------------------------------------------
# The README's study numbers are the committed studies' numbers (prose cannot drift from results)
# ---------------------------------------------------------------------------------------------------------
MEAN_CI = re.compile(r"[+-]?\d\.\d{3} ± \d\.\d{3}")      # "0.815 ± 0.018", "-0.215 ± 0.126" as in summary.md


def readme_span(start, end):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    i = text.index(start)
    return text[i:text.index(end, i)].replace("−", "-")


def test_readme_toy_study_numbers_are_its_summary():
    """Every 'mean ± CI' in the README's toy-study section, and every claim's verdict there, is in
    results/comedy/summary.md: a re-run study that changes a number or a verdict fails here until the README says it."""
    summary = open(os.path.join(ROOT, "results", "comedy", "summary.md"), encoding="utf-8").read()
    section = readme_span("### The paper's study at toy scale", "On one GPU, the paper's")
    pairs = MEAN_CI.findall(section)
    assert len(pairs) >= 8, pairs
    for pair in pairs:
        assert pair in summary, f"README toy section: {pair} is not in results/comedy/summary.md"
    rows = [line for line in section.splitlines() if line.startswith("| ") and "**" in line]
    claims = {line.split(" | ")[0]: line.split(" | ")[1] for line in summary.splitlines()
              if line.startswith("| ") and "**" in line}
    assert len(rows) == len(claims) >= 6
    for row in rows:
        assert claims[row.split(" | ")[0]] == row.split(" | ")[1], row
    runs = [json.loads(line) for line in open(os.path.join(ROOT, "results", "comedy", "runs.jsonl"))]
    n_seeds = len({r["seed"] for r in runs})
    assert f"{len(runs)} runs" in section and f"{n_seeds} seeds" in summary.splitlines()[2] and n_seeds >= 6
    assert len({r["code_commit"] for r in runs}) == 1, "the committed toy study mixes code versions"


def test_readme_real_study_table_is_its_runs():
    """The README's real-model study table: per-seed greedy accuracies and the seed-mean KL and entropy are
    results/comedy-smollm2/runs.jsonl's, and every 'mean ± CI' in its paragraph is in one of the two summaries."""
    runs = [json.loads(line) for line in open(os.path.join(ROOT, "results", "comedy-smollm2", "runs.jsonl"))]
    section = readme_span("**The arms on it**", "### The paper's study at toy scale")
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in section.splitlines()
            if line.startswith("| ") and " / " in line}
    assert set(rows) == {r["arm"] for r in runs}
    for arm, cells in rows.items():
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        assert cells[0] == " / ".join(f"{r['in_greedy']:.3f}" for r in mine), arm
        assert cells[1] == " / ".join(f"{r['ood_greedy']:.3f}" for r in mine), arm
        assert cells[2] == f"{sum(r['token_rkl'] for r in mine) / len(mine):.2f}", arm
        assert cells[3].rstrip(" |") == f"{sum(r['entropy'] for r in mine) / len(mine):.2f}", arm
    summaries = "".join(open(os.path.join(ROOT, "results", d, "summary.md"), encoding="utf-8").read()
                        for d in ("comedy", "comedy-smollm2"))
    for pair in MEAN_CI.findall(section):
        assert pair in summaries, f"README real-study paragraph: {pair} is in neither summary.md"
