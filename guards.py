"""guards.py -- what train.py refuses before it writes, and when it stops a run (README: Guarantees).

train.py's loop reads as the paper's algorithm; everything that protects a user's run folder is here, in the order a
run meets it:
  check_config      bad values, zero-gradient configurations, a --device that is not here  -> ValueError (exit 2)
  check_out         write only into a fresh folder or this run's own (never a model, a checkpoint, another run)
  resumable_config  a resume reads a whole train.py config.json (every key of the run) or refuses, writing nothing
  same, fits        config.json values compared with the command line, and type-checked before a resume trusts them
  save, Log         a checkpoint or a metrics record that cannot be written (a full disk) names the intact
                    checkpoint, exit 1, leaving no temporary file and no cut-off record
  stop_on_signals   Ctrl-C / SIGTERM end the run with one line naming the last good checkpoint (exit 130 / 143)
  first_nonfinite   after every optimizer step: a NaN or inf parameter stops the run before it is logged or saved
  finite_sampling   finite weights that overflow the forward pass stop at the next sampling, one line
  zero_gradient     a run whose first ZERO_GRAD_STEPS steps all had gradient norm exactly 0 stops (nothing learns)
Every message is one line on stderr; tests/test_run_folder.py feeds each the inputs that once broke it.
"""
import contextlib
import json
import math
import os
import shlex
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict, fields

import torch
from safetensors import SafetensorError

from estimators import parse_kl
from run_folder import (at, checkpoint_dir, folder_kind, is_run_config, last_checkpoint, local, one_line,
                        open_nofollow, read_bounded, read_json, save_checkpoint)

SEED_MAX = (2**63 - 2**40) // 100003                         # |seed·100003 + 10⁹ + step| < 2⁶³ for torch
RESUMABLE = ("resume", "steps", "eval_every", "save_every", "diag_every", "device", "threads", "compile_decode",
             "memory_budget_gb", "export")                   # speed and logging only: cannot change the run


def shown(v):
    """A default as a user would type it: on/off, `0.0 8.0` for a pair, nothing for an empty list."""
    return ("on" if v else "off") if isinstance(v, bool) else " ".join(map(str, v)) if isinstance(v, tuple) else v


def fits(f, v, item=False):
    """Whether a value read from config.json can be Config field f: its type (None where that is the default, a list
    for a tuple) and its choices."""
    if isinstance(f.default, tuple) and not item:             # --ratio-clip LO HI: exactly two
        return isinstance(v, list) and all(fits(f, x, item=True) for x in v) and \
            (not isinstance(f.metadata.get("nargs"), int) or len(v) == f.metadata["nargs"])
    if v is None:
        return f.default is None and not item
    kind = f.metadata.get("type") or type(f.default[0] if isinstance(f.default, tuple) else f.default)
    ok = type(v) is kind if kind in (bool, int) else type(v) in (int, float) if kind is float else isinstance(v, str)
    return ok and ("choices" not in f.metadata or v in f.metadata["choices"])


def same(v):
    """A value as given on the command line, or as stored in config.json, in one comparable form (paths absolute)."""
    if isinstance(v, (tuple, list)):
        return eval_files(v, same) if v and "=" in str(v[0]) else tuple(v)
    return os.path.abspath(local(v)) if isinstance(v, str) and os.path.exists(local(v)) else v


PROVENANCE = ("code_commit", "model_id")                    # written when a run starts; model_id gates every resume


def resumable_config(run, config_fields):
    """<run>/config.json, read (bounded, never through a link) and checked before a resume trusts it: a JSON object
    holding every field of the run (config_fields less RESUMABLE) and its provenance, each a valid value. A file
    without them ({} or an eval.py result) once resumed silently with the defaults (--prompts-per-step 4 -> 32) and
    erased model_id, switching the base-model check off for every later resume. ValueError (one line) otherwise."""
    path = os.path.join(run, "config.json")
    if not os.path.lexists(path):
        raise ValueError(f"--resume {run}: no config.json there (not a run folder)")
    try:
        with open_nofollow(path) as f:
            saved = json.loads(read_bounded(f"/proc/self/fd/{f.fileno()}"))
        assert isinstance(saved, dict)
    except (OSError, ValueError, AssertionError, RecursionError):
        raise ValueError(f"--resume {run}: config.json is unreadable, a link or corrupt (not a JSON object)") from None
    missing = [f.name for f in config_fields if f.name not in RESUMABLE + ("out",) and f.name not in saved]
    missing += [k for k in PROVENANCE if k not in saved]
    if missing:
        raise ValueError(f"--resume {run}: config.json is not a train.py run's configuration (it lacks "
                         f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); refusing to resume with "
                         f"defaults in their place (the file is left as it is)")
    for f in config_fields:                                 # a corrupt or edited value: one line, not a traceback
        if f.name in saved and not fits(f, saved[f.name]):
            raise ValueError(f"--resume {run}: config.json has {f.name} = {saved[f.name]!r}, not a valid "
                             f"--{f.name.replace('_', '-')}")
    return saved


