"""run_folder.py -- what a run folder holds, written and read back: provenance, the one-writer lock, checkpoints,
metrics.jsonl, the report; and what a folder is (run, checkpoint, model), so train.py writes only into its own.

    <run>/.lock            the one-writer lock (lock_run): an flock held by the writing process, which it names
    <run>/config.json      the Config of train.py (written atomically by train.start_run), its paths relative to the
                           repository root when they lie inside it, plus provenance written once, when the run
                           starts: code_commit / code_dirty (code_version), model_id (model_identity) and machine
                           (torch build, CPU capability, threads: machine()); each resume appends its own to
                           resumes.jsonl
    <run>/metrics.jsonl    one record per step ("type": "train") and per held-out evaluation ("type": "eval")
    <run>/checkpoint/      the peft adapter + state.pt (optimizer, RNG states, step, async snapshots), written to
                           checkpoint.tmp and renamed into place, so a crash leaves checkpoint or checkpoint.old
    <run>/metrics.png      the main curves, and a markdown summary on stdout (report)

state.pt holds tensors and plain values only and is read with weights_only=True: a run folder is data that a user
may have been handed, never code to execute (read_adapter_config bounds an adapter's ranks before peft allocates
them). Kept apart from train.py so the training loop reads as the recipe.
"""
import contextlib
import ctypes
import fcntl
import hashlib
import itertools
import json
import math
import os
import pickle
import platform
import random
import shutil
import signal
import struct
import subprocess

import torch

REPO = os.path.dirname(os.path.abspath(__file__))          # the checkout train.py runs from


