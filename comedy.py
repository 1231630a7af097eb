"""comedy.py -- the paper's study at toy scale: KL arms × β × seeds on a CPU, with 95% CIs, in and out of domain.

What it runs: train.py on the shipped tiny model and its `arith` task for every arm in ARMS, every β and every
seed (the `none` arm has no β, so it runs once per seed and is reported as β = 0), then eval.py on each final
adapter, in domain (`arith`) and out of domain (OOD, `arith_spaced`: the same held-out problems written "a + b ="),
greedy and n = 4 samples at T = 1 (pass@1 and unbiased pass@4). Then it aggregates over seeds and checks each of
the paper's claims (CLAIMS below), saying for each: holds / does not hold / cannot tell at this scale.

Simplifications: the paper's 7B models, MATH and 250 steps become a 0.5M-parameter model, 2-digit addition and
150 steps; CIs are over training seeds (t-interval on the seed means), the only randomness the paper's claims are
about. "Collapse" and "instability" are measured by the final accuracy and by the largest drop of the training
reward (5-step moving average, from its running maximum).

Commands
  python comedy.py                      # the full study: 6 arms × β {0.05, 0.3, 1.0} × 3 seeds, 2 jobs (see README)
  python comedy.py --jobs 1 --seeds 0 1 2 3 4
  python comedy.py --smoke --out /tmp/c # 2 arms × 1 β × 1 seed × 3 steps: what the tests run
Re-running skips finished runs (a run is finished when its eval.json exists; an interrupted one resumes from its
last checkpoint), so an interrupted study continues where it stopped.
Outputs in --out (default results/comedy/): runs/<arm>-b<β>-s<seed>/ (train.py run folders with eval.json),
runs.jsonl (one line per run: its config and final metrics), summary.md (tables and the claims), curves.png.
"""
import argparse
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from run_folder import moving_average, read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS = ("none", "k1-in-reward", "k1-in-loss", "k3-in-reward", "k3-in-loss", "k3-in-both")
IN, OOD = "arith", "arith_spaced"
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}  # t_{0.975, df}
MARGIN = 0.02      # accuracy differences smaller than this count as "the same" (2 of 100 problems)


