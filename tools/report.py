"""tools/report.py -- what train.py prints and draws when a run ends: a markdown summary and metrics.png.

Both come from the run folder's metrics.jsonl (run_folder.read_metrics), so `python tools/report.py RUN` redraws them
for any run, finished or not; comedy.py's study curves use the same moving average.

    python tools/report.py runs/NAME          # the summary table on stdout, RUN/metrics.png rewritten (not while
                                              # train.py runs there: it holds the run's lock)
"""
import io
import json
import math
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repo root: `python tools/report.py` runs from
if ROOT not in sys.path:                                             # here, and run_folder sits one folder up
    sys.path.insert(0, ROOT)

from run_folder import at, last_checkpoint, lock_run, one_line, read_bounded, read_metrics, release_run, write_atomic


def moving_average(xs, w):
    """Trailing mean over the last w values (fewer at the start), the same length as xs."""
    return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]



def report(out):
    """Markdown summary on stdout and the main curves in metrics.png, both from metrics.jsonl.

    Single steps are noisy: the summary gives the first step next to the mean over the last 10% of steps (the
    README's tables use the same), and the plot draws a moving average over the raw curve."""
    from matplotlib.figure import Figure                     # no pyplot: a notebook's backend is left alone
    cfg = json.loads(read_bounded(at(out, "config.json")))
    recs = read_metrics(out)
    train = [r for r in recs if r["type"] == "train"]
    evals = {}                                               # "task greedy_acc" -> [(step, value), ...]
    for r in (r for r in recs if r["type"] == "eval"):
        for key in (k for k in r if k.endswith("_acc")):
            evals.setdefault(f"{r['task']} {key}", []).append((r["step"], r[key]))
    tail = train[-max(1, len(train) // 10):]
    lines = [f"| metric | first step | mean of the last {len(tail)} steps |", "|---|---|---|"]
    lines += [f"| held-out {name} (step {v[0][0]} -> {v[-1][0]}) | {v[0][1]:.3f} | {v[-1][1]:.3f} (final) |"
              for name, v in evals.items()]
    panels = [("train reward", ["reward"]), ("sequence KL estimates", ["kl_k1", "kl_k3"]),
              ("exact token KL", ["token_rkl", "token_fkl"]), ("policy entropy", ["entropy"]),
              ("completion length", ["completion_len"]),
              ("KL in the loss / in the reward", ["kl_term", "kl_penalty"]), ("grad norm", ["grad_norm"])]
    has = lambda rs, k: [r[k] for r in rs if k in r] or [math.nan]     # --diag-every N: exact KLs every N steps
    tail_of = lambda k: has(train, k)[-max(1, len(has(train, k)) // 10):]   # their last 10%: a tail may have none
    if train:
        lines += [f"| train {k} | {has(train, k)[0]:.4f} | {sum(tail_of(k)) / len(tail_of(k)):.4f} |"
                  for _, keys in panels for k in keys]
        lines.append(f"| seconds per step (mean) | | {sum(r['time_step'] for r in train) / len(train):.2f} |")
    print("\n".join(lines))
    fig = Figure(figsize=(16, 7))
    axes = fig.subplots(2, 4)
    w = max(1, len(train) // 20)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            steps, raw = [r["step"] for r in train if key in r], [r[key] for r in train if key in r]
            line, = ax.plot(steps, raw, alpha=0.3, lw=0.8)
            ax.plot(steps, moving_average(raw, w), color=line.get_color(), label=f"{key} (mean of {w})" if w > 1 else key)
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=8)
    for name, v in evals.items():
        axes.flat[-1].plot(*zip(*v), marker="o", label=name)
    axes.flat[-1].set(title="held-out accuracy" if evals else "held-out accuracy (none: --eval-n 0)", xlabel="step")
    if evals:
        axes.flat[-1].legend(fontsize=8)
    fig.suptitle(f"{os.path.basename(os.path.abspath(out))}: --kl {cfg['kl']}, β = {cfg['beta']}, lr = {cfg['lr']}, "
                 f"--adv {cfg['adv']}, G = {cfg['group_size']}")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    try:
        write_atomic(at(out, "metrics.png"), png.getvalue())     # never through a link planted as metrics.png
    except OSError as e:                                     # a full disk at the end: the checkpoint is whole
        print(f"train.py: warning: cannot write {os.path.join(out, 'metrics.png')} ({one_line(e)}); "
              f"{last_checkpoint(out)}", file=sys.stderr)
    wrote = [n + "/" * os.path.isdir(at(out, n)) for n in ("config.json", "metrics.jsonl", "metrics.png", "checkpoint")
             if os.path.exists(at(out, n))]                  # --steps 0 writes no checkpoint/: not listed
    print(f"run folder: {out}  ({', '.join(wrote)})")
    if "checkpoint/" in wrote:                               # what a user runs next: the held-out evaluation
        print(f"next: python eval.py --adapter {shlex.quote(out)} --tasks {','.join(cfg.get('eval_tasks') or [cfg['task']])}")


def main(argv=None):
    """python tools/report.py RUN: redraw a run's summary and metrics.png, holding its lock -> exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python tools/report.py RUN_FOLDER", file=sys.stderr)
        return 2
    try:
        if not os.path.isfile(os.path.join(argv[0], "metrics.jsonl")):
            raise ValueError(f"{argv[0]} is not a run folder (no metrics.jsonl)")
        made = lock_run(argv[0])                             # one writer: never while train.py runs there
        try:
            report(argv[0])
        finally:
            release_run(argv[0], made)
    except (OSError, ValueError, KeyError) as e:
        print(f"report.py: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