# ---------------------------------------------------------------------------------------------------------
# Provenance: which code and which base model a run folder came from
# ---------------------------------------------------------------------------------------------------------
def code_version(repo=None):
    """(commit, dirty) of the git checkout at `repo`: dirty = a tracked .py file differs from the commit.
    (None, None) without git, outside a repository or when git is slow: provenance must never stop a run."""
    def git(*args):
        return subprocess.run(["git", "-C", repo or REPO, *args], capture_output=True, text=True, timeout=5)
    try:
        sha = git("rev-parse", "--verify", "HEAD")
        if sha.returncode:
            return None, None
        status = git("status", "--porcelain", "--untracked-files=no", "--", "*.py")
        return sha.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def machine():
    """What decides a run's floats beyond the commit: the torch build, the CPU kernels it dispatches to (AVX2 vs
    AVX-512 round differently: the same command differs from step 0 at ~1e-6 on another CPU kind), the threads.
    A single run agrees to the digit with another only when these agree too."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in itertools.islice(f, 64) if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "torch_git": torch.version.git_version, "cuda": torch.version.cuda,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")
SAMPLES, SAMPLE_BYTES = 16, 4096


def model_folder(model):
    """The local folder of a model: the folder itself, a short name's converted folder (real_model.py), or a hub id's
    snapshot in the Hugging Face cache (or None)."""
    from real_model import resolve
    model = resolve(model)
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(model, "config.json")
    except Exception:                                       # not a valid repo id, no cache: nothing to fingerprint
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def model_identity(model):
    """A fingerprint of the base model (16 hex digits), or None if it has no local folder. Hashes the files that
    loading reads (config, tokenizer, chat template) whole, and of each weight file its name, size, safetensors
    header (names, dtypes, shapes, offsets) and 16 evenly spaced 4 KiB samples of its data: ~64 KiB read per
    file, however big. A copied folder keeps its identity (no mtimes, no paths); an edited config or other weights of
    the same shape (fine-tuned, re-initialised) change it, since they change nearly every sampled block."""
    folder = model_folder(model)
    try:
        return _fingerprint(folder) if folder else None
    except OSError:                                          # an unreadable file: no identity, not a crash
        return None


def _fingerprint(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name in MODEL_FILES or name.endswith(WEIGHT_FILES):
            h.update(f"{name}\0{os.path.getsize(path)}\0".encode())
        if name in MODEL_FILES or name.endswith(".index.json"):
            with open(path, "rb") as f:
                h.update(f.read())
        elif name.endswith(WEIGHT_FILES):
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                start = 0
                if name.endswith(".safetensors") and size >= 8:
                    n = struct.unpack("<Q", f.read(8))[0]      # safetensors: 8-byte length, then a JSON header
                    h.update(f.read(min(n, 100_000_000)))
                    start = 8 + n
                for k in range(SAMPLES):
                    f.seek(start + k * max(0, size - start - SAMPLE_BYTES) // (SAMPLES - 1))
                    h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def portable(path, root=None):
    """How config.json stores a path: relative to the repository root when it lies inside it (a committed run folder
    must not carry the machine it ran on), else absolute; a hub id or a missing path unchanged."""
    if not path or not os.path.exists(path):
        return path
    rel = os.path.relpath(os.path.abspath(path), root or REPO)
    return os.path.abspath(path) if rel == ".." or rel.startswith(".." + os.sep) else rel


def local(path, root=None):
    """A stored path back to one that works from any working directory (portable's inverse)."""
    if path and not os.path.isabs(path) and os.path.exists(os.path.join(root or REPO, path)):
        return os.path.join(root or REPO, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# One writer per run folder, and what a folder is
# ---------------------------------------------------------------------------------------------------------
def die_with_parent():
    """preexec_fn of every worker process (comedy's runs, bench's and gpu_check's workers): the child gets SIGTERM
    when its parent dies, even by SIGKILL (Linux parent-death signal), so no worker outlives the command."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def write_atomic(path, text):
    """Write text to path so that a reader finds the old file or the new one, never a part of either: a temporary
    file in the same folder, flushed to disk, then renamed over path (os.replace is atomic)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_json(path):
    """A small JSON file's value, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_run_config(cfg):
    return isinstance(cfg, dict) and {"kl", "beta", "group_size", "lora_r"} <= cfg.keys()


def folder_kind(d):
    """What `d` is to train.py: "checkpoint" (a peft adapter or state.pt), "run" (a run folder: its config, metrics
    or checkpoints), "model" (a config.json with weight files) or None (anything else)."""
    has = lambda n: os.path.exists(os.path.join(d, n))      # noqa: E731
    if has("state.pt") or has("adapter_config.json"):
        return "checkpoint"
    cfg = read_json(os.path.join(d, "config.json")) if has("config.json") else None
    if is_run_config(cfg) or any(has(n) for n in ("metrics.jsonl", "checkpoint", "checkpoint.old")):
        return "run"
    if has("config.json") and any(n.endswith(WEIGHT_FILES) for n in os.listdir(d)):
        return "model"
    return None



_held = {}                                                   # run folder -> this process's open, locked .lock file


def lock_run(out):
    """Make `out` if needed and take its one-writer lock: an exclusive flock on <out>/.lock (which holds the holder's
    PID), kept until this process exits; the OS releases it, so even kill -9 leaves no stale lock. Taken before
    anything in the folder is read or written. -> the folders it created, for release_run. Held by another process:
    ValueError naming the folder and that process's PID."""
    made, d = [], os.path.abspath(out)
    while not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    os.makedirs(out, exist_ok=True)
    key = os.path.realpath(out)
    if key in _held:                                         # this process's earlier run there (an in-process caller)
        _held.pop(key).close()
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise ValueError(f"run folder {out} is in use by another process (PID {pid}); one writer per run folder: "
                         f"wait for it to end or pick another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[key] = f
    return made


def release_run(out, made):
    """Undo lock_run after a failed start: remove the folders it made (they hold only .lock), then drop the lock."""
    f = _held.pop(os.path.realpath(out), None)
    if made:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out, ".lock"))
        for d in made:
            try:
                os.rmdir(d)
            except OSError:
                break
    if f:
        f.close()


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------
def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(out, model, optimizer, step, snapshots):
    """<out>/checkpoint = peft adapter + state.pt, written to a temporary folder and renamed into place. A failed
    write (a full disk: OSError) removes the temporary folder and leaves the previous checkpoint as it was."""
    tmp, final, old = (os.path.join(out, n) for n in ("checkpoint.tmp", "checkpoint", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                    "snapshots": list(snapshots)}, os.path.join(tmp, "state.pt"))
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)               # give back what the partial write took
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(run):
    """The last complete checkpoint (a crash between the two renames leaves checkpoint.old)."""
    final = os.path.join(run, "checkpoint")
    return final if os.path.isfile(os.path.join(final, "state.pt")) else os.path.join(run, "checkpoint.old")


