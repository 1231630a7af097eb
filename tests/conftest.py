import os
import sys

# Offline by default: a hub id then fails in ~2 s instead of ~50 s (env-notes §2), and nothing is downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread is faster than two fighting over a busy 2-core machine (10-100x for
# generate), and subprocesses (train.py, eval.py) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
