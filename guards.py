"""guards.py -- what train.py refuses before it writes, and when it stops a run (README: Guarantees).

train.py's loop reads as the paper's algorithm; everything that protects a user's run folder is here, in the order a
run meets it:
  check_config      bad values, zero-gradient configurations, a --device that is not here  -> ValueError (exit 2)
  load_data         the data and the model's tokenizer: empty tasks, stray --eval-data, prompts beyond the context
  check_out         write only into a fresh folder or this run's own (never a model, a checkpoint, another run)
  resumable_config  a resume reads a whole train.py config.json (every key of the run) or refuses, writing nothing;
  resumed_config    and a flag that would change the run (another arm, lr, model) is refused
  same, fits        config.json values compared with the command line, and type-checked before a resume trusts them
  save, Log         a checkpoint or a metrics record that cannot be written (a full disk) names the intact
                    checkpoint, exit 1, leaving no temporary file and no cut-off record
  stop_on_signals   Ctrl-C / SIGTERM end the run with one line naming the last good checkpoint (exit 130 / 143)
  check_resume      a resume's checkpoint, adapter rank, base-model identity and records, before anything is written
  finite_sampling   finite weights that overflow the forward pass stop at the next sampling, one line
  check_loss, check_grad_norm   a non-finite loss or gradient norm stops the step before the weights change
  end_step          after every optimizer step: a NaN or inf parameter stops the run before it is logged or saved;
                    the metrics record; zero_gradient (a run whose first ZERO_GRAD_STEPS steps all had gradient
                    norm exactly 0 stops: nothing learns); the checkpoint when due
A run that must stop raises Stop; train.main prints it with the last good checkpoint (exit 1). Every message is one
line on stderr; tests/test_run_folder.py feeds each the inputs that once broke it.
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
from run_folder import (at, checkpoint_dir, folder_kind, is_run_config, last_checkpoint, local, metrics_until,
                        max_lora_rank, one_line, open_nofollow, read_adapter_config, read_bounded, read_json, read_records,
                        read_state, save_checkpoint)
from tasks import TaskError, build_prompt, load_task
from tools.provenance import legacy_identity, model_identity

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


def resumed_config(given, config_fields, paths):
    """The Config values of the run given as --resume (its config.json, paths made local); refuses (ValueError, one
    line) a flag on the command line that would change what the run is (a different arm, lr, model...)."""
    run, names = given["resume"], {f.name: f.default for f in config_fields}
    saved = resumable_config(run, config_fields)            # a whole train.py config.json, or one line
    resumed = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names}
    resumed.update({k: local(resumed[k]) for k in paths if k in resumed})       # from any working directory
    resumed["eval_data"] = eval_files(resumed.get("eval_data", ()), local)
    for k, v in given.items():
        was = resumed.get(k, names[k])
        if k not in RESUMABLE and same(v) != same(was):
            raise ValueError(f"--resume {run}: --{k.replace('_', '-')} {shown(v)} would change the run (it has "
                             f"{shown(was)}); only {', '.join('--' + r.replace('_', '-') for r in RESUMABLE[1:-1])} "
                             f"may change on resume")
    return resumed


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



def load_data(cfg):
    """train.py's data, checked before a run folder exists: -> (train set, {task: held-out rows}). Refuses (one line)
    an --eval-data pair for no held-out task, an empty task, a model whose files do not load, a --lora-r above the
    layers' size, and a prompt that with --max-new-tokens exceeds the model's context."""
    train = load_task(cfg.task, "train", seed=cfg.seed, path=cfg.data_path)
    files = dict(item.partition("=")[::2] for item in cfg.eval_data)     # offline machines: no hub for test sets
    if any(not f for f in files.values()) or len(files) < len(cfg.eval_data):
        raise ValueError(f"--eval-data takes one TASK=FILE pair per task, got {' '.join(cfg.eval_data)}")
    for name in files:                                       # a file for no held-out task would be ignored silently
        if name not in (cfg.eval_tasks or (cfg.task,)):
            raise ValueError(f"--eval-data {name}=...: {name} is not a held-out task of this run (those are: "
                             f"{', '.join(cfg.eval_tasks or (cfg.task,))}; add it with --eval-tasks)")
    held_out = {name: load_task(name, "test", n=cfg.eval_n, path=files.get(name))
                for name in (cfg.eval_tasks or (cfg.task,))} if cfg.eval_n else {}
    for name, rows in [(cfg.task, train), *held_out.items()]:
        if not rows:
            raise TaskError(f"task {name!r} has no examples")
    from policy import check_model_source
    from transformers import AutoConfig, AutoTokenizer
    source = check_model_source(cfg.model)                  # a short name (smollm2-135m) -> its converted folder
    try:
        tok, model_cfg = AutoTokenizer.from_pretrained(source), AutoConfig.from_pretrained(source)
    except OSError as e:                                     # hub id not cached offline, no access, no such repo
        raise OSError(f"cannot load model {cfg.model!r}: {one_line(e)[:160]}" + ("" if os.path.isdir(source) else
                      "; without a network a hub id must be in the Hugging Face cache (HF_HUB_OFFLINE=1 says so at "
                      "once); offline models: --model smollm2-135m (real_model.py) or the default tiny one")) from None
    limit = max_lora_rank(source)
    if limit and cfg.lora_r > limit:
        raise ValueError(f"--lora-r {cfg.lora_r} exceeds {limit}, the smallest dimension of the layers LoRA adapts in "
                         f"{cfg.model} (a larger rank adds parameters, not capacity)")
    context = getattr(model_cfg.get_text_config(), "max_position_embeddings", None)
    questions = sorted({ex["question"] for rows in (train, *held_out.values()) for ex in rows})
    # the template adds the same text to every question: render only the 64 longest questions (rendering all 10k
    # took ~4 s per run), so the longest prompt is among them up to a token or two at the seams, checked exactly
    by_length = sorted(zip(map(len, tok(questions)["input_ids"]), questions))[-64:]
    longest = max(len(ids) for ids in tok([build_prompt(tok, q, cfg.prompt_format, cfg.thinking)
                                           for _, q in by_length])["input_ids"])
    if context and longest + cfg.max_new_tokens > context:
        raise ValueError(f"longest prompt ({longest} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds the "
                         f"model's context of {context} tokens")
    return train, held_out

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


def check_resume(cfg, out):
    """Before a resume writes anything (its folder locked): the last checkpoint's state.pt (weights_only), its adapter
    rank against --lora-r, the base model's identity against the model_id the run recorded, and metrics.jsonl and
    resumes.jsonl readable (a torn last record is dropped). All read through the pinned folder (at), so a swapped
    --resume link cannot hand the checks one folder and the loading another.
    -> (state, the run's provenance, metrics.jsonl's text up to the checkpoint's step); ValueError (one line)."""
    try:
        state = read_state(out)
        if read_adapter_config(checkpoint_dir(at(out)), cfg.model)["r"] != cfg.lora_r:
            raise ValueError(f"--resume {out}: the checkpoint's adapter rank differs from --lora-r {cfg.lora_r}")
        if not os.path.isfile(os.path.join(ckpt := checkpoint_dir(at(out)), "adapter_model.safetensors")):
            raise ValueError(f"--resume {out}: {ckpt}/adapter_model.safetensors is missing (the adapter's weights)")
        saved = read_json(at(out, "config.json"))
        provenance = {k: saved.get(k) for k in ("code_commit", "code_dirty", "model_id", "machine")}
        now = model_identity(cfg.model)                      # a run started before full hashing has the sampled id
        if provenance["model_id"] and provenance["model_id"] not in (now, legacy_identity(cfg.model)):
            raise ValueError(f"--resume {out}: base model {cfg.model} has model_id {now}, but this run was trained "
                             f"on model_id {provenance['model_id']} (another model, or its files changed)")
        kept = metrics_until(out, state["step"])            # a corrupt metrics.jsonl refuses before anything is written
        read_records(at(out, "resumes.jsonl"), shown=os.path.join(out, "resumes.jsonl"))   # so does resumes.jsonl
    except ValueError as e:                                  # messages name the folder as the user gave it
        raise ValueError(str(e).replace(at(out), out)) from None
    return state, provenance, kept


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

    def records(self, recs):
        for rec in recs:
            self.write(json.dumps(rec) + "\n")

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


class Stop(Exception):
    """A run that must end (a non-finite loss, gradient or weight; a configuration that cannot learn): its one-line
    reason. train.main prints it with the last good checkpoint and exits 1."""


def check_loss(loss, m, step):
    """Before backward: a non-finite loss stops the step, naming the term (pg_term / kl_term) that overflowed."""
    if not math.isfinite(loss.item()):
        bad = " and ".join(t[:-5] for t in ("pg_term", "kl_term") if not math.isfinite(m[t])) or "total"
        raise Stop(f"non-finite loss at step {step} ({bad} term: pg_term={m['pg_term']}, kl_term={m['kl_term']})")


def check_grad_norm(grad_norm, step):
    """Before the optimizer step: a non-finite gradient norm would write NaN into every weight."""
    if not math.isfinite(grad_norm):
        raise Stop(f"non-finite gradient norm at step {step}")


def end_step(run, cfg, step, rec, rewards, logp, mask):
    """After the optimizer step, in this order: a NaN or inf parameter stops the run before anything of this step is
    logged or saved; the step's metrics record; a run that cannot learn stops (zero_gradient); the checkpoint, every
    --save-every steps and at the last."""
    if (bad := first_nonfinite(run.model)) is not None:
        raise Stop(f"non-finite parameter {bad} after the optimizer step at step {step}")
    run.log.records([rec])
    if (stop := zero_gradient(run.zeros, cfg, step, rec["grad_norm"], rewards, logp, mask)) is not None:
        raise Stop(stop)
    if step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
        save(run.out, run.model, run.optimizer, step + 1, run.snapshots)


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