def read_state(run):
    """state.pt of the run's last checkpoint. weights_only: a run folder is data, never code to execute."""
    path = os.path.join(checkpoint_dir(run), "state.pt")
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds more than tensors and plain values; refusing to unpickle it "
                         f"({one_line(e)[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable or truncated ({one_line(e)[:120]})") from None
    if not (isinstance(state, dict) and {"step", "optimizer", "rng", "snapshots"} <= state.keys()
            and type(state["step"]) is int and state["step"] >= 0):
        raise ValueError(f"{path} does not hold a train.py checkpoint state (step, optimizer, rng, snapshots)")
    return state


def one_line(e):
    """An exception as one line: its message's first line, or its type's name when the message is empty."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def max_lora_rank(model):
    """The smallest in/out dimension of the layers LoRA adapts (peft's "all-linear": every nn.Linear but the output
    head), from a weightless meta-device copy of the architecture (~0.1 s for a 7B); None if it cannot be built."""
    try:
        from real_model import resolve
        from transformers import AutoConfig, AutoModelForCausalLM
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve(model)))
    except Exception:                                        # a hub id offline, an unknown architecture: loading says
        return None
    head = m.get_output_embeddings()
    dims = [min(x.in_features, x.out_features) for x in m.modules() if isinstance(x, torch.nn.Linear) and x is not head]
    return min(dims) if dims else None


def read_adapter_config(folder, model):
    """<folder>/adapter_config.json, checked before peft allocates anything from it: a LoRA config whose ranks are
    integers from 1 to max_lora_rank(model) (r = 1e9 tried to allocate hundreds of GB). ValueError saying why not."""
    path = os.path.join(folder, "adapter_config.json")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is unreadable or not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA" or not isinstance(cfg.get("rank_pattern") or {}, dict):
        raise ValueError(f"{path} is not a LoRA adapter config (peft_type {cfg.get('peft_type')!r})")
    limit = max_lora_rank(model)
    ranks = {"r": cfg.get("r"), **{f"rank_pattern[{k!r}]": v for k, v in (cfg.get("rank_pattern") or {}).items()}}
    for key, r in ranks.items():
        if not (type(r) is int and 1 <= r <= (limit or r)):
            raise ValueError(f"{path}: {key} = {r!r}; a LoRA rank is an integer from 1 to {limit or 'the layer size'} "
                             f"(the smallest dimension of the layers it adapts in {model})")
    alpha = cfg.get("lora_alpha", 8)
    if not (type(alpha) in (int, float) and math.isfinite(alpha)):
        raise ValueError(f"{path}: lora_alpha = {alpha!r} is not a finite number")
    return cfg


def last_checkpoint(out):
    try:
        return f"last good checkpoint: {checkpoint_dir(out)} (step {read_state(out)['step']})"
    except ValueError:
        return "no checkpoint was written yet (see --save-every)"


def restore(state, optimizer, snapshots, metrics_path):
    """Load state.pt into the optimizer, the async snapshots and the RNGs; -> the step to continue from."""
    optimizer.load_state_dict(state["optimizer"])
    snapshots.extend(state["snapshots"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["rng"]["python"]))
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    # drop what the interrupted run logged after its checkpoint, so the file reads like one uninterrupted run
    kept = [line for line in open(metrics_path) if json.loads(line)["step"] < state["step"]] \
        if os.path.isfile(metrics_path) else []
    write_atomic(metrics_path, "".join(kept))                # a crash here must not lose the kept steps
    return state["step"]


# ---------------------------------------------------------------------------------------------------------
# Summary table and curves
# ---------------------------------------------------------------------------------------------------------
def moving_average(xs, w):
    """Trailing mean over the last w values (fewer at the start), the same length as xs."""
    return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


def read_metrics(run, kind=None):
    """The records of <run>/metrics.jsonl, optionally only one "type" ("train" or "eval")."""
    recs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    return recs if kind is None else [r for r in recs if r["type"] == kind]


def report(out):
    """Markdown summary on stdout and the main curves in metrics.png, both from metrics.jsonl.

    Single steps are noisy: the summary gives the first step next to the mean over the last 10% of steps (the
    README's tables use the same), and the plot draws a moving average over the raw curve."""
    from matplotlib.figure import Figure                     # no pyplot: a notebook's backend is left alone
    cfg = json.load(open(os.path.join(out, "config.json")))
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
    fig.savefig(os.path.join(out, "metrics.png"), dpi=80)
    print(f"run folder: {out}  (config.json, metrics.jsonl, metrics.png, checkpoint/)")