def eval_files(items, f):
    """--eval-data TASK=FILE items with f applied to each FILE (a malformed item is left for load_data to refuse)."""
    return tuple(f"{t}={f(p)}" if sep else t for t, sep, p in (str(d).partition("=") for d in items))


def check_config(cfg):
    """Reject bad values before anything heavy runs (ValueError -> one line, exit 2). -> the parsed KLConfig."""
    kl = parse_kl(cfg.kl, cfg.kl_level, cfg.kl_is, is_clip=math.inf if cfg.kl_is_clip is None else cfg.kl_is_clip)
    rules = dict(group_size=(2, 1), prompts_per_step=(1, 1), steps=(0, 1), micro_batch_size=(1, 1),
                 max_new_tokens=(1, 1), eval_n=(0, 1), async_level=(0, 1), lora_r=(1, 1), lora_alpha=(0, 0),
                 temperature=(0, 0), lr=(0, 0), weight_decay=(0, 1), lora_dropout=(0, 1), eval_every=(0, 1),
                 save_every=(0, 1), rollout_batch_size=(0, 1), diag_every=(0, 1), memory_budget_gb=(0, 1),
                 threads=(0, 1))                             # name -> (bound, 1: >=, 0: >)
    for name, (bound, inclusive) in rules.items():
        v = getattr(cfg, name)
        huge = type(v) is int and abs(v) >= 2**62             # --group-size 10**400: math.isfinite overflowed
        if huge or not (math.isfinite(v) and (v >= bound if inclusive else v > bound)):
            raise ValueError(f"--{name.replace('_', '-')} must be finite and {'>=' if inclusive else '>'} {bound}"
                             f"{' (and < 2**62)' if huge else ''}, got {str(v)[:24]}{'...' if len(str(v)) > 24 else ''}")
    if cfg.memory_budget_gb > 2**20:                        # 1 PiB: 1e308 once overflowed the rows-per-pass arithmetic
        raise ValueError(f"--memory-budget-gb must be at most {2**20} (1 PiB), got {cfg.memory_budget_gb:g}")
    if cfg.lr < torch.finfo(torch.float32).tiny:             # Adam's step is ~lr: below this every update underflows
        raise ValueError(f"--lr {cfg.lr:g} is below float32's smallest normal number "
                         f"({torch.finfo(torch.float32).tiny:.3g}): no update would move a weight")
    if 100 / cfg.temperature > torch.finfo(torch.float32).max:   # logits / T overflow float32: NaN probabilities
        raise ValueError(f"--temperature {cfg.temperature:g} is too small: logits / T overflow float32 (use >= 1e-30; "
                         f"greedy decoding is what a tiny temperature approximates)")
    if not abs(cfg.seed) <= SEED_MAX:                       # torch seeds are 64-bit
        raise ValueError(f"--seed must be at most {SEED_MAX} in size (step seeds are seed·100003 + step, 64-bit), "
                         f"got {cfg.seed}")
    if not cfg.lora_dropout < 1:
        raise ValueError(f"--lora-dropout is a probability < 1, got {cfg.lora_dropout}")
    if not (math.isfinite(cfg.beta) and cfg.beta >= 0):
        raise ValueError(f"--beta must be a finite number >= 0, got {cfg.beta}")
    if not (cfg.max_grad_norm >= 0 and (cfg.token_budget is None or cfg.token_budget > 0)):
        raise ValueError("--max-grad-norm must be >= 0 and --token-budget > 0: a negative one flips the gradient")
    if cfg.device is not None:                               # before a run folder exists: nothing left behind
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise ValueError(f"--device {cfg.device} is not a device; use cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {cfg.device}: train.py runs on cpu or cuda")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.type == "cuda" and not (device.index or 0) < n:
            raise ValueError(f"--device {cfg.device}: no such CUDA device here ({n} visible)")
    if cfg.rollout_bf16_copy and (cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cuda":
        raise ValueError("--rollout-bf16-copy needs a CUDA device (a CPU run samples from the training model)")
    if not cfg.ratio_clip[0] <= cfg.ratio_clip[1]:
        raise ValueError(f"--ratio-clip LO HI needs LO <= HI, got {cfg.ratio_clip}")
    # configurations whose every gradient is exactly 0 (the run would end with exit 0 and nothing learned)
    if not cfg.ratio_clip[0] <= 1 <= cfg.ratio_clip[1]:
        raise ValueError(f"--ratio-clip {shown(cfg.ratio_clip)} excludes 1: the importance ratio is exactly 1 "
                         f"on-policy and at every run's start, where a clamp that excludes it has zero gradient")
    if cfg.token_budget is not None and not math.isfinite(cfg.token_budget):
        raise ValueError(f"--token-budget {cfg.token_budget} divides the loss, and so every gradient, to 0")
    if cfg.lr / (1 - 0.9) >= torch.finfo(torch.float32).max:   # Adam's first step is lr / (1 − β1)
        raise ValueError(f"--lr {cfg.lr:g} overflows float32 in AdamW's first step (lr / (1 − 0.9))")
    if cfg.lr * cfg.weight_decay >= 1:                     # AdamW: θ ← θ·(1 − lr·wd) − lr·update
        raise ValueError(f"--lr {cfg.lr:g} × --weight-decay {cfg.weight_decay:g} >= 1: AdamW would scale the weights "
                         f"by 1 − lr·wd = {1 - cfg.lr * cfg.weight_decay:.3g} every step (zeroing or flipping them)")
    check_out(cfg, cfg.resume or cfg.out)
    return kl


def check_out(cfg, out):
    """Write only into a fresh folder or this run's own: checked early, and again under the folder's lock (another run
    may have started or finished meanwhile). Refuses a folder that is, or is inside, a model folder, a checkpoint or
    another run, and (without --resume) one holding another run, its metrics, other folders or a foreign config."""
    if not out:
        return
    path, model = os.path.realpath(out), os.path.realpath(cfg.model) if os.path.isdir(cfg.model) else None
    if model and (path == model or path.startswith(model + os.sep)):
        raise ValueError(f"--out {out} is {'' if path == model else 'inside '}the --model folder {cfg.model}: it would "
                         f"overwrite the model's files; pick an --out outside it")
    up = os.path.dirname(path)
    while up != os.path.dirname(up):                         # every folder above it, up to /
        if kind := folder_kind(up):
            raise ValueError(f"--out {out} is inside the {kind} folder {up} (a run nested there is overwritten or "
                             f"deleted by it: a run's next save replaces its checkpoint/); pick an --out outside it")
        up = os.path.dirname(up)
    if cfg.resume:
        if not os.path.isfile(os.path.join(checkpoint_dir(cfg.resume), "state.pt")):
            raise ValueError(f"--resume {cfg.resume}: no checkpoint in it")
        return
    if not os.path.isdir(path):
        return
    if folder_kind(path) in ("checkpoint", "model"):
        raise ValueError(f"--out {out} is a {folder_kind(path)} folder, not a run folder; pick another --out")
    names = os.listdir(path)
    if any(n.startswith("checkpoint") for n in names):      # a crash can leave checkpoint.old or checkpoint.tmp
        raise ValueError(f"{out} already holds a run; continue it with --resume {out} or pick another --out")
    saved = read_json(os.path.join(path, "config.json"))
    if "config.json" in names and not is_run_config(saved):
        raise ValueError(f"--out {out} holds a config.json that is not a train.py run's; pick another --out")
    if not saved and (theirs := [n for n in ("metrics.png", "resumes.jsonl") if n in names]):
        raise ValueError(f"--out {out} holds {' and '.join(theirs)} but no run: a run would overwrite them; pick a "
                         f"new or empty --out")
    if saved:
        mine = asdict(cfg)
        for k in (f.name for f in fields(type(cfg)) if f.name not in RESUMABLE + ("out",)):
            if k in saved and same(saved[k]) != same(mine[k]):
                raise ValueError(f"--out {out} holds a run of another configuration (--{k.replace('_', '-')} "
                                 f"{shown(same(saved[k]))} there, {shown(mine[k])} here); pick another --out")
    if os.path.isfile(os.path.join(path, "metrics.jsonl")) and os.path.getsize(os.path.join(path, "metrics.jsonl")):
        raise ValueError(f"--out {out} holds the metrics of a run that never wrote a checkpoint; to start over, "
                         f"delete it (rm -rf {shlex.quote(out)}) or pick another --out")
    others = sorted(n for n in names if os.path.isdir(os.path.join(path, n)))
    if others:
        raise ValueError(f"--out {out} holds other folders ({', '.join(others[:3])}): not a run folder; pick a new "
                         f"or empty --out")


def save(out, model, optimizer, step, snapshots):
    """save_checkpoint, or, when it cannot write (a full disk: OSError, safetensors' SafetensorError, torch.save's
    RuntimeError), one line naming the intact checkpoint and exit 1; save_checkpoint removed checkpoint.tmp."""
    try:
        save_checkpoint(out, model, optimizer, step, snapshots)
    except (OSError, SafetensorError, RuntimeError) as e:
        print(f"train.py: error: cannot write the step-{step} checkpoint ({one_line(e)}); {last_checkpoint(out)}",
              file=sys.stderr)
        sys.exit(1)


class Log:
    """<out>/metrics.jsonl (through the pinned folder, never through a link), one whole record per write. A write that
    fails (a full disk) is cut back to the last whole record and stops the run with one line naming the intact
    checkpoint (exit 1): the file stays resumable (a cut-off record once made --resume fail on "Unterminated string")."""
    def __init__(self, out, append):
        self.out, self.f = out, open_nofollow(at(out, "metrics.jsonl"), "ab" if append else "wb", 0)

    def write(self, text):
        end = os.fstat(self.f.fileno()).st_size
        data = memoryview(text.encode())
        try:
            while data:                                      # unbuffered: a short write goes on where it stopped
                data = data[self.f.write(data):]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self.f.fileno(), end)          # no torn record left behind
            print(f"train.py: error: cannot write {os.path.join(self.out, 'metrics.jsonl')} ({one_line(e)}); "
                  f"{last_checkpoint(self.out)}", file=sys.stderr)
            sys.exit(1)

    def flush(self):
        pass

    def close(self):
        with contextlib.suppress(OSError):
            self.f.close()


