"""eval.py -- held-out evaluation with error bars: greedy accuracy, unbiased pass@k, bootstrap CIs, paired compare.

What it implements
  For every task (problems and graders from tasks.py: load_task(name, "test"), reward) it generates, per problem,
  one greedy completion and n samples (--samples, default 8 as in the README's tables) at temperature T, from the
  base model or base + a saved LoRA adapter, with the same prompt either way (tasks.build_prompt). Per task:
    greedy acc   fraction of problems whose greedy completion is correct (the low-noise number, next to T=1 pass@1)
    pass@k       unbiased (Chen et al. 2021), every k <= n: mean over problems of 1 - C(n-c, k)/C(n, k), c correct
    95% CI       percentile bootstrap over problems (resampled with replacement, 1000 times, seeded)
    len, trunc   mean completion length in tokens (EOS included) and the fraction that hit --max-new-tokens
  --compare puts result files side by side (columns A = the first file, B, ..., named in a legend) with B - A from a
  *paired* bootstrap: one resampling of problems shared by both files, much tighter than two overlapping CIs as
  problem difficulty cancels. A * marks a difference that matters (star); a note, a task all score 0 on.

Simplifications
  - HF generate only (policy.rollout), true sampling: no top-k/top-p, so T=1 samples are the trained policy.
  - The CIs cover the choice of problems and samples, not of training seeds: train several seeds and --compare
    their files. Percentile CIs are too narrow when there are few problems and accuracy is near 0 or 1.
  - Per-problem records (correct flags, lengths, greedy text) are saved; --compare recomputes every number from them.

Commands
  python eval.py                      # offline CPU demo (<1 min): assets/tiny-arith vs the latest run in runs/
  python eval.py --adapter runs/NAME --tasks arith,arith_spaced --samples 8    # base model read from the run
  python eval.py --model Qwen/Qwen2.5-7B --tasks math500,mmlu_college_physics --samples 4 --max-new-tokens 1024 \
      --batch-size 16 --load-in-4bit
  python eval.py --compare eval-results/Qwen2.5-7B-math500.json runs/k1-in-reward runs/k3-in-loss
Output: one JSON per evaluation (default: RUN_DIR/eval-<tasks>.json, or eval-results/<model>-<tasks>.json), written
whole once complete (Ctrl-C: one line, exit 130, nothing written), and a markdown table on stdout. Bad input (a task
unknown; an adapter missing, of another base model or of a rank over its smallest layer's) exits 2 with one line.
"""
import argparse
import collections
import contextlib
import glob
import json
import os
import pickle
import platform
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
# A * needs the paired 95% CI to exclude 0 *and* a size that matters (0.2 points on 5,000 problems can exclude 0)
MIN_DIFF, MIN_DIFF_LEN = 0.01, 1.0   # accuracy, pass@k and truncation rates; mean lengths (tokens)
BOOT_CHUNK, MAX_BOOT = 1 << 20, 100_000   # bootstrap counts held at once (8 MB: memory stays bounded whatever
RESULT_LIMIT = 1 << 30   # replicates × problems); --bootstrap cap; --compare's file cap (parsed: ~6x its size in RAM)


def die(msg):
    print(f"eval.py: error: {msg}", file=sys.stderr)   # one line, exit 2: the same contract as argparse errors
    sys.exit(2)


