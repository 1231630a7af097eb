"""comedy.py -- the paper's study at small scale: KL arms × β × seeds on a CPU, with 95% CIs, in and out of domain.

What it runs: train.py for every arm in --arms, every β and every seed (the `none` arm has no β, so it runs once per
seed and is reported as β = 0), then eval.py on each final adapter, in domain and out of domain (OOD), greedy and
n samples (pass@1 and unbiased pass@n; n = 4 on the tiny model, 2 on the real one, whose evaluation costs most). Then it aggregates over seeds and checks each of the paper's claims that
the grid has runs for (CLAIMS below), saying for each: holds / does not hold / cannot tell at this scale.
Two setups (--setup):
  tiny     the shipped 0.5M-parameter model on `arith`; OOD `arith_spaced` (the same held-out problems written
           "a + b ="); 6 arms × β {0.05, 0.3, 1} × 6 seeds, 150 steps, T = 1.
  smollm2  the real SmolLM2-135M-Instruct (real_model.py) with --preset smollm2-cpu on `arith_q`; OOD `mul_q` (the
           times table: a skill RL on addition never trains); 6 arms × β 0.05 × 6 seeds, T = 0.7.

Simplifications: the paper's 7B models, MATH and 250 steps become small models, arithmetic and short runs; CIs are
over training seeds (t-interval on the seed means), the only randomness the paper's claims are about. "Collapse"
and "instability" are measured by the final accuracy and by the largest drop of the training reward (5-step moving
average, from its running maximum). A study is one code version: every run records the commit it ran from
(train.py's config.json), and comedy.py refuses to add runs to, or summarise, a study that mixes commits.

Commands
  python comedy.py                      # the tiny study: 6 arms × β {0.05, 0.3, 1.0} × 6 seeds, 2 jobs (see README)
  python comedy.py --setup smollm2      # the real-model study (see README; ~15 h on 2 cores)
  python comedy.py --smoke --out /tmp/c # 2 arms × 1 β × 1 seed × 3 steps: what the tests run
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
from concurrent.futures import ThreadPoolExecutor

from run_folder import die_with_parent, moving_average, read_metrics, write_atomic

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS = ("none", "k1-in-reward", "k1-in-loss", "k3-in-reward", "k3-in-loss", "k3-in-both")
# --setup: the model, its in-domain and out-of-domain tasks, and how runs are trained and evaluated
SETUPS = {
    "tiny": dict(out="comedy", in_task="arith", ood_task="arith_spaced", arms=ARMS, betas=(0.05, 0.3, 1.0),
                 seeds=(0, 1, 2, 3, 4, 5), steps=150, eval_n=500, train=["--save-every", "25"],
                 eval=["--max-new-tokens", "8", "--batch-size", "125"], samples=4, temperature=1.0),
    # the real model (real_model.py) on its task, one β where the KL term matters (β·KL ≈ 0.1-0.5 of the reward);
    # --eval-n 0: the runs do no held-out evaluation of their own (their step-0 one is the base evaluation, their
    # last one eval.py's), eval.py evaluates each final adapter on 200 problems per task
    "smollm2": dict(out="comedy-smollm2", in_task="arith_q", ood_task="mul_q", arms=ARMS, betas=(0.05,),
                    seeds=(0, 1, 2, 3, 4, 5), steps=None, eval_n=200,
                    train=["--preset", "smollm2-cpu", "--save-every", "5", "--eval-n", "0"],
                    eval=["--model", "smollm2-135m", "--max-new-tokens", "32", "--batch-size", "50"], samples=2,
                    temperature=0.7),
}
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}  # t_{0.975, df}
MARGIN = 0.02      # accuracy differences smaller than this count as "the same" (2 of 100 problems)


# ---------------------------------------------------------------------------------------------------------
# Running: one train.py + eval.py per (arm, β, seed), in parallel processes, skipping finished runs
# ---------------------------------------------------------------------------------------------------------
def grid(args):
    runs = [("none", 0.0, s) for s in args.seeds] if "none" in args.arms else []
    return runs + [(a, b, s) for a in args.arms if a != "none" for b in args.betas for s in args.seeds]


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
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(os.path.join(folder, "log.txt"), "a") as log:
        for script, argv in (("train.py", train), ("eval.py", evaluate)):
            p = subprocess.run([sys.executable, os.path.join(HERE, script), *argv], stdout=log, stderr=log, env=env,
                               cwd=HERE, preexec_fn=die_with_parent)
            if p.returncode:
                raise RuntimeError(f"{script} failed for {folder} (exit {p.returncode}); see {folder}/log.txt")
    return folder


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
                    f"{tag}_pass{n}": m[f"pass@{n}"]["mean"]})
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
    """Each of the paper's empirical claims the study has the runs for -> (claim, verdict, the numbers that decide
    it). A claim about β needs two β values; one about an arm needs its runs (the real-model study has 5 arms, 1 β)."""
    lo, hi = min(betas), max(betas)
    k1r_k3l = {t: paired_diff(recs, "k1-in-reward", "k3-in-loss", f"{t}_greedy", betas) for t in ("in", "ood")}
    between_betas = lambda arm, key: [a - b for a, b in zip(cell(recs, arm, lo, key), cell(recs, arm, hi, key))] \
        if lo < hi else []                                                                          # noqa: E731
    tests = [   # (claim, verdict rule, its paired differences, what they are)
        ("K3-in-reward collapses: its final greedy accuracy falls below no-KL's", directional, -1, MARGIN,
         paired_diff(recs, "k3-in-reward", "none", "in_greedy", [hi]), f"k3-in-reward − none, in domain, β = {hi:g}"),
        ("K1-in-loss becomes unstable as β grows: a larger drop of the training reward", directional, 1, 0.01,
         [-d for d in between_betas("k1-in-loss", "reward_drop")], f"largest reward drop at β = {hi:g} − at β = {lo:g}"),
        ("K3-in-loss is worse than K1-in-reward in domain", directional, 1, MARGIN, k1r_k3l["in"],
         "greedy accuracy, k1-in-reward − k3-in-loss, every β and seed"),
        ("K3-in-loss is worse than K1-in-reward out of domain", directional, 1, MARGIN, k1r_k3l["ood"],
         "OOD greedy accuracy, k1-in-reward − k3-in-loss, every β and seed"),
        ("... and the gap is largest out of domain", directional, 1, MARGIN,
         [o - i for o, i in zip(k1r_k3l["ood"], k1r_k3l["in"])], "OOD gap − in-domain gap"),
        (f"K3-in-both matches K1-in-reward (within ±{MARGIN})", equivalent, 0, MARGIN,
         paired_diff(recs, "k3-in-both", "k1-in-reward", "in_greedy", betas),
         "greedy accuracy, k3-in-both − k1-in-reward, every β and seed"),
        ("Lower β does better", directional, 1, MARGIN, between_betas("k1-in-reward", "in_greedy"),
         f"k1-in-reward greedy accuracy, β = {lo:g} − β = {hi:g}"),
        ("K3-in-loss keeps a higher entropy than K1-in-reward (forward-KL-like, mass-covering)", directional, 1, 0.005,
         paired_diff(recs, "k3-in-loss", "k1-in-reward", "entropy", betas),
         "entropy (nats/token, last 10% of steps), k3-in-loss − k1-in-reward, every β and seed"),
    ]
    out = []
    for text, rule, sign, margin, diffs, what in tests:
        if diffs:
            v, m, h = rule(diffs, margin, sign) if rule is directional else rule(diffs, margin)
            out.append((text, v, f"{m:+.3f} ± {h:.3f} ({what})"))
    return out


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
    lines = [f"# The paper's claims at {'toy' if args.setup is SETUPS['tiny'] else 'small real-model'} scale", "",
             f"`{command}` — {len(recs)} runs ({len(seeds)} seed{'s' * (len(seeds) > 1)}); {wall}. Mean ± 95% CI "
             f"half-width over seeds; accuracy on {base['n']} held-out problems per task (in domain `{args.in_task}`, "
             f"out of domain `{args.ood_task}`: at most {base['n']}), greedy and pass@1 of {args.setup['samples']} "
             f"samples at T = {args.setup['temperature']:g}; KLs and entropy are means over the last 10% of training steps. Base "
             f"model before RL: in-domain greedy {base['in']:.3f}, OOD greedy {base['ood']:.3f}.",
             "", "| arm | β | " + " | ".join(c for _, c in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for arm in args.arms:
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


def curves(out, folders, betas, arms, setup):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("reward", "train reward"), ("token_rkl", "exact token KL(π‖π_ref)"), ("entropy", "entropy")]
    fig, axes = plt.subplots(len(betas), len(keys), figsize=(15, 3.6 * len(betas)), squeeze=False)
    colors = dict(zip(ARMS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for i, beta in enumerate(betas):
        for j, (key, title) in enumerate(keys):
            ax = axes[i, j]
            for arm in arms:
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
    fig.suptitle(f"KL arms, {setup['in_task']} ({'the tiny model' if setup is SETUPS['tiny'] else 'SmolLM2-135M'}): "
                 "seeds thin, mean bold (5-step moving average)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def base_accuracy(args):
    """The base model before RL, on the same problems (one eval.py call, cached in --out)."""
    path = os.path.join(args.out, "base-eval.json")
    if not _parses(path):
        subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), "--tasks", f"{args.in_task},{args.ood_task}",
                        "--samples", str(args.setup["samples"]), "--temperature", str(args.setup["temperature"]),
                        "--limit", str(args.eval_n),
                        *args.setup["eval"], "--out", rel(path)], check=True, stdout=subprocess.DEVNULL, cwd=HERE,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, preexec_fn=die_with_parent)
    ev = json.load(open(path))["tasks"]
    return {"in": ev[args.in_task]["metrics"]["greedy acc"]["mean"], "n": args.eval_n,
            "ood": ev[args.ood_task]["metrics"]["greedy acc"]["mean"]}


def _parses(path):
    try:
        return "tasks" in json.load(open(path))
    except (OSError, ValueError):
        return False


def rel(path):
    """Paths handed to train.py / eval.py (run from the repository root): relative inside the repository, so the
    committed run folders, logs and results name no machine."""
    r = os.path.relpath(os.path.abspath(path), HERE)
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
    ap.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[], help="passed on to train.py (last)")
    args = ap.parse_args(argv)
    args.setup = setup = SETUPS[args.setup]
    args.in_task, args.ood_task = setup["in_task"], setup["ood_task"]
    for key in ("arms", "betas", "seeds", "steps", "eval_n"):
        if getattr(args, key) is None:
            setattr(args, key, list(setup[key]) if isinstance(setup[key], tuple) else setup[key])
    args.out = args.out or os.path.join(HERE, "results", setup["out"])
    if args.smoke:
        args.arms, args.betas, args.seeds, args.steps, args.eval_n = ["k1-in-reward", "k3-in-loss"], [0.3], [0], 3, 40
        args.train_flags = ["--prompts-per-step", "4", *args.train_flags]
    if args.jobs < 1 or (args.steps is not None and args.steps < 1) or args.eval_n < 4 or min(args.betas) < 0:
        ap.error("need --jobs >= 1, --steps >= 1, --eval-n >= 4 and β >= 0")
    command = "python comedy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    todo = grid(args)
    done = [f for f in (os.path.join(args.out, "runs", f"{a}-b{b:g}-s{s}") for a, b, s in todo) if finished(f)]
    if done and len(done) < len(todo):             # before hours of new runs: would they mix with these?
        from run_folder import code_version
        (commit, dirty), now = one_version(done, f"{args.out}/runs"), code_version()
        if (commit, dirty) != now:
            sys.exit(f"comedy.py: error: the {len(done)} finished runs in {args.out}/runs come from code "
                     f"{commit}{'-dirty' if dirty else ''}, this checkout is {now[0]}{'-dirty' if now[1] else ''}; "
                     "a study is one code version: use a fresh --out or check out that commit")
    base = base_accuracy(args)
    print(f"comedy.py: {len(todo)} runs in {args.out}/runs ({len(done)} finished, {args.jobs} at a time)",
          file=sys.stderr)
    with ThreadPoolExecutor(args.jobs) as pool:   # seed by seed: an interrupted study has whole seeds of every arm
        futures = {key: pool.submit(run_one, args, *key) for key in sorted(todo, key=lambda k: k[2])}
        folders = {}
        for i, (key, fut) in enumerate(futures.items()):
            folders[key] = fut.result()
            print(f"comedy.py: [{i + 1}/{len(todo)}] {key[0]} β={key[1]:g} seed {key[2]} done "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    version = one_version(folders.values(), f"{args.out}/runs")
    recs = [run_record(folders[key], *key) for key in todo]
    write_atomic(os.path.join(args.out, "runs.jsonl"), "".join(json.dumps(r) + "\n" for r in recs))
    cpu = sum(r["train_seconds"] + r["eval_seconds"] for r in recs) / 60
    wall = (f"code {version[0] or 'outside git'}{' with uncommitted changes' if version[1] else ''}; "
            f"{cpu:.0f} min of train + eval over all runs (one thread each; {os.cpu_count()} cores)")
    text = summary(recs, args, base, command.strip(), wall)
    write_atomic(os.path.join(args.out, "summary.md"), text)
    curves(args.out, folders, args.betas, args.arms, setup)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