def stop_on_signals(out):
    """The command line: SIGINT (Ctrl-C) and SIGTERM (a scheduler) end the run with one line naming the last good
    checkpoint, exit 128 + the signal's number; a second signal ends it at once. A signal the caller ignores (a
    shell's background job ignores SIGINT) stays ignored."""
    def stop(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        where = last_checkpoint(out) if out else "nothing was written"
        print(f"train.py: stopped by {signal.Signals(signum).name}; {where}", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, stop)


ZERO_GRAD_STEPS = 20   # K: a run whose first K steps all have gradient norm exactly 0 stops (nothing can learn)


def first_nonfinite(model):
    """Name of the first trainable parameter holding a NaN or inf, else None (one device sync)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if torch.stack([p.isfinite().all() for _, p in named]).all():
        return None
    return next(n for n, p in named if not p.isfinite().all())


@contextmanager
def finite_sampling(step, out):
    """Weights can stay finite and still overflow the forward pass (`--lr 1e30`: every LoRA value ~1e30): then
    generate's multinomial meets NaN probabilities. -> one line naming the step and the last checkpoint, exit 1."""
    try:
        yield
    except RuntimeError as e:
        if "probability tensor contains" not in str(e):
            raise
        print(f"train.py: error: non-finite next-token probabilities while sampling at step {step}: the weights "
              f"overflow in the forward pass (a learning rate too large?); {last_checkpoint(out)}, written after "
              "the last update, which may hold the overflowing weights", file=sys.stderr)
        raise SystemExit(1)


def zero_gradient(state, cfg, step, grad_norm, rewards, logp, mask):
    """Silent no-op training: -> a one-line reason to stop when this run's first ZERO_GRAD_STEPS steps all had
    gradient norm exactly 0 (a configuration that cannot learn), naming the cause when this batch shows it; else
    None. Once a step had a gradient, a later zero streak is a result (an arm without KL whose completions all fail:
    every advantage 0), not a configuration: warned once, the run goes on. state: {"zeros", "moved", "warned"}."""
    state["moved"] = state["moved"] or grad_norm > 0
    state["zeros"] = 0 if state["moved"] else state["zeros"] + 1
    if grad_norm > 0 or state["warned"]:
        return None
    if (logp[mask.bool()] == 0).all():
        cause = f"every sampled token has probability 1 at --temperature {cfg.temperature:g} (sampling is greedy)"
    elif (rewards.view(-1, cfg.group_size).std(1) == 0).all():
        cause = "every group's completions got the same reward, so every advantage is 0 (and the KL is 0 at π_ref)"
    else:
        cause = "cause unknown"
    if state["zeros"] >= ZERO_GRAD_STEPS:
        return (f"gradient norm exactly 0 at each of the first {ZERO_GRAD_STEPS} steps (to step {step}: {cause}); "
                "nothing is learning, stopping")
    if state["moved"] or state["zeros"] == 1:
        state["warned"] = state["moved"]                    # before any gradient: warn once more when it stops
        print(f"train.py: warning: gradient norm exactly 0 at step {step} ({cause})"
              + ("" if state["moved"] else f"; the run stops if its first {ZERO_GRAD_STEPS} steps all are"),
              file=sys.stderr)
    return None