# ---------------------------------------------------------------------------------------------------------
# Running: one train.py + eval.py per (arm, β, seed), in parallel processes, skipping finished runs
# ---------------------------------------------------------------------------------------------------------
def die_with_parent():
    """Child processes get SIGTERM when comedy.py dies, even by SIGKILL (Linux parent-death signal)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def grid(args):
    runs = [("none", 0.0, s) for s in args.seeds] if "none" in args.arms else []
    return runs + [(a, b, s) for a in args.arms if a != "none" for b in args.betas for s in args.seeds]


def run_one(args, arm, beta, seed):
    """Train (or resume) and evaluate one run; -> its folder. Output goes to <folder>/log.txt."""
    folder = os.path.join(args.out, "runs", f"{arm}-b{beta:g}-s{seed}")
    if os.path.isfile(os.path.join(folder, "eval.json")):
        return folder                                                    # finished earlier
    has_ckpt = any(os.path.isfile(os.path.join(folder, c, "state.pt")) for c in ("checkpoint", "checkpoint.old"))
    if has_ckpt:
        train = ["--resume", folder]
    else:
        subprocess.run(["rm", "-rf", folder], check=True)               # started but never checkpointed
        train = ["--out", folder, "--kl", arm, "--beta", str(beta), "--seed", str(seed), "--steps", str(args.steps),
                 "--eval-every", "0", "--eval-n", str(args.eval_n), "--eval-tasks", IN, OOD, "--save-every", "25",
                 "--threads", "1", *args.train_flags]
    evaluate = ["--adapter", folder, "--tasks", f"{IN},{OOD}", "--samples", "4", "--max-new-tokens", "8",
                "--limit", str(args.eval_n), "--batch-size", "125", "--seed", str(seed),
                "--out", os.path.join(folder, "eval.json")]
    os.makedirs(folder, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(os.path.join(folder, "log.txt"), "a") as log:
        for script, argv in (("train.py", train), ("eval.py", evaluate)):
            p = subprocess.run([sys.executable, os.path.join(HERE, script), *argv], stdout=log, stderr=log, env=env,
                               preexec_fn=die_with_parent)
            if p.returncode:
                raise RuntimeError(f"{script} failed for {folder} (exit {p.returncode}); see {folder}/log.txt")
    return folder


# ---------------------------------------------------------------------------------------------------------
# One run -> one line of runs.jsonl
# ---------------------------------------------------------------------------------------------------------
def run_record(folder, arm, beta, seed):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    train = read_metrics(folder, "train")
    ev = json.load(open(os.path.join(folder, "eval.json")))["tasks"]
    tail = train[-max(1, len(train) // 10):]                             # the last 10% of steps
    reward = moving_average([r["reward"] for r in train], 5)
    peak, drop = -math.inf, 0.0
    for r in reward:                                                     # largest fall from the running maximum
        peak = max(peak, r)
        drop = max(drop, peak - r)
    grad = sorted(r["grad_norm"] for r in train)
    rec = {"arm": arm, "beta": beta, "seed": seed, "steps": len(train), "lr": cfg["lr"], "group_size": cfg["group_size"],
           "reward_drop": drop, "grad_spikes": sum(g > 5 * grad[len(grad) // 2] for g in grad)}
    for key in ("reward", "token_rkl", "token_fkl", "entropy", "kl_k1"):
        rec[key] = sum(r[key] for r in tail) / len(tail)
    for task, tag in ((IN, "in"), (OOD, "ood")):
        m = ev[task]["metrics"]
        rec.update({f"{tag}_greedy": m["greedy acc"]["mean"], f"{tag}_pass1": m["pass@1"]["mean"],
                    f"{tag}_pass4": m["pass@4"]["mean"]})
    return rec


# ---------------------------------------------------------------------------------------------------------
# Statistics over seeds and the paper's claims
# ---------------------------------------------------------------------------------------------------------
def mean_ci(xs):
    """Mean and the half-width of a 95% t-interval over seeds (0 for a single seed: no spread is known)."""
    n, m = len(xs), sum(xs) / len(xs)
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def cell(recs, arm, beta, key):
    beta = 0.0 if arm == "none" else beta
    return [r[key] for r in recs if r["arm"] == arm and r["beta"] == beta]


def paired_diff(recs, a, b, key, betas):
    """Per (β, seed) differences a − b over the β grid: the runs share seed and β, so differences are paired."""
    out = []
    for beta in betas:
        xa = {r["seed"]: r[key] for r in recs if r["arm"] == a and r["beta"] == (0.0 if a == "none" else beta)}
        xb = {r["seed"]: r[key] for r in recs if r["arm"] == b and r["beta"] == (0.0 if b == "none" else beta)}
        out += [xa[s] - xb[s] for s in sorted(xa.keys() & xb.keys())]
    return out


def directional(diffs, margin, sign=+1):
    """A claim that the mean difference has a sign: holds if its 95% CI lies on that side of 0; does not hold if
    it lies on the other side or inside ±margin (no practical difference); else cannot tell."""
    m, h = mean_ci(diffs) if len(diffs) > 1 else ((diffs or [float("nan")])[0], float("nan"))
    if math.isnan(h):
        return "cannot tell at this scale", m, h
    if sign * (m - sign * h) > 0:
        return "holds", m, h
    if sign * (m + sign * h) < 0 or (-margin < m - h and m + h < margin):
        return "does not hold", m, h
    return "cannot tell at this scale", m, h


def equivalent(diffs, margin):
    """A claim that two arms are the same: holds if the 95% CI lies inside ±margin; does not hold if it excludes
    0 by more than the margin allows; else cannot tell."""
    m, h = mean_ci(diffs) if len(diffs) > 1 else ((diffs or [float("nan")])[0], float("nan"))
    if math.isnan(h):
        return "cannot tell at this scale", m, h
    if -margin < m - h and m + h < margin:
        return "holds", m, h
    if m - h > margin or m + h < -margin:
        return "does not hold", m, h
    return "cannot tell at this scale", m, h


def claims(recs, betas):
    """Each of the paper's empirical claims -> (claim, verdict, the numbers that decide it)."""
    lo, hi = min(betas), max(betas)
    k1r_k3l = {t: paired_diff(recs, "k1-in-reward", "k3-in-loss", f"{t}_greedy", betas) for t in ("in", "ood")}
    tests = [
        ("K3-in-reward collapses: its final greedy accuracy falls below no-KL's",
         directional(paired_diff(recs, "k3-in-reward", "none", "in_greedy", [hi]), MARGIN, -1),
         f"k3-in-reward − none, in domain, β = {hi:g}"),
        ("K1-in-loss becomes unstable as β grows: a larger drop of the training reward",
         directional([a - b for a, b in zip(cell(recs, "k1-in-loss", hi, "reward_drop"),
                                            cell(recs, "k1-in-loss", lo, "reward_drop"))], 0.01),
         f"largest reward drop at β = {hi:g} − at β = {lo:g}"),
        ("K3-in-loss is worse than K1-in-reward in domain",
         directional(k1r_k3l["in"], MARGIN), "greedy accuracy, k1-in-reward − k3-in-loss, every β and seed"),
        ("K3-in-loss is worse than K1-in-reward out of domain",
         directional(k1r_k3l["ood"], MARGIN), "OOD greedy accuracy, k1-in-reward − k3-in-loss, every β and seed"),
        ("... and the gap is largest out of domain",
         directional([o - i for o, i in zip(k1r_k3l["ood"], k1r_k3l["in"])], MARGIN), "OOD gap − in-domain gap"),
        (f"K3-in-both matches K1-in-reward (within ±{MARGIN})",
         equivalent(paired_diff(recs, "k3-in-both", "k1-in-reward", "in_greedy", betas), MARGIN),
         "greedy accuracy, k3-in-both − k1-in-reward, every β and seed"),
        ("Lower β does better",
         directional([a - b for a, b in zip(cell(recs, "k1-in-reward", lo, "in_greedy"),
                                            cell(recs, "k1-in-reward", hi, "in_greedy"))], MARGIN),
         f"k1-in-reward greedy accuracy, β = {lo:g} − β = {hi:g}"),
        ("K3-in-loss keeps a higher entropy than K1-in-reward (forward-KL-like, mass-covering)",
         directional(paired_diff(recs, "k3-in-loss", "k1-in-reward", "entropy", betas), 0.005),
         "entropy (nats/token, last 10% of steps), k3-in-loss − k1-in-reward, every β and seed"),
    ]
    return [(text, v, f"{m:+.3f} ± {h:.3f} ({what})") for text, (v, m, h), what in tests]


