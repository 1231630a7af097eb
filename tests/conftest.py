import os
import sys

# Offline by default: a hub id then fails in ~2 s instead of ~50 s, and nothing is downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread is faster than two fighting over a busy 2-core machine (10-100x for
# generate), and subprocesses (train.py, eval.py) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import glob  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def doc_text(name):
    """The text of docs/<name> (e.g. doc_text("toy-study.md"))."""
    with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as f:
        return f.read()


def docs_text():
    """README.md, then every docs/*.md in name order, joined by blank lines: the whole user documentation, for tests
    that hold a number or a sentence in it to the results wherever the text lives."""
    pages = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    texts = []
    for page in pages:
        with open(page, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matmuls: a second OpenMP thread only adds barrier waits (milliseconds per op on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama + the project's BPE tokenizer, saved once per test session."""
    from tools import tiny_model
    return tiny_model.build_random_model(str(tmp_path_factory.mktemp("tiny") / "m"), hidden_size=64,
                                         intermediate_size=128, num_hidden_layers=2)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The real model (real_model.py) converted once per test session into a cache of its own; every test, train.py
    run and notebook kernel of the session then finds it there (real_model.CACHE and $KL_RL_CACHE), so nothing
    reads or writes ~/.cache. Conversion: ~25 s on an idle CPU, once per session (all pytest -n workers)."""
    import time

    from tools import real_model
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):                 # pytest -n: the workers share one conversion
        base = base.parent                                   # (real_model's lock makes the second one wait, then reuse)
    root = str(base / "kl-rl-cache")
    os.makedirs(root, exist_ok=True)
    os.environ["KL_RL_CACHE"] = root                          # subprocesses and notebook kernels
    real_model.CACHE = os.path.join(root, "models")
    t0 = time.time()
    folder = real_model.folder("smollm2-135m", quiet=True)
    return {"folder": folder, "cache": real_model.CACHE, "seconds": time.time() - t0}


def fail_writes(monkeypatch, name, *modules, nth=1, exact=False):
    """A full disk: open() in `modules` gives files named like `name` (its basename equals `name` when `exact`, else
    contains it: write_atomic's temporary names do), opened for writing or appending, whose nth write stores half of
    what it is given, then fails with ENOSPC. Files opened by descriptor (write_atomic, open_nofollow) are named by
    /proc/self/fd."""
    import builtins
    import errno
    count = [0]

    class Half:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            count[0] += 1
            if count[0] < nth:
                return self.f.write(data)
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def writelines(self, lines):
            return self.write("".join(lines))

        def __getattr__(self, attr):
            return getattr(self.f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)
        real = os.path.basename(os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else str(path))
        hit = real == name if exact else name in real
        return Half(f) if ("a" in mode or "w" in mode) and hit else f
    for m in modules:
        monkeypatch.setattr(m, "open", fake_open, raising=False)

