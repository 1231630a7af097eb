"""tools/provenance.py -- which code, which base model and which machine a run folder came from.

train.py writes these into config.json once, when a run starts (each resume appends its own to resumes.jsonl), and a
resume is refused when the base model's identity changed; comedy.py refuses to pool runs of different code versions.
None of it is needed to follow one RL step, so it lives here rather than at the top level.

    code_version()      (commit, dirty) of the checkout: dirty = a tracked .py file differs from the commit
    machine()           torch build, the CPU capability it dispatches to, CPU model, threads, Python
    model_identity(m)   sha256 of every byte loading reads (config, tokenizer, every weight file), 16 hex digits
    legacy_identity(m)  the sampled fingerprint that runs started before full hashing recorded (still resumable)
"""
import hashlib
import itertools
import os
import platform
import struct
import subprocess

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the checkout train.py runs from


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
SAMPLES, SAMPLE_BYTES = 16, 4096          # legacy_identity: the sampled fingerprint of runs started before full hashing


def model_folder(model):
    """The local folder of a model: the folder itself, a short name's converted folder (real_model.py), or a hub id's
    snapshot in the Hugging Face cache (or None)."""
    from tools.real_model import resolve
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
    """A fingerprint of the base model (16 hex digits), or None if it has no local folder: the sha256 of every byte
    of the files loading reads (config, tokenizer, chat template, every weight file), by name. A copied folder keeps
    its identity (no mtimes, no paths); any changed byte changes it (sampling 16 blocks of each weight file let 13 of
    the tiny model's 29 tensors be negated unseen). Each file's digest is cached by size + mtime + inode
    (real_model.file_digest), so a 7B's 15 GB are read once, not at every start and resume."""
    from tools.real_model import file_digest
    folder = model_folder(model)
    if not folder:
        return None
    h = hashlib.sha256()
    try:
        for name in sorted(os.listdir(folder)):
            if name in MODEL_FILES or name.endswith(WEIGHT_FILES):
                h.update(f"{name}\0{file_digest(os.path.join(folder, name))}\0".encode())
    except OSError:                                          # an unreadable file: no identity, not a crash
        return None
    return h.hexdigest()[:16]


def legacy_identity(model):
    """The model_id that runs started before full hashing recorded (until 8d6a27b): the sha256 of the config and
    tokenizer files whole and, of each weight file, its name, size, safetensors header and 16 evenly spaced 4 KiB
    samples. Kept so that those runs stay resumable: a resume accepts either identity (guards.check_resume)."""
    folder = model_folder(model)
    if not folder:
        return None
    h = hashlib.sha256()
    try:
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
    except (OSError, struct.error):
        return None
    return h.hexdigest()[:16]
