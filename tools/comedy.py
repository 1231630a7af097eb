"""comedy.py -- the paper's study at small scale: KL arms × β × seeds on a CPU, with 95% CIs, in and out of domain.

What it runs: train.py for every arm in --arms, every β and every seed (the `none` arm has no β, so it runs once per
seed and is reported as β = 0), then eval.py on each final adapter, in domain and out of domain (OOD), greedy and
n samples (pass@1 and unbiased pass@n; n = 4 on the tiny model, 2 on the real one, whose evaluation costs most). Then it aggregates over seeds and checks each of the paper's claims that
the grid has runs for (stats.claims), saying for each: holds / does not hold / cannot tell at this scale.
Two setups (--setup):
  tiny     the shipped 0.5M-parameter model on `arith`; OOD `arith_spaced` (the same held-out problems written
           "a + b ="); 6 arms × β {0.05, 0.3, 1} × 6 seeds, 150 steps, T = 1.
  smollm2  the real SmolLM2-135M-Instruct (real_model.py) with --preset smollm2-cpu on `arith_q`; OOD `mul_q` (the
           times table: a skill RL on addition never trains); 6 arms × β 0.05 × 6 seeds, and the 3 arms whose
           claims depend on β (k1-in-reward, k1-in-loss, k3-in-reward) × β 0.1 × 6 seeds; T = 0.7.

Simplifications: the paper's 7B models, MATH and 250 steps become small models, arithmetic and short runs; CIs are
over training seeds (t-interval on the seed means), the only randomness the paper's claims are about. "Collapse"
and "instability" are measured by the final accuracy and by the largest drop of the training reward (5-step moving
average, from its running maximum). A study is one code version: every run records the commit it ran from
(train.py's config.json), and comedy.py refuses to add runs to, or summarise, a study that mixes commits.

Commands
  python tools/comedy.py                      # the tiny study: 6 arms × β {0.05, 0.3, 1} × 6 seeds (docs/toy-study.md)
  python tools/comedy.py --setup smollm2      # the real-model study (docs/real-model.md; 20.7 CPU-hours, 54 runs)
  python tools/comedy.py --smoke --out /tmp/c # 2 arms × 1 β × 1 seed × 3 steps: what the tests run
  python tools/comedy.py --setup smollm2 --report   # summarise the finished runs of a study still running; run nothing
Re-running skips finished runs (a run is finished when its eval.json parses; an interrupted one resumes from its
last checkpoint), so an interrupted study continues where it stopped.
Outputs in --out (default results/comedy/, results/comedy-smollm2/): runs/<arm>-b<β>-s<seed>/ (train.py run folders
with eval.json), runs.jsonl (one line per run: its config and final metrics), summary.md (tables and the claims),
curves.png; every path in them relative to the repository.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repo root: `python tools/comedy.py` runs from here,
if ROOT not in sys.path:                                             # and the core modules (train, run_folder, ...) sit one
    sys.path.insert(0, ROOT)                                         # folder up

from run_folder import die_with_parent, holder, lock_run, open_nofollow, read_metrics, write_atomic
from tools.report import moving_average
# the statistics (intervals, the verdict rule, the claims) are stats.py's; by_seed, paired_diff, seed_means and
# t_quantile are imported only to stay reachable as comedy.<name>, as notebooks 03 and 05 call them
from tools.stats import (MARGINS, by_seed, cell, claim_row, claims, mean_ci, paired_diff,  # noqa: F401
                         seed_means, t_quantile)

ARMS = ("none", "k1-in-reward", "k1-in-loss", "k3-in-reward", "k3-in-loss", "k3-in-both")
# --setup: the model, its in-domain and out-of-domain tasks, and how runs are trained and evaluated
SETUPS = {
    "tiny": dict(out="comedy", in_task="arith", ood_task="arith_spaced", arms=ARMS, betas=(0.05, 0.3, 1.0),
                 seeds=(0, 1, 2, 3, 4, 5), steps=150, eval_n=500, train=["--save-every", "25"],
                 eval=["--max-new-tokens", "8", "--batch-size", "125"], samples=4, temperature=1.0),
    # the real model (real_model.py) on its task, at β = 0.05, where the KL term matters (β·KL ≈ 0.1-0.5 of the
    # reward), and at a second β only the arms whose claims depend on β (stats.claims: collapse, instability, lower β
    # better); 0.1 is what a recorded pilot chose by a rule committed before it ran (results/pilot-smollm2/README.md).
    # --eval-n 0: the runs do no held-out evaluation of their own (their step-0 one is the base evaluation, their
    # last one eval.py's), eval.py evaluates each final adapter on 200 problems per task
    "smollm2": dict(out="comedy-smollm2", in_task="arith_q", ood_task="mul_q", arms=ARMS, betas=(0.05, 0.1),
                    beta_arms={0.1: ("k1-in-reward", "k1-in-loss", "k3-in-reward")},
                    seeds=(0, 1, 2, 3, 4, 5), steps=None, eval_n=200,
                    train=["--preset", "smollm2-cpu", "--save-every", "5", "--eval-n", "0"],
                    eval=["--model", "smollm2-135m", "--max-new-tokens", "32", "--batch-size", "50"], samples=2,
                    temperature=0.7),
}
STUDY_FILES = (".lock", "base-eval.json", "runs.jsonl", "summary.md", "curves.png", "runs")   # written in --out


# ---------------------------------------------------------------------------------------------------------
# Running: one train.py + eval.py per (arm, β, seed), in parallel processes, skipping finished runs
# ---------------------------------------------------------------------------------------------------------
def grid(args):
    only = getattr(args, "beta_arms", {})          # {β: the arms that run at it}; a β not in it runs every arm
    runs = [("none", 0.0, s) for s in args.seeds] if "none" in args.arms else []
    return runs + [(a, b, s) for a in args.arms if a != "none" for b in args.betas if a in only.get(b, (a,))
                   for s in args.seeds]


def finished(folder):
    """A run is finished when its eval.json parses (eval.py writes it atomically, but an older or interrupted
    write can leave a truncated file: that run is redone, not trusted)."""
    try:
        return "tasks" in json.load(open(os.path.join(folder, "eval.json")))
    except (OSError, ValueError):
        return False


def run_one(args, arm, beta, seed):
    """Train (or resume) and evaluate one run; -> its folder. Output goes to <folder>/log.txt."""
    folder = os.path.join(args.out, "runs", f"{arm}-b{beta:g}-s{seed}")
    if finished(folder):
        return folder                                                    # finished earlier
    has_ckpt = any(os.path.isfile(os.path.join(folder, c, "state.pt")) for c in ("checkpoint", "checkpoint.old"))
    if (pid := holder(folder)) is not None:                            # a train.py started by hand, say
        raise RuntimeError(f"{folder} is in use by another process (PID {pid}); comedy.py leaves it alone")
    if has_ckpt:
        train = ["--resume", rel(folder)]
    else:
        subprocess.run(["rm", "-rf", folder], check=True)               # started but never checkpointed
        train = ["--out", rel(folder), "--kl", arm, "--beta", str(beta), "--seed", str(seed), "--eval-every", "0",
                 "--eval-n", str(args.eval_n), "--eval-tasks", args.in_task, args.ood_task, "--threads", "1",
                 *(["--steps", str(args.steps)] if args.steps else []), *args.setup["train"], *args.train_flags]
    evaluate = ["--adapter", rel(folder), "--tasks", f"{args.in_task},{args.ood_task}", "--samples", str(args.setup["samples"]),
                "--temperature", str(args.setup["temperature"]), "--limit", str(args.eval_n), "--seed", str(seed),
                *args.setup["eval"], "--out", rel(os.path.join(folder, "eval.json"))]
    os.makedirs(folder, exist_ok=True)
    if os.path.lexists(os.path.join(folder, "eval.json")):            # a torn write of ours: eval.py keeps its --out
        os.remove(os.path.join(folder, "eval.json"))                  # safe from anything not a result, so we clear it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open_nofollow(os.path.join(folder, "log.txt"), "a") as log:     # never through a planted link
        for script, argv in (("train.py", train), ("eval.py", evaluate)):
            p = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], stdout=log, stderr=log, env=env,
                               cwd=ROOT, preexec_fn=die_with_parent)
            if p.returncode:
                raise RuntimeError(f"{script} failed for {folder} (exit {p.returncode}); see {folder}/log.txt")
    return folder


def progress(args, key):
    """One running run's state for the study's heartbeat line: its training step, or that it is being evaluated."""
    folder = os.path.join(args.out, "runs", f"{key[0]}-b{key[1]:g}-s{key[2]}")
    try:
        steps = sum(1 for r in read_metrics(folder, "train"))
        total = json.load(open_nofollow(os.path.join(folder, "config.json")))["steps"]
    except (OSError, ValueError, KeyError):
        return f"{key[0]} β={key[1]:g} s{key[2]} starting"
    return f"{key[0]} β={key[1]:g} s{key[2]} " + (f"step {steps}/{total}" if steps < total else "evaluating")


def code_versions(folders):
    """{(code_commit, code_dirty): [run folders]} of the runs' config.json (train.py records them)."""
    out = {}
    for f in folders:
        cfg = json.load(open(os.path.join(f, "config.json")))
        out.setdefault((cfg.get("code_commit"), cfg.get("code_dirty")), []).append(os.path.basename(f))
    return out


