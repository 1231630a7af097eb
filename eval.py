"""eval.py -- held-out evaluation with error bars: greedy accuracy, unbiased pass@k, bootstrap CIs, paired compare.

What it implements
  For every task (problems and graders come from tasks.py: load_task(name, "test"), reward) it generates, per
  problem, one greedy completion and n samples (--samples, default 8 as in the README's tables) at temperature T,
  from the base model or from base + a saved LoRA adapter, with the same chat template either way
  (tasks.build_prompt). Per task it reports
    greedy acc       fraction of problems whose greedy completion is correct (the low-noise number the paper's
                     reviewers asked for, next to T=1 pass@1)
    pass@k           unbiased estimator (Chen et al. 2021) for every k <= n: per problem 1 - C(n-c, k)/C(n, k),
                     with c the correct samples, averaged over problems; pass@1 is the mean sample accuracy
    95% CI           percentile bootstrap over problems (resample problems with replacement, 1000 times, seeded)
    len, trunc       mean completion length in tokens (EOS included) and the fraction that hit --max-new-tokens
  --compare puts result files side by side and gives, for each file against the first, B - A with a *paired*
  bootstrap: one resampling of problem indices shared by both files, i.e. a bootstrap of the per-problem
  differences. It is much tighter than two overlapping independent CIs, because problem difficulty cancels.

Tables
  Columns are letters: A is the first file (or the only model), B, C, ... the others; a legend above the tables names
  each (run, file, model, adapter, n, T), and "B − A" is the paired difference. A * marks a difference whose 95% CI
  excludes 0 and whose size is at least MIN_DIFF = 0.01 (1 token for lengths): with many problems a negligible
  difference can exclude 0 too. A line under the tables says so. A task on which every model scores 0.000 on greedy
  acc and every pass@k gets a note: it is out of reach for these models, and its zero differences mean nothing.

Simplifications
  - HF generate only (policy.rollout), true sampling: no top-k/top-p, so T=1 samples are the trained policy.
  - The CIs cover the choice of problems and samples, not of training seeds: train several seeds and --compare
    their files. Percentile CIs are too narrow when there are few problems and accuracy is near 0 or 1.
  - Per-problem records (correct flags, lengths, greedy text) are saved so everything can be re-aggregated;
    --compare recomputes all numbers from them.

Commands
  python eval.py                      # offline CPU demo (<1 min): assets/tiny-arith vs the latest run in runs/
  python eval.py --adapter runs/NAME --tasks arith,arith_spaced --samples 8    # base model read from the run
  python eval.py --model Qwen/Qwen2.5-7B --tasks math500,mmlu_college_physics --samples 4 --temperature 1.0 \
      --max-new-tokens 1024 --batch-size 16 --load-in-4bit
  python eval.py --compare eval-results/Qwen2.5-7B-math500.json runs/k1-in-reward runs/k3-in-loss
Output: one JSON per evaluation (default: RUN_DIR/eval-<tasks>.json, or eval-results/<model>-<tasks>.json) and a
markdown table on stdout. Bad input (unknown task, missing adapter, adapter of another base model, a malformed
adapter_config.json or one whose LoRA rank exceeds the smallest adapted layer) exits 2 with one line.
"""
import argparse
import contextlib
import glob
import json
import os
import pickle
import platform
import subprocess
import sys
import time
import warnings
from importlib import metadata

import numpy as np

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")   # peft/transformers version noise

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "assets", "tiny-arith")
SAMPLES = 8   # n samples per problem by default: the README's tables use n = 8 at T = 1
DEMO = ["--tasks", "arith,arith_spaced,arith_ood", "--samples", str(SAMPLES), "--max-new-tokens", "12",
        "--batch-size", "100"]
# A * on a difference needs its paired 95% CI to exclude 0 *and* a size that matters: with many problems the CI of a
# negligible difference (0.2 points on 5,000 problems) can exclude 0 too.
MIN_DIFF, MIN_DIFF_LEN = 0.01, 1.0   # accuracy, pass@k and truncation rates; mean lengths (tokens)


def die(msg):
    print(f"eval.py: error: {msg}", file=sys.stderr)   # one line, exit 2: the same contract as argparse errors
    sys.exit(2)


