"""run_folder.py -- what a run folder holds, written and read back: the one-writer lock, files never written through
a link, checkpoints, metrics.jsonl; and what a folder is (run, checkpoint, model), so train.py writes only into its own.

    <run>/.lock            the one-writer lock (lock_run): an flock held by the writing process, which it names
    <run>/config.json      the Config of train.py (written atomically by train.start_run), its paths relative to the
                           repository root when they lie inside it (portable), plus provenance written once, when
                           the run starts (tools/provenance.py: code_commit, code_dirty, model_id, machine); each
                           resume appends its own to resumes.jsonl
    <run>/metrics.jsonl    one record per step ("type": "train") and per held-out evaluation ("type": "eval")
    <run>/checkpoint/      the peft adapter + state.pt (optimizer, RNG states, step, async snapshots), written to
                           checkpoint.tmp and renamed into place, so a crash leaves checkpoint or checkpoint.old
    <run>/metrics.png      the main curves, and a markdown summary on stdout (tools/report.py)
state.pt holds tensors and plain values only and is read with weights_only=True: a run folder is data that a user
may have been handed, never code to execute (read_adapter_config bounds an adapter's ranks before peft allocates
them). Kept apart from train.py so the training loop reads as the recipe.
"""
import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import math
import os
import pickle
import random
import shutil
import signal
import stat
import sys

import torch

from tools.provenance import WEIGHT_FILES

REPO = os.path.dirname(os.path.abspath(__file__))          # the checkout train.py runs from


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


def _no_link(path, what="file", hard=True):
    """ValueError (one line) if `path` is a symbolic link or (hard) a file with other names (hard links): writing it
    in place would change a file outside the folder (`ln -s ~/victim run/.lock` once made the victim hold a PID)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}); a {what} is written in place, never "
                         f"through a link: remove the link")
    if hard and not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
        raise ValueError(f"{path} has {st.st_nlink - 1} other name(s) (hard links) that writing it would change too; "
                         f"remove it or make it a plain copy")


RUN_FILES = (".lock", "config.json", "metrics.jsonl", "metrics.png", "resumes.jsonl", "checkpoint", "checkpoint.tmp",
             "checkpoint.old")                              # every name train.py writes in a run folder
IN_PLACE = (".lock", "metrics.jsonl")  # written in place (the rest by rename, which breaks a hard link: a `cp -al` copy)


def check_links(folder, names=RUN_FILES, what="run folder's file"):
    """Refuse (ValueError, one line) a folder holding a symbolic link or a multiply-linked file where a tool writes."""
    for name in names:
        _no_link(os.path.join(folder, name), what, hard=name in IN_PLACE)


def open_nofollow(path, mode="r", buffering=-1):
    """open() for a file in a run or study folder: never through a symbolic link (O_NOFOLLOW), never a file with
    other names (hard links) or that is not a regular file (a FIFO, /dev/zero); "w" truncates only after those checks.
    Modes r, w, a (+ b). -> a file object; ValueError (one line) for a link or a non-regular file."""
    flags = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND}[mode[0]]
    if "+" in mode:
        flags = flags & ~os.O_WRONLY | os.O_RDWR
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link; files here are read and written in place, never through a "
                             f"link: remove the link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if mode[0] != "r" and st.st_nlink > 1:
            raise ValueError(f"{path} has {st.st_nlink - 1} other name(s) (hard links) that writing it would change "
                             f"too; remove it or make it a plain copy")
        os.set_blocking(fd, True)
        if mode[0] == "w":
            os.ftruncate(fd, 0)
        return open(fd, mode, buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def write_atomic(path, data):
    """Write text or bytes to path so that a reader finds the old file or the new one, never a part of either: a new
    temporary file in the same folder (O_EXCL | O_NOFOLLOW: never an existing file or a link planted there), flushed
    to disk, then renamed over path (os.replace is atomic and replaces a link or a hard-linked name, not its target).
    Any failure (a full disk) removes the temporary file."""
    for k in itertools.count():
        tmp = f"{path}.{os.getpid()}{'.' + str(k) if k else ''}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with open(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


JSON_LIMIT = 64 << 20                                        # no config, result or cache the tools read is larger


def read_bounded(path, limit=JSON_LIMIT):
    """A regular file's text, refusing one over `limit` bytes (a config.json linked to /dev/zero read until memory ran
    out). ValueError for a non-regular or too large file; OSError as open()."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)      # a FIFO must not block the open
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit >> 20} MiB")
    return data.decode("utf-8", errors="replace")