def one_version(folders, what):
    """The study's single code version; a study that mixes versions is refused (exit 2): its differences between arms
    could be differences between commits (float rounding alone moves a run: issue 19's k3-in-reward re-run)."""
    versions = code_versions(folders)
    if len(versions) > 1:
        detail = "; ".join(f"{c or 'no commit'}{'-dirty' if d else ''}: {len(fs)} runs (e.g. {fs[0]})"
                           for (c, d), fs in versions.items())
        sys.exit(f"comedy.py: error: {what} mixes code versions ({detail}); re-run the study into a fresh --out, or "
                 "delete the runs of the other version")
    return next(iter(versions), (None, None))


# ---------------------------------------------------------------------------------------------------------
# One run -> one line of runs.jsonl
# ---------------------------------------------------------------------------------------------------------
def run_record(folder, arm, beta, seed):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    train = read_metrics(folder, "train")
    ev = json.load(open(os.path.join(folder, "eval.json")))["tasks"]
    seconds = {"train_seconds": sum(r["time_step"] for r in train), "eval_seconds": sum(t["seconds"] for t in ev.values())}
    tail = train[-max(1, len(train) // 10):]                             # the last 10% of steps
    reward = moving_average([r["reward"] for r in train], 5)
    peak, drop = -math.inf, 0.0
    for r in reward:                                                     # largest fall from the running maximum
        peak = max(peak, r)
        drop = max(drop, peak - r)
    grad = sorted(r["grad_norm"] for r in train)
    box = cfg.get("machine") or {}                                     # older runs recorded no machine
    rec = {"arm": arm, "beta": beta, "seed": seed, "steps": len(train), "lr": cfg["lr"], "group_size": cfg["group_size"],
           "code_commit": cfg.get("code_commit"), "code_dirty": cfg.get("code_dirty"),
           "cpu_capability": box.get("cpu_capability"), "torch": box.get("torch"),
           "reward_drop": drop, "grad_spikes": sum(g > 5 * grad[len(grad) // 2] for g in grad), **seconds}
    for key in ("reward", "token_rkl", "token_fkl", "entropy", "kl_k1"):
        rec[key] = sum(r[key] for r in tail) / len(tail)
    for task, tag in ((cfg["eval_tasks"][0], "in"), (cfg["eval_tasks"][1], "ood")):
        m = ev[task]["metrics"]
        n = max(int(k[5:]) for k in m if k.startswith("pass@"))                     # the samples per problem
        rec.update({f"{tag}_greedy": m["greedy acc"]["mean"], f"{tag}_pass1": m["pass@1"]["mean"],
                    f"{tag}_pass{n}": m[f"pass@{n}"]["mean"], f"{tag}_n": len(ev[task]["problems"])})
    return rec


# ---------------------------------------------------------------------------------------------------------
# Report: summary.md and curves.png
# ---------------------------------------------------------------------------------------------------------
COLUMNS = [("in_greedy", "in greedy"), ("in_pass1", "in pass@1"), ("ood_greedy", "OOD greedy"),
           ("ood_pass1", "OOD pass@1"), ("token_rkl", "token KL(π‖ref)"), ("token_fkl", "token KL(ref‖π)"),
           ("entropy", "entropy"), ("reward_drop", "reward drop")]


def summary(recs, args, base, command, wall):
    def fmt(xs):
        m, h = mean_ci(xs)
        return f"{m:.3f}" if math.isnan(h) else f"{m:.3f} ± {h:.3f}"
    seeds, betas = sorted({r["seed"] for r in recs}), args.betas
    kinds = {}
    for r in recs:
        kinds[r.get("cpu_capability") or "not recorded"] = kinds.get(r.get("cpu_capability") or "not recorded", 0) + 1
    kernels = ", ".join(f"{k} ({n} runs)" for k, n in sorted(kinds.items()))

    def sizes(tag):          # the evaluations' own sizes, not --eval-n: a re-summary with another --eval-n cannot lie
        ns = sorted({base[f"{tag}_n"]} | {r[f"{tag}_n"] for r in recs})
        return f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]} (they differ between runs)"
    lines = [f"# The paper's claims at {'toy' if args.setup is SETUPS['tiny'] else 'small real-model'} scale", "",
             f"`{command}` — {len(recs)} runs ({len(seeds)} seed{'s' * (len(seeds) > 1)}); {wall}. Mean ± 95% CI "
             f"half-width over seeds; accuracy on {sizes('in')} held-out problems in domain (`{args.in_task}`) and "
             f"{sizes('ood')} out of domain (`{args.ood_task}`), greedy and pass@1 of {args.setup['samples']} "
             f"samples at T = {args.setup['temperature']:g}; KLs and entropy are means over the last 10% of training steps. Base "
             f"model before RL: in-domain greedy {base['in']:.3f}, OOD greedy {base['ood']:.3f}. CPU kernels the runs "
             f"used (a single run's floats agree only on the same kind): {kernels}.",
             "", "| arm | β | " + " | ".join(c for _, c in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for arm in args.arms:
        for beta in ([0.0] if arm == "none" else betas):
            if cell(recs, arm, beta, "in_greedy"):
                lines.append(f"| {arm} | {beta:g} | " + " | ".join(fmt(cell(recs, arm, beta, k)) for k, _ in COLUMNS)
                             + " |")
    found = claims(recs, betas)
    lines += ["", "## Claims", "", f"| the paper says | at | margin δ | verdict (95% CI) | Holm-adjusted ({len(found)} "
              "claims) | mean ± 95% CI half-width of the paired difference |", "|---|---|---|---|---|---|"]
    lines += [claim_row(c) for c in found]
    lines += ["", "Verdict rule (one rule; the first line that applies): with [lo, hi] the 95% t-interval (exact t "
              "quantiles, df = seeds − 1) of the paired difference (per seed; for a claim over every β, each seed's mean over "
              "β: one seed's runs share initialisation and sampling seeds at every β), oriented so the paper's side is "
              "positive, and δ the "
              "claim's margin (fixed in comedy.MARGINS before the data: " + ", ".join(f"{k} {v:g}" for k, v in
              MARGINS.items()) + "): a claimed direction **holds** if lo > 0 and hi ≥ δ; **holds, but smaller than "
              "the margin** if lo > 0 and hi < δ (significant, not practical); **does not hold: the opposite** if "
              "hi < 0; **does not hold: no practical difference** if −δ < lo and hi < δ; else **cannot tell**. A "
              "claimed match holds if −δ < lo and hi < δ, does not hold if lo > δ or hi < −δ, else cannot tell. "
              "The Holm column applies the same rule with each claim's interval widened to Holm's step-down level "
              "across the claims of this table (p-values: two-sided t-test for a direction, TOST for a match), so "
              "the chance that any \"holds\" in it is false stays at 5% (a wider interval can turn \"smaller than the margin\" "
              "into a plain \"holds\": still significant, its size no longer shown below δ). Differences are paired by "
              "seed and β; the "
              "`none` arm has no β: it is one run per seed, compared with every β. \"~N seeds would settle it\": the "
              "seeds at which the interval, at the measured mean and spread, would exclude 0 or fit inside ±δ."]
    return "\n".join(lines) + "\n"


def curves(out, folders, betas, arms, setup, recs):
    """curves.png: per β, the training curves (seeds thin, their mean bold, a band of the mean's 95% t-interval over
    seeds) and the final greedy accuracy of every run as a point per seed (in domain filled, OOD hollow), on [0, 1]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("reward", "train reward", "mean reward (0-1)"), ("token_rkl", "exact token KL(π‖π_ref)", "nats / token"),
            ("entropy", "entropy", "nats / token")]
    fig, axes = plt.subplots(len(betas), len(keys) + 1, figsize=(19, 3.8 * len(betas)), squeeze=False)
    colors = dict(zip(ARMS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for i, beta in enumerate(betas):
        for j, (key, title, unit) in enumerate(keys):
            ax = axes[i, j]
            for arm in arms:
                runs = [f for (a, b, _), f in folders.items() if a == arm and (b == beta or a == "none")]
                series = [moving_average([r[key] for r in read_metrics(f, "train")], 5) for f in runs]
                if not series:
                    continue
                for s in series:
                    ax.plot(s, color=colors[arm], lw=0.5, alpha=0.35)
                n = min(map(len, series))
                stats = [mean_ci([s[t] for s in series]) for t in range(n)]
                ax.plot([m for m, _ in stats], color=colors[arm], lw=2, label=arm)
                if len(series) >= 3:                 # 2 seeds' t-interval (t = 12.7) spans more than the data
                    top = 1.0 if key == "reward" else math.inf             # every quantity here is >= 0
                    ax.fill_between(range(n), [max(0.0, m - h) for m, h in stats], [min(top, m + h) for m, h in stats],
                                    color=colors[arm], alpha=0.12, lw=0)
            ax.set(title=f"{title}, β = {beta:g}", xlabel="step", ylabel=unit)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
        ax, ran = axes[i, -1], [a for a in arms if cell(recs, a, beta, "in_greedy")]   # a second β runs fewer arms
        for k, arm in enumerate(ran):
            for tag in ("in", "ood"):
                ys = cell(recs, arm, beta, f"{tag}_greedy")
                x = k + (0.15 if tag == "ood" else -0.15)
                ax.scatter([x] * len(ys), ys, s=18, color=colors[arm],
                           facecolors=colors[arm] if tag == "in" else "none")
                ax.hlines(sum(ys) / len(ys), x - 0.12, x + 0.12, color=colors[arm], lw=2)
        ax.set(title=f"final greedy accuracy, β = {beta:g}", ylim=(0, 1), xticks=range(len(ran)),
               ylabel="accuracy (• in domain, ○ OOD; bar = mean)")
        ax.set_xticklabels(ran, rotation=30, fontsize=7)
    fig.suptitle(f"KL arms, {setup['in_task']} ({'the tiny model' if setup is SETUPS['tiny'] else 'SmolLM2-135M'}): "
                 "seeds thin, mean bold, band = 95% t-interval of the mean over seeds (from 3 seeds on, within the "
                 "quantity's range; 5-step moving average)")
    fig.tight_layout()
    with open_nofollow(os.path.join(out, "curves.png"), "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def base_accuracy(args):
    """The base model before RL, on the same problems (one eval.py call, cached in --out)."""
    path = os.path.join(args.out, "base-eval.json")
    if not _parses(path):
        if os.path.lexists(path):                 # a torn write of ours: eval.py keeps a non-result --out safe
            os.remove(path)
        subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--tasks", f"{args.in_task},{args.ood_task}",
                        "--samples", str(args.setup["samples"]), "--temperature", str(args.setup["temperature"]),
                        "--limit", str(args.eval_n),
                        *args.setup["eval"], "--out", rel(path)], check=True, stdout=subprocess.DEVNULL, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, preexec_fn=die_with_parent)
    ev = json.load(open(path))["tasks"]
    return {"in": ev[args.in_task]["metrics"]["greedy acc"]["mean"], "in_n": len(ev[args.in_task]["problems"]),
            "ood": ev[args.ood_task]["metrics"]["greedy acc"]["mean"], "ood_n": len(ev[args.ood_task]["problems"])}


def _parses(path):
    try:
        return "tasks" in json.load(open(path))
    except (OSError, ValueError):
        return False


def rel(path):
    """Paths handed to train.py / eval.py (run from the repository root): relative inside the repository, so the
    committed run folders, logs and results name no machine."""
    r = os.path.relpath(os.path.abspath(path), ROOT)
    return os.path.abspath(path) if r.startswith("..") else r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", default="tiny", choices=tuple(SETUPS),
                    help="tiny: the shipped model on arith / arith_spaced; smollm2: the real model (real_model.py) "
                         "on arith_q / mul_q with --preset smollm2-cpu")
    ap.add_argument("--out", help="study folder (default results/comedy, results/comedy-smollm2)")
    ap.add_argument("--arms", nargs="+", choices=ARMS, help="KL arms (train.py --kl values; default: the setup's)")
    ap.add_argument("--betas", nargs="+", type=float, help="β grid (none ignores it; default: the setup's)")
    ap.add_argument("--seeds", nargs="+", type=int, help="training seeds (default: the setup's)")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default: the setup's)")
    ap.add_argument("--eval-n", type=int, help="held-out problems per task (default: the setup's)")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread each)")
    ap.add_argument("--smoke", action="store_true", help="2 arms × 1 β × 1 seed × 3 steps on 40 problems (tests)")
    ap.add_argument("--report", action="store_true", help="run nothing: summarise the finished runs in --out (a study "
                    "still running, or one of an older commit) into summary.md, runs.jsonl and curves.png")
    ap.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[], help="passed on to train.py (last)")
    args = ap.parse_args(argv)
    args.setup = setup = SETUPS[args.setup]
    args.in_task, args.ood_task = setup["in_task"], setup["ood_task"]
    args.beta_arms = setup.get("beta_arms", {}) if args.betas is None else {}   # an explicit --betas: every arm
    for key in ("arms", "betas", "seeds", "steps", "eval_n"):
        if getattr(args, key) is None:
            setattr(args, key, list(setup[key]) if isinstance(setup[key], tuple) else setup[key])
    args.out = args.out or os.path.join(ROOT, "results", setup["out"])
    if args.smoke:
        args.arms, args.betas, args.seeds, args.steps, args.eval_n = ["k1-in-reward", "k3-in-loss"], [0.3], [0], 3, 40
        args.beta_arms = {}
        args.train_flags = ["--prompts-per-step", "4", *args.train_flags]
    if args.jobs < 1 or (args.steps is not None and args.steps < 1) or args.eval_n < 4 or min(args.betas) < 0:
        ap.error("need --jobs >= 1, --steps >= 1, --eval-n >= 4 and β >= 0")
    command = "python tools/comedy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    try:                                       # one writer per study folder, as per run folder (issue 26)
        lock_run(args.out, names=STUDY_FILES, what="study folder")
    except (ValueError, OSError) as e:
        print(f"comedy.py: error: {e}", file=sys.stderr)
        return 2
    todo = grid(args)
    done = [f for f in (os.path.join(args.out, "runs", f"{a}-b{b:g}-s{s}") for a, b, s in todo) if finished(f)]
    if args.report:                                # the grid shrinks to what finished; nothing is trained or evaluated
        todo = [k for k in todo if finished(os.path.join(args.out, "runs", f"{k[0]}-b{k[1]:g}-s{k[2]}"))]
        if not todo or not _parses(os.path.join(args.out, "base-eval.json")):
            ap.error(f"--report: {args.out} holds no finished runs or no base-eval.json")
        args.arms = [a for a in args.arms if any(k[0] == a for k in todo)]
        args.betas = sorted({k[1] for k in todo if k[0] != "none"}) or args.betas
    if done and len(done) < len(todo):             # before hours of new runs: would they mix with these?
        from tools.provenance import code_version
        (commit, dirty), now = one_version(done, f"{args.out}/runs"), code_version()
        if (commit, dirty) != now:
            sys.exit(f"comedy.py: error: the {len(done)} finished runs in {args.out}/runs come from code "
                     f"{commit}{'-dirty' if dirty else ''}, this checkout is {now[0]}{'-dirty' if now[1] else ''}; "
                     "a study is one code version: use a fresh --out or check out that commit")
    base = base_accuracy(args)
    print(f"comedy.py: {len(todo)} runs in {args.out}/runs ({len(done)} finished, {args.jobs} at a time)",
          file=sys.stderr)
    pool, folders = ThreadPoolExecutor(args.jobs), {}
    try:                                          # seed by seed: an interrupted study has whole seeds of every arm
        futures = {pool.submit(run_one, args, *key): key for key in sorted(todo, key=lambda k: k[2])}
        pending = set(futures)
        while pending:                            # a line per finished run, and one a minute on the running ones
            done_now, pending = wait(pending, timeout=60, return_when=FIRST_COMPLETED)
            for fut in done_now:
                key = futures[fut]
                folders[key] = fut.result()
                print(f"comedy.py: [{len(folders)}/{len(todo)}] {key[0]} β={key[1]:g} seed {key[2]} done "
                      f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
            if pending and not done_now:
                print(f"comedy.py: {len(folders)}/{len(todo)} runs done ({time.time() - t0:.0f} s); running: "
                      + ", ".join(progress(args, futures[f]) for f in pending if f.running()), file=sys.stderr,
                      flush=True)
    except KeyboardInterrupt:                     # the runs' processes get SIGTERM with us and checkpoint (train.py)
        print(f"comedy.py: interrupted after {len(folders)} of {len(todo)} runs; finished runs are kept and the others "
              "resume from their last checkpoint: run the same command again", file=sys.stderr, flush=True)
        os._exit(130)
    except (RuntimeError, ValueError, OSError) as e:   # a failed run, a planted link: one line, the others finish
        pool.shutdown(cancel_futures=True)
        print(f"comedy.py: error: {e}", file=sys.stderr)
        return 1
    pool.shutdown()
    version = one_version(folders.values(), f"{args.out}/runs")
    recs = [run_record(folders[key], *key) for key in todo]
    write_atomic(os.path.join(args.out, "runs.jsonl"), "".join(json.dumps(r) + "\n" for r in recs))
    cpu = sum(r["train_seconds"] + r["eval_seconds"] for r in recs) / 60
    wall = (f"code {version[0] or 'outside git'}{' with uncommitted changes' if version[1] else ''}; "
            f"{cpu:.0f} min of train + eval over all runs (one thread each; {os.cpu_count()} cores)")
    text = summary(recs, args, base, command.strip(), wall)
    write_atomic(os.path.join(args.out, "summary.md"), text)
    curves(args.out, folders, args.betas, args.arms, setup, recs)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
