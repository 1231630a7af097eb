"""A run records what decides its floats beyond the commit (issue 25): config.json's "machine" (torch version and
build, the CPU capability torch dispatches to, threads) at the start, and each resume's own in resumes.jsonl, so a
difference between two machines' runs of one command can be explained. And `--eval-n 0` runs no held-out evaluation
(a study's step-0 evaluation equals its base evaluation, its last one eval.py's)."""
import json
import os
import subprocess

import torch

import train
from tools import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--save-every", "1"]


def test_machine_provenance_and_no_eval(model_dir, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, "--out", str(out), *SMALL, "--steps", "1", "--eval-n", "0"]) == 0
    cfg = json.load(open(out / "config.json"))
    box = cfg["machine"]
    assert box["torch"] == torch.__version__ and box["torch_git"] == torch.version.git_version
    assert box["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and box["threads"] >= 1 and box["cpu"]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["type"] for r in records] == ["train"]                   # no step-0 and no final held-out evaluation
    assert train.main(["--resume", str(out), "--steps", "2"]) == 0
    resumes = [json.loads(line) for line in open(out / "resumes.jsonl")]
    assert len(resumes) == 1 and resumes[0]["machine"]["cpu_capability"] == box["cpu_capability"]
    assert json.load(open(out / "config.json"))["machine"] == box    # the start's record is kept, not overwritten
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["type"] for r in records] == ["train", "train"]


def test_code_version_is_the_checkout_or_none():
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        head = ""
    commit, dirty = provenance.code_version()
    if head:
        assert commit == head and isinstance(dirty, bool)
    assert provenance.code_version("/") == (None, None)                    # not a repository: None, never a crash
    path = os.environ["PATH"]
    try:
        os.environ["PATH"] = ""                                           # no git installed
        assert provenance.code_version() == (None, None)
    finally:
        os.environ["PATH"] = path