def read_json(path):
    """A small JSON file's value, or None if it is missing, unreadable, too large or not JSON."""
    try:
        return json.loads(read_bounded(path))
    except (OSError, ValueError, RecursionError):
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


_held = {}                  # run folder (as given, absolute) -> (its open, locked .lock file, its directory's fd)


def lock_run(out, names=RUN_FILES, what="run folder"):
    """Make `out` if needed and take its one-writer lock: an exclusive flock on <out>/.lock (which holds the holder's
    PID), kept until this process exits; the OS releases it, so even kill -9 leaves no stale lock. Taken before
    anything in the folder is read or written. The folder is resolved once and pinned: an open descriptor of it, so
    that at(out, name) reaches this folder even if `out` is later re-linked or moved (a swapped --out symlink let a run
    write its checkpoints into another run). `names`, the files the caller writes there, may not be links (check_links).
    -> the folders it created, for release_run. Held by another process: ValueError naming the folder and its PID.
    A study folder (comedy.py) takes the same lock: lock_run(study, names=(...its files...), what="study folder")."""
    made, d = [], os.path.abspath(out)
    while not os.path.lexists(d):
        made.append(d)
        d = os.path.dirname(d)
    os.makedirs(out, exist_ok=True)
    key, st = os.path.abspath(out), os.stat(out)
    for k, (_, fd) in list(_held.items()):                   # this process's earlier run there (an in-process caller),
        if k == key or (os.fstat(fd).st_dev, os.fstat(fd).st_ino) == (st.st_dev, st.st_ino):   # by any spelling
            release_run(k, [])
    _no_link(os.path.join(out, ".lock"), f"{what}'s lock")
    dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        f = open_nofollow(f"/proc/self/fd/{dfd}/.lock", "a+")
    except BaseException:
        os.close(dfd)
        raise
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read(32).strip() or "unknown"
        f.close()
        os.close(dfd)
        raise ValueError(f"{what} {out} is in use by another process (PID {pid}); one writer per {what}: "
                         f"wait for it to end or pick another{' --out' if what == 'run folder' else ' folder'}") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[key] = (f, dfd)
    try:
        check_links(out, names, f"{what}'s file")
    except BaseException:
        release_run(out, made)
        raise
    return made


def at(out, *names):
    """A path inside run folder `out` through its pinned descriptor when this process holds its lock (lock_run), so a
    re-linked `out` cannot redirect a write; else the plain path."""
    held = _held.get(os.path.abspath(out))
    return os.path.join(f"/proc/self/fd/{held[1]}" if held else out, *names)


def holder(folder):
    """The PID written in <folder>/.lock if a live process holds its lock, else None (then nobody writes there)."""
    try:
        f = open_nofollow(os.path.join(folder, ".lock"), "r")
    except (OSError, ValueError):
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return f.read(32).strip() or "unknown"


def release_run(out, made):
    """Undo lock_run after a failed start: remove the folders it made (they hold only .lock), then drop the lock."""
    f, dfd = _held.pop(os.path.abspath(out), (None, None))
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
        os.close(dfd)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------
def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _remove(path):
    """Remove a file, a link (never what it points to) or a folder tree; nothing if it is not there."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def save_checkpoint(out, model, optimizer, step, snapshots):
    """<out>/checkpoint = peft adapter + state.pt, written to a new temporary folder (made here: a link planted as
    checkpoint.tmp is removed, never written through) and renamed into place, all through the pinned folder (at).
    A failed write (a full disk: OSError, or safetensors' SafetensorError) removes the temporary folder and leaves the
    previous checkpoint as it was."""
    tmp, final, old = (at(out, n) for n in ("checkpoint.tmp", "checkpoint", "checkpoint.old"))
    _remove(tmp)
    try:
        os.mkdir(tmp)
        model.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                    "snapshots": list(snapshots)}, os.path.join(tmp, "state.pt"))
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(tmp)                                     # give back what the partial write took
        raise
    if os.path.isdir(final) and not os.path.islink(final):
        _remove(old)                                         # final is whole: the one before it may go
        os.replace(final, old)
    os.replace(tmp, final)                                   # (resumed from checkpoint.old: it stays until here)
    _remove(old)


def checkpoint_dir(run):
    """The last complete checkpoint (a crash between the two renames leaves checkpoint.old)."""
    final = os.path.join(run, "checkpoint")
    return final if os.path.isfile(os.path.join(final, "state.pt")) else os.path.join(run, "checkpoint.old")


def read_state(run):
    """state.pt of the run's last checkpoint. weights_only: a run folder is data, never code to execute."""
    path = os.path.join(checkpoint_dir(at(run)), "state.pt")
    shown = os.path.join(run, os.path.relpath(path, at(run)))    # messages name the folder as the user gave it
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{shown} holds more than tensors and plain values; refusing to unpickle it "
                         f"({one_line(e)[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{shown} is unreadable or truncated ({one_line(e)[:120]})") from None
    if not (isinstance(state, dict) and {"step", "optimizer", "rng", "snapshots"} <= state.keys()
            and type(state["step"]) is int and state["step"] >= 0):
        raise ValueError(f"{shown} does not hold a train.py checkpoint state (step, optimizer, rng, snapshots)")
    return state