# ---------------------------------------------------------------------------------------------------------
# Statistics (pure numpy; everything below is a mean over problems of a per-problem value)
# ---------------------------------------------------------------------------------------------------------
def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c,k)/C(n,k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i).
    The product form never builds a huge binomial (C(200, 100) overflows a float) and stays exact near 0 and 1."""
    if n - c < k:
        return 1.0   # every k-subset contains a correct sample
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def per_problem(problems):
    """Records -> {metric: (P,) array}. Lengths and truncation are per-problem means, so every metric (and every
    paired difference) is a plain mean over problems and is bootstrapped the same way."""
    n = len(problems[0]["samples"]["correct"])
    g = [p["greedy"] for p in problems]
    cols = {"greedy acc": [float(x["correct"]) for x in g]}
    for k in range(1, n + 1):
        cols[f"pass@{k}"] = [pass_at_k(n, int(sum(p["samples"]["correct"])), k) for p in problems]
    cols["greedy len"] = [float(x["length"]) for x in g]
    cols["greedy trunc"] = [float(x["truncated"]) for x in g]
    if n:
        cols["sample len"] = [float(np.mean(p["samples"]["length"])) for p in problems]
        cols["sample trunc"] = [float(np.mean(p["samples"]["truncated"])) for p in problems]
    return {name: np.asarray(v, dtype=float) for name, v in cols.items()}


def summarize(cols, n_boot=1000, seed=0):
    """{metric: (P,) values} -> {metric: {"mean", "lo", "hi"}} with a 95% percentile bootstrap over problems.
    Every replicate draws P problem indices with replacement; W[b, i] counts how often problem i is drawn in
    replicate b, so the replicate means of all metrics at once are W @ X / P. Passing per-problem differences
    (b_i - a_i) makes this the paired bootstrap of B - A: both files are resampled on the same problems."""
    names = list(cols)
    X = np.stack([cols[m] for m in names], 1)                                        # (P, M)
    P = X.shape[0]
    idx = np.random.default_rng(seed).integers(0, P, size=(n_boot, P))               # (B, P) resampled problems
    W = np.bincount((idx + P * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * P).reshape(n_boot, P)
    lo, hi = np.percentile(W @ X / P, [2.5, 97.5], axis=0)                           # (M,) each
    return {m: {"mean": float(X[:, j].mean()), "lo": float(lo[j]), "hi": float(hi[j])} for j, m in enumerate(names)}


# ---------------------------------------------------------------------------------------------------------
# Generation: greedy + n samples per problem, graded by tasks.reward
# ---------------------------------------------------------------------------------------------------------
def generate_records(model, tok, name, examples, args):
    import torch
    from tqdm import tqdm

    from policy import rollout
    from tasks import build_prompt, reward
    n, bs, records = args.samples, args.batch_size, []

    def grade(out, r, ex):   # row r of a rollout, graded by the task's own reward (never re-implemented here)
        return {"correct": bool(reward(name, out["texts"][r], ex) > 0.5),
                "length": int(out["completion_mask"][r].sum()), "truncated": bool(out["truncated"][r])}
    t0 = last = time.time()
    done = 0                                          # problems at the last progress line
    for b in tqdm(range(0, len(examples), bs), desc=name, unit="batch", disable=None):
        if b and not sys.stderr.isatty() and ((b - done) * 20 >= len(examples) or time.time() - last >= 30):
            done, last = b, time.time()              # a log file: a line every ~5% or ~30 s instead of a bar
            print(f"eval.py: {name} {b}/{len(examples)} problems, {last - t0:.0f} s", file=sys.stderr, flush=True)
        exs = examples[b:b + bs]
        prompts = [build_prompt(tok, ex["question"], args.prompt_format, args.thinking) for ex in exs]
        seed = args.seed * 1_000_003 + b          # seed per batch: the same --seed and --batch-size reproduce all
        with torch.no_grad():
            g = rollout(model, tok, prompts, 1, args.max_new_tokens, 0.0, seed=seed)
            s = rollout(model, tok, prompts, n, args.max_new_tokens, args.temperature, seed=seed) if n else None
        for i, ex in enumerate(exs):
            samples = [grade(s, r, ex) for r in range(i * n, i * n + n)]   # rows i*n .. i*n+n-1: prompt i
            records.append({"id": ex.get("id", b + i), "index": b + i, "question": ex["question"],
                            "answer": ex["answer"], "greedy": {**grade(g, i, ex), "text": g["texts"][i]},
                            "samples": {k: [x[k] for x in samples] for k in ("correct", "length", "truncated")}})
    return records


# ---------------------------------------------------------------------------------------------------------
# One evaluation: resolve model/adapter, run every task, write the JSON
# ---------------------------------------------------------------------------------------------------------
def local(m):
    """A relative folder such as train.py's default "assets/tiny-arith" also resolves next to this file; a short
    name such as smollm2-135m (real_model.py) is its converted folder."""
    from tools.real_model import MODELS, folder
    if m in MODELS:
        return folder(m)
    return os.path.join(HERE, m) if m and not os.path.isdir(m) and os.path.isdir(os.path.join(HERE, m)) else m


def same_model(a, b):
    norm = lambda m: os.path.realpath(local(m)) if os.path.exists(local(m)) else m.rstrip("/")   # noqa: E731
    return norm(a) == norm(b)


def resolve(args):
    """Fill args.model / args.adapter (a folder with adapter_config.json) / args.out / args.data; die on bad input."""
    import tasks
    from run_folder import read_adapter_config, read_json
    args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in args.task_list:
        if t not in tasks.TASKS:
            die(f"unknown task {t!r}; choose from: {', '.join(tasks.TASKS)}")
    if any("=" not in d for d in args.data):
        die(f"--data takes TASK=FILE, got {args.data}")
    args.data = dict(d.split("=", 1) for d in args.data)
    if args.samples < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
        die("--samples must be >= 0, --batch-size and --max-new-tokens >= 1")
    run_model = base = None
    if args.adapter:
        a = args.adapter
        for ckpt in ("checkpoint", "checkpoint.old"):   # a run folder written by train.py (.old: after a crash)
            if not os.path.isfile(os.path.join(a, "adapter_config.json")) and \
                    os.path.isfile(os.path.join(a, ckpt, "adapter_config.json")):
                a = os.path.join(a, ckpt)
        if not os.path.isfile(os.path.join(a, "adapter_config.json")):
            die(f"no peft adapter at {args.adapter} (expected adapter_config.json or checkpoint/adapter_config.json)")
        args.adapter = a
        adapter_cfg = read_json(os.path.join(a, "adapter_config.json"))
        if not isinstance(adapter_cfg, dict):
            die(f"{os.path.join(a, 'adapter_config.json')} is unreadable or not a JSON object")
        base = adapter_cfg.get("base_model_name_or_path")
        base = base if isinstance(base, str) else None
        run = read_json(os.path.join(os.path.dirname(os.path.abspath(a)), "config.json"))
        if isinstance(run, dict):
            run_model = run.get("model") if isinstance(run.get("model"), str) else None
            if args.prompt_format is None:                  # prompts as the run was trained on them
                args.prompt_format = run.get("prompt_format", "auto")
            if args.thinking is None:
                args.thinking = bool(run.get("thinking", False))
    args.prompt_format, args.thinking = args.prompt_format or "auto", bool(args.thinking)
    try:
        args.model = local(args.model or run_model or base or TINY)
    except ValueError as e:                                  # real_model.ModelError: package missing, wrong file
        die(str(e))
    if base and not same_model(base, args.model):
        die(f"adapter {args.adapter} was trained on base model {base!r}, not {args.model!r} (omit --model to use it)")
    if args.adapter:
        try:                                  # its ranks bounded before peft allocates them
            read_adapter_config(args.adapter, args.model)
        except ValueError as e:
            die(str(e))
    if args.model == TINY and not os.path.isdir(TINY):
        die(f"tiny model not found at {TINY} (build it with: python tools/tiny_model.py --out assets/tiny-arith)")
    if not args.out:
        tag = "+".join(args.task_list)
        args.out = (os.path.join(os.path.dirname(os.path.abspath(args.adapter)), f"eval-{tag}.json") if args.adapter
                    else os.path.join("eval-results", f"{os.path.basename(args.model.rstrip('/'))}-{tag}.json"))
    check_out(args.out)
    return args


def check_out(path):
    """--out may be a new file or an earlier eval.py result, never another file (a model's or a run's config.json:
    the model no longer loaded) and never a symbolic link."""
    from run_folder import open_nofollow
    if os.path.islink(path):
        die(f"--out {path} is a symbolic link; pick a plain file name")
    if os.path.exists(path):
        try:                # read whole, as --compare reads it: an earlier result of any size (a long MATH eval) is ours
            with open_nofollow(path, "rb") as f:
                check_result(json.load(f))
        except (OSError, ValueError, RecursionError, AssertionError, KeyError, TypeError, IndexError, AttributeError):
            die(f"--out {path} exists and is not an eval.py result (it would be overwritten); pick another --out")


def provenance():
    """Package versions and the git commit ("-dirty" with uncommitted changes), so a number can be traced back."""
    v = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            v[pkg] = metadata.version(pkg)
    git = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True, timeout=10)  # noqa: E731
    try:
        sha, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain")
        return v, sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return v, None


def run_eval(args):
    """Evaluate one model (+ adapter) on args.task_list; write and return the result dict."""
    import tasks
    import torch
    from policy import load_policy
    examples = {}
    for t in args.task_list:   # load every task first: a missing data set fails before the model loads
        try:
            examples[t] = tasks.load_task(t, "test", n=args.limit, path=args.data.get(t))
        except tasks.TaskError as e:
            die(f"{e} [eval.py: --data {t}=FILE]" if "path" in str(e) else str(e))
    try:
        model, tok = load_policy(args.model, load_in_4bit=args.load_in_4bit, adapter=args.adapter)
    except (OSError, ValueError, pickle.UnpicklingError) as e:      # a pickle payload in a .bin: refused, one line
        die(f"cannot load {args.model!r}{' + ' + args.adapter if args.adapter else ''}: {str(e).splitlines()[0]}")
    except RuntimeError as e:   # peft raises "size mismatch for ..." for an adapter of a differently shaped model
        if "size mismatch" not in str(e):
            raise
        die(f"adapter {args.adapter} does not fit {args.model!r} (a different base model?): size mismatch")
    model.eval()
    if model.device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 10_000_000:
        torch.set_num_threads(1)   # tiny matmuls: thread sync costs more than it saves (10x slower on a busy CPU)
    versions, sha = provenance()
    from tools import real_model
    from run_folder import portable
    shown = {k: portable(v) if k in ("model", "adapter", "out") else v for k, v in vars(args).items()
             if k not in ("compare", "task_list")}           # a result names no machine: paths relative to the repo,
    shown["model"] = next((m for m in real_model.MODELS if os.path.realpath(os.path.join(real_model.CACHE, m)) ==
                           os.path.realpath(args.model)), shown["model"])             # a converted model: its short name
    out = {"config": shown,
           "versions": versions, "git_sha": sha, "seed": args.seed, "argv": sys.argv[1:],
           "device": str(model.get_input_embeddings().weight.device), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "tasks": {}}
    # no adapter: switch off the fresh LoRA that load_policy adds, so this is exactly the base model
    with model.disable_adapter() if args.adapter is None else contextlib.nullcontext():
        for t in args.task_list:
            t0 = time.time()
            problems = generate_records(model, tok, t, examples[t], args)
            out["tasks"][t] = {"seconds": round(time.time() - t0, 2),
                               "metrics": summarize(per_problem(problems), args.bootstrap, args.seed),
                               "problems": problems}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    from run_folder import write_atomic
    write_atomic(args.out, json.dumps(out))   # comedy.py and --compare trust the file: never a truncated one
    out["path"] = args.out
    return out


# ---------------------------------------------------------------------------------------------------------
# Tables and --compare (everything recomputed from the per-problem records)
# ---------------------------------------------------------------------------------------------------------
def load_result(path):
    if not os.path.exists(path):
        die(f"no such result file or run folder: {path}")
    if os.path.isdir(path):   # a run folder: its most recent eval*.json
        found = sorted(glob.glob(os.path.join(path, "eval*.json")), key=os.path.getmtime)
        if not found:
            die(f"no eval*.json in {path} (run: python eval.py --adapter {path})")
        path = found[-1]
    try:
        with open(path) as f:
            res = json.load(f)
        check_result(res)
    except (OSError, ValueError, AssertionError, AttributeError, KeyError, TypeError, IndexError) as e:
        die(f"{path} is not an eval.py result file ({type(e).__name__}: {str(e)[:100] or 'malformed'})")
    res["path"] = path
    return res


def check_result(res):
    """Everything table() reads, with the types it needs (AssertionError/KeyError/TypeError otherwise)."""
    assert isinstance(res, dict) and isinstance(res["config"], dict) and isinstance(res["tasks"], dict), "layout"
    for name, task in res["tasks"].items():
        problems = task["problems"]
        assert isinstance(problems, list) and problems, f"task {name}: no problems"
        n = len(problems[0]["samples"]["correct"])
        for p in problems:
            assert isinstance(p["question"], str) and isinstance(p["id"], (str, int)), f"task {name}: problem id"
            g, s = p["greedy"], p["samples"]
            assert all(isinstance(s[k], list) and len(s[k]) == n for k in ("correct", "length", "truncated")), \
                f"task {name}: samples of unequal length"
            assert all(isinstance(x, bool) for x in [g["correct"], g["truncated"], *s["correct"], *s["truncated"]]) \
                and all(isinstance(x, (int, float)) for x in [g["length"], *s["length"]]), f"task {name}: values"


def labels(results):
    """Column names: the run folder's name for an adapter, else the model's name; #i makes duplicates unique."""
    names = []
    for r in results:
        adapter, model = r["config"].get("adapter"), str(r["config"].get("model")).rstrip("/")
        a = os.path.abspath(adapter) if adapter else None
        names.append(os.path.basename(os.path.dirname(a) if os.path.basename(a).startswith("checkpoint") else a)
                     if a else os.path.basename(model))
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def fmt(s, acc, sign=""):
    f = f"{{:{sign}.3f}}" if acc else f"{{:{sign}.2f}}"
    return f"{f.format(s['mean'])} [{f.format(s['lo'])}, {f.format(s['hi'])}]"