# ---- Statistics (pure numpy; everything below is a mean over problems of a per-problem value) ---------------------
def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c,k)/C(n,k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i).
    The product form never builds a huge binomial (C(200, 100) overflows a float) and stays exact near 0 and 1."""
    if n - c < k:
        return 1.0   # every k-subset contains a correct sample
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def per_problem(rows):
    """Problems (compact rows) -> {metric: (P,) array}. Lengths and truncation are per-problem means, so every metric
    (and every paired difference) is a plain mean over problems and is bootstrapped the same way."""
    n, c = rows[0].n, np.array([r.correct for r in rows], dtype=int)
    col = lambda field: np.array([getattr(r, field) for r in rows], dtype=float)   # noqa: E731
    cols = {"greedy acc": col("greedy")}
    for k in range(1, n + 1):      # c takes n + 1 values: pass_at_k once per value, then indexed by every problem's c
        cols[f"pass@{k}"] = np.array([pass_at_k(n, j, k) for j in range(n + 1)])[c]
    cols["greedy len"], cols["greedy trunc"] = col("greedy_len"), col("greedy_trunc")
    if n:
        cols["sample len"], cols["sample trunc"] = col("sample_len"), col("sample_trunc")
    return cols


def summarize(cols, n_boot=1000, seed=0):
    """{metric: (P,) values} -> {metric: {"mean", "lo", "hi"}} with a 95% percentile bootstrap over problems.
    Replicate b draws P problems with replacement, problem i W[b, i] times, so all replicate means are W @ X / P,
    with W built BOOT_CHUNK cells at a time (at once, 100k problems took 2.5 GB). Per-problem differences (b_i - a_i)
    make this the paired bootstrap of B - A: both files are resampled on the same problems."""
    names = list(cols)
    X = np.stack([cols[m] for m in names], 1)                                        # (P, M)
    P, rng, means = X.shape[0], np.random.default_rng(seed), np.empty((n_boot, X.shape[1]))
    step = max(1, BOOT_CHUNK // P)                  # one chunk (the same draws as ever) up to BOOT_CHUNK cells
    for b in range(0, n_boot, step):
        m = min(step, n_boot - b)
        idx = rng.integers(0, P, size=(m, P))                                        # (m, P) resampled problems
        W = np.bincount((idx + P * np.arange(m)[:, None]).ravel(), minlength=m * P).reshape(m, P)
        means[b:b + m] = W @ X / P
    lo, hi = np.percentile(means, [2.5, 97.5], axis=0)                               # (M,) each
    return {m: {"mean": float(X[:, j].mean()), "lo": float(lo[j]), "hi": float(hi[j])} for j, m in enumerate(names)}


# ---- Generation: greedy + n samples per problem, graded by tasks.reward -------------------------------------------
def generate_records(model, tok, name, examples, args):
    import torch
    from tqdm import tqdm

    from policy import rollout
    from tasks import build_prompt, reward
    n, bs, records = args.samples, args.batch_size, []

    def grade(out, r, ex):   # row r of a rollout, graded by the task's own reward (never re-implemented here)
        return {"correct": bool(reward(name, out["texts"][r], ex) > 0.5),
                "length": int(out["completion_mask"][r].sum()), "truncated": bool(out["truncated"][r])}
    done, t0, last = 0, time.time(), time.time()    # done: problems at the last progress line
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


# ---- One evaluation: resolve model/adapter, run every task, write the JSON ----------------------------------------
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
    if bad := [t for t in args.task_list if t not in tasks.TASKS]:
        die(f"unknown task {bad[0]!r}; choose from: {', '.join(tasks.TASKS)}")
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
        base = b if isinstance(b := adapter_cfg.get("base_model_name_or_path"), str) else None
        run = read_json(os.path.join(os.path.dirname(os.path.abspath(a)), "config.json"))
        if isinstance(run, dict):
            run_model = run.get("model") if isinstance(run.get("model"), str) else None
            args.prompt_format = args.prompt_format or run.get("prompt_format", "auto")   # prompts as it trained on
            args.thinking = args.thinking or bool(run.get("thinking", False))
    args.prompt_format, args.thinking = args.prompt_format or "auto", bool(args.thinking)
    try:                              # ValueError: real_model.ModelError (package missing, wrong file), a bad adapter
        args.model = local(args.model or run_model or base or TINY)
        if base and not same_model(base, args.model):
            die(f"adapter {args.adapter} was trained on base model {base!r}, not {args.model!r} "
                "(omit --model to use it)")
        if args.adapter:
            read_adapter_config(args.adapter, args.model)   # its ranks bounded before peft allocates them
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
        try:                # parsed as --compare parses it: an earlier result of any size (a long MATH eval) is ours
            with open_nofollow(path, "rb") as f:
                parse_result(f)
        except BAD_RESULT:
            die(f"--out {path} exists and is not an eval.py result (it would be overwritten); pick another --out")


def provenance():
    """Package versions and the git commit ("-dirty": a tracked .py file differs, as train.py records it)."""
    from tools.provenance import code_version
    v = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            v[pkg] = metadata.version(pkg)
    sha, dirty = code_version()
    return v, sha and sha + ("-dirty" if dirty else "")


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
    from run_folder import portable, write_atomic
    shown = {k: portable(v) if k in ("model", "adapter", "out") else v for k, v in vars(args).items()
             if k not in ("compare", "task_list")}           # a result names no machine: paths relative to the repo,
    shown["model"] = next((m for m in real_model.MODELS if os.path.realpath(os.path.join(real_model.CACHE, m)) ==
                           os.path.realpath(args.model)), shown["model"])             # a converted model: its short name
    out = {"config": shown, "versions": versions, "git_sha": sha, "seed": args.seed, "argv": sys.argv[1:],
           "device": str(model.get_input_embeddings().weight.device), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "tasks": {}}
    # no adapter: switch off the fresh LoRA that load_policy adds, so this is exactly the base model
    with model.disable_adapter() if args.adapter is None else contextlib.nullcontext():
        for t in args.task_list:
            t0 = time.time()
            problems = generate_records(model, tok, t, examples[t], args)
            out["tasks"][t] = {"seconds": round(time.time() - t0, 2), "metrics": summarize(
                per_problem([compact(p) for p in problems]), args.bootstrap, args.seed), "problems": problems}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_atomic(args.out, json.dumps(out))   # comedy.py and --compare trust the file: never a truncated one
    out["path"] = args.out
    return out


# ---- Tables and --compare (everything recomputed from the per-problem records) ------------------------------------
BAD_RESULT = (OSError, ValueError, RecursionError, OverflowError, AssertionError, KeyError, TypeError)   # parse_result
Problem = collections.namedtuple("Problem", "key n correct greedy greedy_len greedy_trunc sample_len sample_trunc")


def compact(p):
    """A problem record -> the Problem the tables need, types checked. Called on each record as it is parsed: greedy
    texts and sample lists go at once (a 40 MB result of 100k problems took 2.7 GB whole; compacted, about its size)."""
    g, s, n = p["greedy"], p["samples"], len(p["samples"]["correct"])
    assert isinstance(p["question"], str) and isinstance(p["id"], (str, int)), "problem id"
    assert all(isinstance(s[k], list) and len(s[k]) == n for k in ("correct", "length", "truncated")), "sample lists"
    assert all(isinstance(x, bool) for x in [g["correct"], g["truncated"], *s["correct"], *s["truncated"]]) \
        and all(isinstance(x, (int, float)) for x in [g["length"], *s["length"]]), "values"
    mean = lambda xs: sum(xs) / n if n else 0.0   # noqa: E731
    return Problem((str(p["id"]), p["question"]), n, sum(s["correct"]), float(g["correct"]), float(g["length"]),
                   float(g["truncated"]), mean(s["length"]), mean(s["truncated"]))


def parse_result(f):
    """An open result file -> its dict, every problem record a Problem; raises one of BAD_RESULT if malformed."""
    res = json.load(f, object_hook=lambda d: compact(d) if "question" in d else d)   # only a problem has a question
    assert isinstance(res, dict) and isinstance(res["config"], dict) and isinstance(res["tasks"], dict), "layout"
    assert all(isinstance(res["config"].get(k), (str, type(None))) for k in ("model", "adapter")), "config.model/adapter"
    for name, task in res["tasks"].items():   # every problem of a task with the same n samples
        ps = task["problems"]
        assert isinstance(ps, list) and ps and all(isinstance(p, Problem) and p.n == ps[0].n for p in ps), name
    return res


def load_result(path):
    if os.path.isdir(path):   # a run folder: its most recent eval*.json
        found = sorted(glob.glob(os.path.join(path, "eval*.json")), key=os.path.getmtime)
        if not found:
            die(f"no eval*.json in {path} (run: python eval.py --adapter {path})")
        path = found[-1]
    if not os.path.isfile(path) or os.path.getsize(path) > RESULT_LIMIT:   # a FIFO, /dev/zero: read forever
        die(f"no such result file or run folder: {path}" if not os.path.exists(path) else f"{path} is not a regular "
            f"file" if not os.path.isfile(path) else f"{path} is over {RESULT_LIMIT >> 20} MiB: not an eval.py result")
    try:
        with open(path) as f:
            res = parse_result(f)
    except BAD_RESULT as e:
        die(f"{path} is not an eval.py result file ({type(e).__name__}: {str(e)[:100] or 'malformed'})")
    return {**res, "path": path}


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
    for task in results[0]["tasks"]:
        if any(task not in r["tasks"] for r in results):
            lines.append(f"\n(task {task} is not in every file: skipped)")
            continue
        rows = [[p if isinstance(p, Problem) else compact(p) for p in r["tasks"][task]["problems"]] for r in results]
        order = {k: i for i, k in enumerate(p.key for p in rows[0])}
        for r, rs in zip(results, rows):   # aligned by identity, so the paired bootstrap pairs the same problem
            if len(rs) != len(order) or {p.key for p in rs} != order.keys():   # (a problem twice: unequal too)
                die(f"task {task}: {r['path']} has a different problem set ({len(rs)} problems) than "
                    f"{results[0]['path']} ({len(order)}); evaluate both with the same --limit and data")
        aligned = [sorted(rs, key=lambda p: order[p.key]) for rs in rows]
        cols = [per_problem(a) for a in aligned]
        n = min(a[0].n for a in aligned)
        ks = [k for k in range(1, n + 1) if k & (k - 1) == 0 or k == n]   # pass@1, 2, 4, ..., n in the table
        names = ["greedy acc"] + [f"pass@{k}" for k in ks] + \
            [m for m in ("greedy len", "sample len", "greedy trunc", "sample trunc") if all(m in c for c in cols)]
        # one bootstrap for all columns and differences: with one seed each call would resample the same problems
        ci = summarize({**{(i, m): c[m] for i, c in enumerate(cols) for m in names},
                        **{(-i, m): c[m] - cols[0][m] for i, c in enumerate(cols) if i for m in names}}, n_boot, seed)
        summ, diff = [{m: ci[i, m] for m in names} for i in range(len(cols))], \
            [{m: ci[-i, m] for m in names} for i in range(1, len(cols))]
        lines += ["", f"### {task} ({len(order)} problems)", "", "| " + " | ".join(head) + " |",
                  "|---" * len(head) + "|"]
        for m in names:
            acc = "len" not in m
            cells = [fmt(s[m], acc) for s in summ]
            cells += [fmt(d[m], acc, "+") + (" *" if star(d[m], acc) else "") for d in diff]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        if all(round(s[m]["mean"], 3) == 0 for s in summ for m in names if m == "greedy acc" or "pass@" in m):
            who = f"{', '.join(let[:-1])} and {let[-1]} {'both' if len(let) == 2 else 'all'} score" if let[1:] \
                else f"{let[0]} scores"
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


# ---- Entry points -------------------------------------------------------------------------------------------------
def parse_args(argv):
    import tasks
    p = argparse.ArgumentParser(description="Evaluate a base model or base + LoRA adapter; compare result files.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)   # --help shows defaults
    p.add_argument("--model", help="hub id or local folder (default: the run's model, else assets/tiny-arith)")
    p.add_argument("--adapter", help="run folder (uses RUN/checkpoint) or peft adapter folder")
    p.add_argument("--tasks", default="arith,arith_spaced", help=f"comma-separated, from: {', '.join(tasks.TASKS)}")
    p.add_argument("--samples", type=int, default=SAMPLES, help="n samples per problem for pass@k (0: greedy only)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for the n samples")
    p.add_argument("--limit", type=int, default=None, help="first L test problems per task")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (rows = this × samples)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA-style NF4 base weights (bitsandbytes)")
    p.add_argument("--prompt-format", choices=("auto", "chat", "plain"), default=None,
                   help="chat template or the plain question (default: the run's, else auto = chat if there is one)")
    p.add_argument("--thinking", action="store_true", default=None, help="let the template think (default: the run's)")
    p.add_argument("--data", action="append", default=[], metavar="TASK=FILE",
                   help="local .jsonl/.parquet for a data-set task (offline machines), e.g. math500=m500.jsonl")
    p.add_argument("--bootstrap", type=int, default=1000, help=f"number of bootstrap resamples (at most {MAX_BOOT})")
    p.add_argument("--out", help="result JSON (default: next to the adapter, or eval-results/)")
    p.add_argument("--compare", nargs="+", metavar="FILE_OR_RUN", help="compare result files / run folders")
    return p.parse_args(argv)


def demo():
    """No arguments: the tiny model, and the latest run in runs/ on the same base, offline on CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = [run_eval(resolve(parse_args(DEMO + ["--model", TINY])))]
    ckpts = sorted(glob.glob(os.path.join("runs", "*", "checkpoint", "adapter_config.json")), key=os.path.getmtime)
    run = ckpts and os.path.dirname(os.path.dirname(ckpts[-1]))
    args = run and resolve(parse_args(DEMO + ["--adapter", run]))
    if not run:
        print("(no run in runs/ yet: `python train.py` trains one; then run `python eval.py` again)")
    elif same_model(args.model, TINY):
        results.append(run_eval(args))
    else:   # a GPU run of a real model would not finish in a minute on CPU
        print(f"(latest run {run} is on {args.model}, not the tiny model: `python eval.py --adapter {run}`)")
    print(table(results))


def main(argv=None):
    if not (sys.argv[1:] if argv is None else argv):
        return demo()
    args = parse_args(argv)                       # None: argparse reads sys.argv[1:]
    if not 1 <= args.bootstrap <= MAX_BOOT:      # checked before hours of evaluation, not after (it once discarded one)
        die(f"--bootstrap must be from 1 to {MAX_BOOT} (resamples for the 95% CIs), got {args.bootstrap}")
    if args.compare:
        return print(table([load_result(p) for p in args.compare], args.bootstrap, args.seed))
    res = run_eval(resolve(args))
    n = sum(len(t["problems"]) for t in res["tasks"].values())
    print(f"eval.py: evaluated {n} problems of {', '.join(res['tasks'])} ({args.samples} samples each) in "
          f"{sum(t['seconds'] for t in res['tasks'].values()):.0f} s; wrote {res['path']}", file=sys.stderr)
    print(f"wrote {res['path']}\n\n{table([res], args.bootstrap, args.seed)}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:                     # results are written whole or not at all (write_atomic)
        print("eval.py: interrupted (Ctrl-C); a result file is written whole or not at all", file=sys.stderr)
        sys.exit(130)