def one_line(e):
    """An exception as one line: its message's first line, or its type's name when the message is empty."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def max_lora_rank(model):
    """The smallest in/out dimension of the layers LoRA adapts (peft's "all-linear": every nn.Linear but the output
    head), from a weightless meta-device copy of the architecture (~0.1 s for a 7B); None if it cannot be built."""
    try:
        from tools.real_model import resolve
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
    if cfg.get("modules_to_save"):                           # whole trained copies of layers: not what train.py saves
        raise ValueError(f"{path}: modules_to_save = {str(cfg['modules_to_save'])[:60]}; train.py's adapters are "
                         f"LoRA matrices only")
    targets = cfg.get("target_modules")                      # peft takes a name pattern or a list of names
    if not (targets is None or isinstance(targets, str) or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"{path}: target_modules = {str(targets)[:60]}; expected a module name pattern or names")
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
        step = read_state(out)["step"]
        return f"last good checkpoint: {os.path.join(out, os.path.basename(checkpoint_dir(at(out))))} (step {step})"
    except ValueError:
        return "no checkpoint was written yet (see --save-every)"


def restore(state, optimizer, snapshots):
    """Load state.pt into the optimizer, the async snapshots and the RNGs; -> the step to continue from."""
    optimizer.load_state_dict(state["optimizer"])
    snapshots.extend(state["snapshots"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["rng"]["python"]))
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def read_records(path, limit=1 << 30, shown=None):
    """The JSON records of a .jsonl file in a run folder (bounded, never through a link) -> (records, their lines,
    torn): a last line cut off mid-record (a crash or a full disk during an append) is dropped and reported as
    torn=True; any other line that is not a JSON object is a ValueError naming the file (`shown`) and line."""
    shown = shown or path
    try:
        with open_nofollow(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return [], [], False
    if len(data) > limit:
        raise ValueError(f"{shown} is larger than {limit >> 20} MiB")
    *whole, tail = data.decode("utf-8", errors="replace").split("\n")   # tail: after the last newline
    recs = []
    for i, line in enumerate(whole):
        try:
            recs.append(json.loads(line))
            assert isinstance(recs[-1], dict)
        except (ValueError, AssertionError, RecursionError):
            raise ValueError(f"{shown}: line {i + 1} is not a JSON record ({line[:60]!r}); only a cut-off last line "
                             f"is recovered") from None
    torn = tail.strip() != ""                                # each record is written with its newline, in one write
    return recs, whole, torn


def metrics_until(run, step):
    """metrics.jsonl's text up to the checkpoint at `step` (what the interrupted run logged after it is dropped and
    redone, so the file reads like one uninterrupted run), checked before a resume writes anything. A torn last
    record is recovered with a note on stderr. ValueError (one line) for a corrupt record."""
    shown = os.path.join(run, "metrics.jsonl")
    recs, lines, torn = read_records(at(run, "metrics.jsonl"), shown=shown)
    if any(type(r.get("step")) is not int for r in recs):
        raise ValueError(f"{shown}: a record without an integer step")
    if torn:
        print(f"train.py: note: the last record of {shown} was cut off (a crash or a full disk mid-write); it lies "
              f"after the step-{step} checkpoint, so it is dropped and redone", file=sys.stderr)
    return "".join(line + "\n" for r, line in zip(recs, lines) if r["step"] < step)


def append_record(run, name, rec):
    """Add one JSON record to <run>/<name> (resumes.jsonl) by rewriting it whole (write_atomic): never through a
    link, and a last record cut off by an earlier crash is dropped rather than glued to this one."""
    _, lines, _ = read_records(at(run, name), shown=os.path.join(run, name))
    write_atomic(at(run, name), "".join(line + "\n" for line in lines) + json.dumps(rec) + "\n")


def read_metrics(run, kind=None):
    """The records of <run>/metrics.jsonl, optionally only one "type" ("train" or "eval")."""
    recs = read_records(at(run, "metrics.jsonl"), shown=os.path.join(run, "metrics.jsonl"))[0]
    return recs if kind is None else [r for r in recs if r["type"] == kind]