# ---------------------------------------------------------------------------------------------------------
# Report: summary.md and curves.png
# ---------------------------------------------------------------------------------------------------------
COLUMNS = [("in_greedy", "in greedy"), ("in_pass1", "in pass@1"), ("ood_greedy", "OOD greedy"),
           ("ood_pass1", "OOD pass@1"), ("token_rkl", "token KL(π‖ref)"), ("token_fkl", "token KL(ref‖π)"),
           ("entropy", "entropy"), ("reward_drop", "reward drop")]


def summary(recs, betas, base, command, wall):
    def fmt(xs):
        m, h = mean_ci(xs)
        return f"{m:.3f}" if math.isnan(h) else f"{m:.3f} ± {h:.3f}"
    seeds = sorted({r["seed"] for r in recs})
    lines = ["# The paper's claims at toy scale", "",
             f"`{command}` — {len(recs)} runs ({len(seeds)} seed{'s' * (len(seeds) > 1)}), {wall}. Mean ± 95% CI half-width over seeds; "
             f"accuracy on {base['n']} held-out problems per task; KLs and entropy are means over the last 10% of "
             f"training steps. Base model before RL: in-domain greedy {base['in']:.3f}, OOD greedy {base['ood']:.3f}.",
             "", "| arm | β | " + " | ".join(c for _, c in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for arm in ARMS:
        for beta in ([0.0] if arm == "none" else betas):
            if cell(recs, arm, beta, "in_greedy"):
                lines.append(f"| {arm} | {beta:g} | " + " | ".join(fmt(cell(recs, arm, beta, k)) for k, _ in COLUMNS)
                             + " |")
    lines += ["", "## Claims", "", "| the paper says | at this scale | numbers (mean ± 95% CI half-width) |",
              "|---|---|---|"]
    lines += [f"| {c} | **{v}** | {n} |" for c, v, n in claims(recs, betas)]
    lines += ["", "Verdicts: for a claimed direction, **holds** = the 95% CI of the paired difference lies on the "
              "paper's side of 0, **does not hold** = on the other side or within ±0.02 accuracy (no practical "
              "difference); for a claimed match, **holds** = the CI lies within ±0.02. Otherwise **cannot tell at "
              "this scale** (more seeds would narrow it). Differences are paired by β and seed. The `none` arm has "
              "no β: it is one run per seed, compared with every β."]
    return "\n".join(lines) + "\n"


def curves(out, folders, betas):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("reward", "train reward"), ("token_rkl", "exact token KL(π‖π_ref)"), ("entropy", "entropy")]
    fig, axes = plt.subplots(len(betas), len(keys), figsize=(15, 3.6 * len(betas)), squeeze=False)
    colors = dict(zip(ARMS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for i, beta in enumerate(betas):
        for j, (key, title) in enumerate(keys):
            ax = axes[i, j]
            for arm in ARMS:
                runs = [f for (a, b, _), f in folders.items() if a == arm and (b == beta or a == "none")]
                series = [[r[key] for r in read_metrics(f, "train")] for f in runs]
                if not series:
                    continue
                for s in series:
                    ax.plot(moving_average(s, 5), color=colors[arm], lw=0.5, alpha=0.35)
                n = min(map(len, series))
                mean = [sum(s[t] for s in series) / len(series) for t in range(n)]
                ax.plot(moving_average(mean, 5), color=colors[arm], lw=2, label=arm)
            ax.set(title=f"{title}, β = {beta:g}", xlabel="step")
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle("KL arms on the tiny task: seeds thin, mean bold (5-step moving average)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def base_accuracy(args):
    """The shipped model before RL, on the same problems (one eval.py call, cached in --out)."""
    path = os.path.join(args.out, "base-eval.json")
    if not os.path.isfile(path):
        subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), "--tasks", f"{IN},{OOD}", "--samples", "4",
                        "--max-new-tokens", "8", "--limit", str(args.eval_n), "--batch-size", "125", "--out", path],
                       check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       preexec_fn=die_with_parent)
    ev = json.load(open(path))["tasks"]
    return {"in": ev[IN]["metrics"]["greedy acc"]["mean"], "ood": ev[OOD]["metrics"]["greedy acc"]["mean"],
            "n": args.eval_n}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "comedy"), help="study folder")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="KL arms (train.py --kl values)")
    ap.add_argument("--betas", nargs="+", type=float, default=[0.05, 0.3, 1.0], help="β grid (none ignores it)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    ap.add_argument("--eval-n", type=int, default=500, help="held-out problems per task")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread each)")
    ap.add_argument("--smoke", action="store_true", help="2 arms × 1 β × 1 seed × 3 steps on 40 problems (tests)")
    ap.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[], help="passed on to train.py (last)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.arms, args.betas, args.seeds, args.steps, args.eval_n = ["k1-in-reward", "k3-in-loss"], [0.3], [0], 3, 40
        args.train_flags = ["--prompts-per-step", "4", *args.train_flags]
    if args.jobs < 1 or args.steps < 1 or args.eval_n < 4 or min(args.betas) < 0:
        ap.error("need --jobs >= 1, --steps >= 1, --eval-n >= 4 and β >= 0")
    command = "python comedy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    base = base_accuracy(args)
    todo = grid(args)
    print(f"comedy.py: {len(todo)} runs in {args.out}/runs ({args.jobs} at a time; finished ones are skipped)",
          file=sys.stderr)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {key: pool.submit(run_one, args, *key) for key in todo}
        folders = {}
        for i, (key, fut) in enumerate(futures.items()):
            folders[key] = fut.result()
            print(f"comedy.py: [{i + 1}/{len(todo)}] {key[0]} β={key[1]:g} seed {key[2]} done "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    recs = [run_record(f, *key) for key, f in folders.items()]
    with open(os.path.join(args.out, "runs.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    wall = f"{(time.time() - t0) / 60:.1f} min wall on {os.cpu_count()} cores for what was not yet finished"
    text = summary(recs, args.betas, base, command.strip(), wall)
    open(os.path.join(args.out, "summary.md"), "w").write(text)
    curves(args.out, folders, args.betas)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