def table(results, n_boot=1000, seed=0):
    """Markdown: per task one row per metric, one column per file, then B - A vs the first file (paired).
    Columns are letters A, B, ... (long run paths make unreadable headers); the legend above the tables names them."""
    labs = labels(results)
    let = [chr(ord("A") + i) if i < 26 else f"R{i + 1}" for i in range(len(results))]
    lines = [f"- {x} = {lab}: {r['path']}  (model {r['config'].get('model')}, adapter {r['config'].get('adapter')}, "
             f"n={r['config'].get('samples')}, T={r['config'].get('temperature')})"
             for x, lab, r in zip(let, labs, results)]
    head = ["metric"] + let + [f"{x} − {let[0]}" for x in let[1:]]
    key = lambda p: (str(p["id"]), p["question"])   # noqa: E731
    for task in results[0]["tasks"]:
        if any(task not in r["tasks"] for r in results):
            lines.append(f"\n(task {task} is not in every file: skipped)")
            continue
        ref = [key(p) for p in results[0]["tasks"][task]["problems"]]
        aligned = []
        for r in results:   # align problems by identity so the paired bootstrap pairs the same problem
            probs = {key(p): p for p in r["tasks"][task]["problems"]}
            if len(probs) != len(ref) or set(probs) != set(ref):
                die(f"task {task}: {r['path']} has a different problem set ({len(probs)} problems) than "
                    f"{results[0]['path']} ({len(ref)}); evaluate both with the same --limit and data")
            aligned.append([probs[k] for k in ref])
        cols = [per_problem(a) for a in aligned]
        n = min(len(a[0]["samples"]["correct"]) for a in aligned)
        ks = [k for k in range(1, n + 1) if k & (k - 1) == 0 or k == n]   # pass@1, 2, 4, ..., n in the table
        names = ["greedy acc"] + [f"pass@{k}" for k in ks] + \
            [m for m in ("greedy len", "sample len", "greedy trunc", "sample trunc") if all(m in c for c in cols)]
        cols = [{m: c[m] for m in names} for c in cols]
        summ = [summarize(c, n_boot, seed) for c in cols]
        diff = [summarize({m: c[m] - cols[0][m] for m in names}, n_boot, seed) for c in cols[1:]]
        lines += ["", f"### {task} ({len(ref)} problems)", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for m in names:
            acc = "len" not in m
            cells = [fmt(s[m], acc) for s in summ]
            cells += [fmt(d[m], acc, "+") + (" *" if star(d[m], acc) else "") for d in diff]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        if all(round(s[m]["mean"], 3) == 0 for s in summ for m in names if m == "greedy acc" or "pass@" in m):
            who = (f"{let[0]} scores" if len(let) == 1 else f"{let[0]} and {let[1]} both score" if len(let) == 2
                   else f"{', '.join(let[:-1])} and {let[-1]} all score")
            lines.append(f"\nNote: {task}: {who} 0.000 on greedy acc and every pass@k -- the task is out of reach for "
                         f"{'this model' if len(let) == 1 else 'these models'} (its differences mean nothing).")
    lines.append(f"\nmean [95% bootstrap CI over problems, {n_boot} resamples]")
    if len(results) > 1:
        lines.append(f"* = the paired-bootstrap 95% CI of the difference (same problems resampled jointly) excludes 0 "
                     f"and |difference| >= {MIN_DIFF} ({MIN_DIFF_LEN:g} token for lengths); no * = not shown to matter")
    return "\n".join(lines)


def star(d, acc):
    """A difference worth a *: its CI excludes 0 and its size (as printed) reaches MIN_DIFF (MIN_DIFF_LEN tokens)."""
    size = round(abs(d["mean"]), 3 if acc else 2)   # as printed: a "+0.010" is flagged, a hidden 0.0098 is not
    return (d["lo"] > 0 or d["hi"] < 0) and size >= (MIN_DIFF if acc else MIN_DIFF_LEN)


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv):
    import tasks
    p = argparse.ArgumentParser(description="Evaluate a base model or base + LoRA adapter; compare result files.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)   # --help shows defaults
    p.add_argument("--model", help="hub id or local folder (default: the run's model, else assets/tiny-arith)")
    p.add_argument("--adapter", help="run folder (uses RUN/checkpoint) or peft adapter folder")
    p.add_argument("--tasks", default="arith,arith_spaced", help=f"comma-separated, from: {', '.join(tasks.TASKS)}")
    p.add_argument("--samples", type=int, default=SAMPLES,
                   help="n samples per problem for pass@k (0 = greedy only; the README's tables use 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for the n samples")
    p.add_argument("--limit", type=int, default=None, help="first L test problems per task")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (rows = this × samples)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA-style NF4 base weights (bitsandbytes)")
    p.add_argument("--prompt-format", choices=("auto", "chat", "plain"), default=None,
                   help="chat template or the plain question (default: the run's, else auto = chat if there is one)")
    p.add_argument("--thinking", action="store_true", default=None,
                   help="let a template that supports it think (default: the run's, else off)")
    p.add_argument("--data", action="append", default=[], metavar="TASK=FILE",
                   help="local .jsonl/.parquet for a data-set task (offline machines), e.g. math500=m500.jsonl")
    p.add_argument("--bootstrap", type=int, default=1000, help="number of bootstrap resamples")
    p.add_argument("--out", help="result JSON (default: next to the adapter, or eval-results/)")
    p.add_argument("--compare", nargs="+", metavar="FILE_OR_RUN", help="compare result files / run folders")
    return p.parse_args(argv)


def demo():
    """No arguments: the tiny model, and the latest run in runs/ on the same base, offline on CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = [run_eval(resolve(parse_args(DEMO + ["--model", TINY])))]
    ckpts = sorted(glob.glob(os.path.join("runs", "*", "checkpoint", "adapter_config.json")), key=os.path.getmtime)
    if not ckpts:
        print("(no run in runs/ yet: `python train.py` trains one; then run `python eval.py` again)")
    else:
        run = os.path.dirname(os.path.dirname(ckpts[-1]))
        args = resolve(parse_args(DEMO + ["--adapter", run]))
        if same_model(args.model, TINY):
            results.append(run_eval(args))
        else:   # a GPU run of a real model would not finish in a minute on CPU
            print(f"(latest run {run} is on {args.model}, not the tiny model: `python eval.py --adapter {run}`)")
    print(table(results))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return demo()
    args = parse_args(argv)
    if args.bootstrap < 1:                        # checked before hours of evaluation, not after (it once discarded one)
        die(f"--bootstrap must be >= 1 (resamples for the 95% CIs), got {args.bootstrap}")
    if args.compare:
        return print(table([load_result(p) for p in args.compare], args.bootstrap, args.seed))
    res = run_eval(resolve(args))
    n = sum(len(t["problems"]) for t in res["tasks"].values())
    print(f"eval.py: evaluated {n} problems of {', '.join(res['tasks'])} ({args.samples} samples each) in "
          f"{sum(t['seconds'] for t in res['tasks'].values()):.0f} s; wrote {res['path']}", file=sys.stderr)
    print(f"wrote {res['path']}\n")
    print(table([res], args.bootstrap, args.seed))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:                     # results are written whole or not at all (write_atomic)
        print("eval.py: interrupted (Ctrl-C); no result was written for the evaluation in progress", file=sys.stderr)
        sys.exit(130)
