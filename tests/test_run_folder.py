"""A run folder nobody can corrupt (issue 17): provenance (code version, base model identity, portable paths), one
writer per folder, no write outside a fresh or own run folder, no non-finite checkpoint, no silent no-op training,
one-line errors and atomic files. Runs use a tiny random Llama and 2-3 steps, mostly in-process (train.main)."""
import dataclasses
import errno
import fcntl
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import guards
from conftest import fail_writes
import run_folder
from tools import provenance, tiny_model
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "3", "--micro-batch-size", "6",
         "--max-new-tokens", "4", "--eval-n", "4", "--eval-every", "0", "--lr", "0.05"]


def fails_with_one_line(capsys, argv, code=2):
    capsys.readouterr()                                                   # only what this call prints
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if "train.py" in line and not line.startswith(("train.py: warning", "train.py: step "))]
    assert e.value.code == code and len(err) == 1 and err[0].startswith("train.py: error:"), (e.value.code, err)
    return err[0]


@pytest.fixture
def model(model_dir, tmp_path):
    """A private copy of the tiny random model (tests edit it)."""
    return shutil.copytree(model_dir, tmp_path / "model")


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
    """A 3-step run on its own copy of the tiny model -> (run folder, model folder); tests copy the run."""
    d = tmp_path_factory.mktemp("finished")
    model = shutil.copytree(model_dir, d / "model")
    assert train.main(["--model", str(model), "--out", str(d / "run"), *SMALL, "--steps", "3"]) == 0
    return d / "run", model


# ---------------------------------------------------------------------------------------------------------
# 1. Provenance (code_version: test_provenance.py)
# ---------------------------------------------------------------------------------------------------------
def test_model_identity_follows_content_not_location(model, model_dir, tmp_path):
    ident = provenance.model_identity(str(model))
    assert len(ident) == 16 and ident == provenance.model_identity(model_dir)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in os.listdir(model):                                           # a plain copy: new mtimes, same bytes
        (copy / f).write_bytes((model / f).read_bytes())
    (copy / "README.md").write_text("notes")                              # a file loading never reads
    assert provenance.model_identity(str(copy)) == ident
    other = tiny_model.build_random_model(str(tmp_path / "other"), seed=1, hidden_size=64,
                                                         intermediate_size=128, num_hidden_layers=2)
    assert os.path.getsize(os.path.join(other, "model.safetensors")) == os.path.getsize(model / "model.safetensors")
    assert provenance.model_identity(other) != ident                      # same shapes and sizes, other weights
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
    assert provenance.model_identity(str(copy)) != ident
    assert provenance.model_identity("no/such-hub-id") is None


def test_config_records_provenance_and_paths_relative_to_the_repository(model, tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"                                              # a checkout that is not a git repository
    shutil.copytree(model, repo / "models" / "m")
    monkeypatch.setattr(run_folder, "REPO", str(repo))                   # where portable() stores paths from
    monkeypatch.setattr(provenance, "REPO", str(repo))                   # where code_version() asks git
    monkeypatch.chdir(repo)
    assert train.main(["--model", "models/m", "--out", "runs/r", *SMALL]) == 0
    cfg = json.load(open(repo / "runs" / "r" / "config.json"))
    assert cfg["model"] == "models/m" and cfg["out"] == "runs/r" and cfg["resume"] is None
    assert cfg["code_commit"] is None and cfg["code_dirty"] is None      # no git repository: null
    assert cfg["model_id"] == provenance.model_identity(str(model))
    monkeypatch.chdir(tmp_path)                                           # resume from another working directory
    assert train.main(["--resume", str(repo / "runs" / "r"), "--steps", "3"]) == 0
    cfg2 = json.load(open(repo / "runs" / "r" / "config.json"))
    assert cfg2["model"] == "models/m" and cfg2["out"] == "runs/r" and cfg2["steps"] == 3
    assert cfg2["model_id"] == cfg["model_id"] and cfg2["code_commit"] is None
    resumes = [json.loads(line) for line in open(repo / "runs" / "r" / "resumes.jsonl")]
    assert resumes[0]["from_step"] == 2 and "code_commit" in resumes[0]
    steps = [json.loads(line)["step"] for line in open(repo / "runs" / "r" / "metrics.jsonl") if '"train"' in line]
    assert steps == [0, 1, 2]


def test_resume_refuses_another_base_model(finished, tmp_path, capsys):
    run, model = finished
    out = shutil.copytree(run, tmp_path / "run")
    before = (out / "config.json").read_text()
    recorded = json.loads(before).get("model_id")
    text = (model / "config.json").read_text()
    try:
        (model / "config.json").write_text(json.dumps({**json.loads(text), "rms_norm_eps": 1e-3}))   # same shapes
        line = fails_with_one_line(capsys, ["--resume", str(out), "--steps", "4"])
        assert recorded and recorded in line and provenance.model_identity(str(model)) in line
    finally:
        (model / "config.json").write_text(text)
    assert (out / "config.json").read_text() == before and not (out / "resumes.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------
# 2. One writer per run folder
# ---------------------------------------------------------------------------------------------------------
def default_sigint():
    """In the child before exec: SIGINT back to its default. A harness started in the background (`cmd &`, nohup)
    ignores SIGINT and its children inherit that, and train.py rightly leaves an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_two_processes_on_one_folder_one_wins_and_ctrl_c_names_its_checkpoint(model_dir, tmp_path):
    """The issue's reproduction: two train.py started at once on one --out (a double-submitted job). The one that
    gets the lock trains; the other exits 2 with one line. Then Ctrl-C (SIGINT) ends the winner with one line naming
    its last checkpoint, exit 130, and the folder holds one run: every line parses, each step once."""
    out = tmp_path / "race"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # k1-in-loss: the random model's rewards are all 0, so k1-in-reward's gradient is exactly 0 (π_θ = π_ref) and
    # the zero-gradient stop would end the winner after 20 steps
    procs = {seed: subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--model", model_dir, "--out",
                                     str(out), *SMALL, "--steps", "100000", "--save-every", "1", "--seed", str(seed),
                                     "--kl", "k1-in-loss", "--beta", "0.1"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                    preexec_fn=default_sigint)
             for seed in (1, 2)}
    try:
        deadline = time.time() + 240
        while all(p.poll() is None for p in procs.values()) and time.time() < deadline:
            time.sleep(0.1)
        (loser, lp), = [(seed, p) for seed, p in procs.items() if p.poll() is not None]
        (winner, wp), = [(seed, p) for seed, p in procs.items() if seed != loser]
        err = lp.communicate()[1].strip().splitlines()
        assert lp.returncode == 2 and len(err) == 1, err
        assert err[0] == (f"train.py: error: run folder {out} is in use by another process (PID {wp.pid}); one writer "
                          f"per run folder: wait for it to end or pick another --out")
        while not (out / "checkpoint" / "state.pt").exists() and time.time() < deadline and wp.poll() is None:
            time.sleep(0.1)
        time.sleep(0.3)                                   # somewhere in the next steps, maybe inside a save
        wp.send_signal(signal.SIGINT)
        err = wp.communicate(timeout=60)[1]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = [line for line in err.splitlines() if line.startswith("train.py:")
             and not line.startswith(("train.py: step ", "train.py: warning"))]
    step = run_folder.read_state(str(out))["step"]
    assert wp.returncode == 130 and len(lines) == 1 and "Traceback" not in err, (wp.returncode, err[-2000:])
    assert lines[0] == f"train.py: stopped by SIGINT; last good checkpoint: {out / 'checkpoint'} (step {step})"
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]          # every line parses
    steps = [r["step"] for r in recs if r["type"] == "train"]
    assert steps == list(range(len(steps))) and len(steps) >= step >= 1         # one run, each step once
    assert json.load(open(out / "config.json"))["seed"] == winner


def test_a_held_lock_is_one_line_naming_the_holder_and_nothing_is_written(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:                                 # another writer (this test) holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"{os.getpid()}\n")
        held.flush()
        line = fails_with_one_line(capsys, ["--model", model_dir, "--out", str(out), *SMALL])
        assert f"PID {os.getpid()}" in line and str(out) in line
        assert os.listdir(out) == [".lock"]


# ---------------------------------------------------------------------------------------------------------
# 3. Never write outside a fresh or own run folder
# ---------------------------------------------------------------------------------------------------------
def fake_run(folder, model_dir, **changes):
    """A run folder as train.py leaves it (config.json, metrics.jsonl, checkpoint/), without training."""
    (folder / "checkpoint").mkdir(parents=True)
    cfg = {**dataclasses.asdict(train.parse_config(["--model", model_dir, *SMALL])), "code_commit": None,
           "model_id": None, **changes}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 0}) + "\n")
    (folder / "checkpoint" / "adapter_config.json").write_text("{}")
    (folder / "checkpoint" / "state.pt").write_bytes(b"")
    return folder


def snapshot(folder):
    """Every file's bytes (but the one-writer lock's, which holds the last writer's PID)."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files if f != ".lock"}


@pytest.mark.parametrize("where,says", [
    ("run/checkpoint", "inside the run folder"),                    # the outer run's next save deletes it
    ("run/checkpoint/x", "inside the checkpoint folder"),
    ("run/sub", "inside the run folder"),
    ("model", "the --model folder"),                                # would overwrite the model's config.json
    ("model/sub", "inside the --model folder"),
    ("other-model/sub", "inside the model folder"),
    ("other-model", "is a model folder"),
    ("stale", "holds the metrics of a run that never wrote a checkpoint"),
    ("k3", "holds a run of another configuration (--kl k3-in-loss there"),
    ("tree", "holds other folders (data)"),
])
def test_out_refuses_every_folder_it_does_not_own(model, model_dir, tmp_path, capsys, where, says):
    fake_run(tmp_path / "run", str(model))
    shutil.copytree(model_dir, tmp_path / "other-model")
    (tmp_path / "stale").mkdir()                                    # a run that died before its first checkpoint
    (tmp_path / "stale" / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 0}) + "\n")
    (tmp_path / "k3").mkdir()                                       # a run of another arm that never started
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "k3" / "config.json").write_text(json.dumps({**cfg, "kl": "k3-in-loss"}))
    (tmp_path / "tree" / "data").mkdir(parents=True)
    before = snapshot(tmp_path)
    line = fails_with_one_line(capsys, ["--model", str(model), "--out", str(tmp_path / where), *SMALL])
    assert says in line, line
    assert snapshot(tmp_path) == before                             # nothing written anywhere
    if where == "stale":
        assert f"rm -rf {tmp_path / where}" in line                  # how to start over


def test_out_accepts_a_job_folder_with_its_log(model_dir, tmp_path):
    """comedy.py (or a scheduler) makes the folder and opens its log there first."""
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "log.txt").write_text("started\n")
    assert train.check_out(train.parse_config(["--model", model_dir, *SMALL]), str(tmp_path / "job")) is None


@pytest.mark.parametrize("device", ["meta", "cuda", "cuda:7", "tpu", "nonsense"])
def test_bad_device_is_one_line_and_leaves_no_folder(model_dir, tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.device_count() > int(device.partition(":")[2] or 0):
        pytest.skip("that CUDA device exists here")
    line = fails_with_one_line(capsys, ["--model", model_dir, "--out", str(tmp_path / "run"), "--device", device,
                                        *SMALL])
    assert "--device" in line and not os.path.exists(tmp_path / "run")


# ---------------------------------------------------------------------------------------------------------
# 4. No non-finite checkpoint, no silent no-op training
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,says", [
    (["--ratio-clip", "2", "8"], "excludes 1"),                                # on-policy ρ ≡ 1 is clamped to 2
    (["--ratio-clip", "0", "0.5", "--async-level", "1"], "excludes 1"),      # ρ = 1 at the start: never moves
    (["--token-budget", "inf"], "--token-budget inf"),
    (["--weight-decay", "1e300"], "--weight-decay"),                          # θ·(1 − lr·wd): non-finite weights
    (["--lr", "1e38"], "overflows float32"),
])
def test_known_no_op_or_non_finite_configurations_are_refused_up_front(model_dir, tmp_path, capsys, flags, says):
    line = fails_with_one_line(capsys, ["--model", model_dir, "--out", str(tmp_path / "run"), *SMALL, *flags])
    assert says in line and not os.path.exists(tmp_path / "run")


def test_non_finite_parameters_stop_the_run_before_a_checkpoint(model_dir, tmp_path, capsys, monkeypatch):
    step = torch.optim.AdamW.step
    calls = []

    def poisoned(opt, *a, **k):                  # the second update makes one weight NaN (any cause: lr, data, bug)
        out = step(opt, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                opt.param_groups[0]["params"][3].view(-1)[0] = math.nan
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "run"
    capsys.readouterr()
    assert train.main(["--model", model_dir, "--out", str(out), *SMALL, "--steps", "4", "--save-every", "1"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py: error")]
    assert len(err) == 1 and "non-finite parameter" in err[0] and "at step 1" in err[0], err
    assert "lora" in err[0] and "last good checkpoint" in err[0] and "(step 1)" in err[0]
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 1      # the good one stays
    from safetensors.torch import load_file
    assert all(t.isfinite().all() for t in load_file(out / "checkpoint" / "adapter_model.safetensors").values())
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"train"' in line] == [0]


def test_finite_weights_that_overflow_the_forward_pass_stop_with_one_line(model_dir, tmp_path, capsys):
    """--lr 1e30 without clipping: AdamW's first update sets every LoRA value to ~±1e30, finite, so the parameter
    guard passes, but the next forward pass overflows and generate met NaN probabilities (a 30-line traceback).
    The shipped model: its groups' rewards differ at step 0, so the first update is not zero."""
    out = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(["--model", os.path.join(ROOT, "assets", "tiny-arith"), "--out", str(out), "--steps", "3",
                    "--prompts-per-step", "4", "--eval-every", "0", "--eval-n", "4", "--save-every", "1",
                    "--lr", "1e30", "--max-grad-norm", "0"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert e.value.code == 1 and len(err) == 1, err
    assert "non-finite next-token probabilities while sampling at step 1" in err[0] and "(step 1)" in err[0], err


@pytest.mark.parametrize("flags,cause", [
    (["--temperature", "1e-9"], "sampling is greedy"),                      # log-probs saturate at 0: no gradient
    (["--kl", "none", "--constant-reward"], "got the same reward"),
])
def test_zero_gradient_warns_once_then_stops_after_k_steps(model_dir, tmp_path, capsys, monkeypatch, flags, cause):
    monkeypatch.setattr(guards, "ZERO_GRAD_STEPS", 3)
    if "--constant-reward" in flags:
        flags = flags[:-1]
        monkeypatch.setattr(train, "reward", lambda name, text, ex: 1.0)
    out = tmp_path / "run"
    capsys.readouterr()
    assert train.main(["--model", model_dir, "--out", str(out), *SMALL, "--steps", "6", *flags]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py: e") or "warning" in line]
    assert len(err) == 2 and cause in err[0]
    assert err[0].startswith("train.py: warning: gradient norm exactly 0 at step 0")
    assert err[1].startswith("train.py: error: gradient norm exactly 0 at each of the first 3 steps") and cause in err[1]
    assert [json.loads(line)["grad_norm"] for line in open(out / "metrics.jsonl") if '"train"' in line] == [0.0] * 3


def test_a_zero_gradient_streak_after_learning_is_a_result_not_a_stop(model_dir, tmp_path, capsys, monkeypatch):
    """An arm without KL whose completions all fail (a collapse) has advantages 0 from then on: the run warns once
    and goes on, since it did learn before; only a run that never had a gradient is a silent no-op."""
    monkeypatch.setattr(guards, "ZERO_GRAD_STEPS", 3)
    calls = itertools.count()                   # 4 greedy eval rewards, then step 0's 6 (2 prompts × G 3), then 0s
    monkeypatch.setattr(train, "reward", lambda name, text, ex: float(4 <= (n := next(calls)) < 10 and n % 2))
    capsys.readouterr()
    argv = ["--model", model_dir, "--out", str(tmp_path / "run"), *SMALL, "--steps", "7", "--kl", "none",
            "--eval-modes", "greedy"]
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    grads = [json.loads(line)["grad_norm"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"train"' in line]
    assert grads[0] > 0 and grads[1:] == [0.0] * 6                  # 6 zero steps > K = 3, yet the run finished
    assert err.count("warning: gradient norm exactly 0") == 1 and "error" not in err


# ---------------------------------------------------------------------------------------------------------
# 5. Bounds: LoRA rank (data files and gold answers: test_hardening.py; eval.py's adapters: test_eval.py)
# ---------------------------------------------------------------------------------------------------------
def test_lora_rank_is_bounded_by_the_smallest_adapted_layer(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir)                  # the real layers, independently of the bound
    smallest = min(min(x.in_features, x.out_features) for x in m.modules()
                   if isinstance(x, torch.nn.Linear) and x is not m.get_output_embeddings())
    assert run_folder.max_lora_rank(model_dir) == smallest
    train.load_data(train.parse_config(["--model", model_dir, *SMALL, "--lora-r", str(smallest)]))   # fits
    for r in (smallest + 1, 10**9):                                      # 10^9: terabytes, tried before the fix
        line = fails_with_one_line(capsys, ["--model", model_dir, "--out", str(tmp_path / "run"), *SMALL,
                                            "--lora-r", str(r)])
        assert f"--lora-r {r} exceeds {smallest}" in line and not os.path.exists(tmp_path / "run")


# ---------------------------------------------------------------------------------------------------------
# 7. One line, not a traceback (exit 2 for bad input, 1 at runtime, 128 + N for signal N)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("state,says", [
    (b"", "unreadable or truncated"), ([1, 2], "does not hold a train.py checkpoint"),
    ({"step": "3", "optimizer": {}, "rng": {}, "snapshots": []}, "does not hold"),
])
def test_a_broken_state_pt_is_one_line(model_dir, tmp_path, capsys, state, says):
    run = fake_run(tmp_path / "run", model_dir)
    if not isinstance(state, bytes):
        torch.save(state, run / "checkpoint" / "state.pt")
    before = snapshot(run)
    assert says in fails_with_one_line(capsys, ["--resume", str(run), "--steps", "3"])
    assert snapshot(run) == before


@pytest.mark.parametrize("key,value", [("lr", "fast"), ("seed", 1e23), ("kl", "bogus"), ("steps", 2.5),
                                       ("eval_tasks", "arith"), ("ratio_clip", [0, "8"]), ("load_in_4bit", 1)])
def test_a_corrupt_value_in_config_json_is_one_line(model_dir, tmp_path, capsys, key, value):
    run = fake_run(tmp_path / "run", model_dir)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, key: value}))
    assert f"config.json has {key} = {value!r}" in fails_with_one_line(capsys, ["--resume", str(run), "--steps", "3"])


@pytest.mark.parametrize("flags,says", [(["--threads", "-1"], "--threads"), (["--seed", str(10**20)], "--seed"),
                                        (["--eval-data", "bogus=FILE"], "bogus is not a held-out task")])
def test_bad_flags_are_one_line(model_dir, tmp_path, capsys, flags, says):
    line = fails_with_one_line(capsys, ["--model", model_dir, "--out", str(tmp_path / "run"), *SMALL, *flags])
    assert says in line and not os.path.exists(tmp_path / "run")


def test_a_full_disk_during_a_checkpoint_names_the_intact_one(model_dir, tmp_path, capsys, monkeypatch):
    save, calls = torch.save, []

    def full_disk(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    line = fails_with_one_line(capsys, ["--model", model_dir, "--out", str(out), *SMALL, "--steps", "3",
                                        "--save-every", "1"], code=1)
    assert "cannot write the step-2 checkpoint (" in line and "No space left on device" in line
    assert f"last good checkpoint: {out / 'checkpoint'} (step 1)" in line
    assert not (out / "checkpoint.tmp").exists() and run_folder.read_state(str(out))["step"] == 1


def test_sigterm_handler_names_the_last_checkpoint(model_dir, tmp_path, capsys):
    """The handler train.py installs on the command line (SIGINT: a real process, in the race test), for SIGTERM."""
    run = fake_run(tmp_path / "run", model_dir)
    torch.save({"step": 7, "optimizer": {}, "rng": {}, "snapshots": []}, run / "checkpoint" / "state.pt")
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train.stop_on_signals(str(run))
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)                                 # the handler runs at the next bytecode
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL        # a second SIGTERM ends it at once
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    assert e.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == f"train.py: stopped by SIGTERM; last good checkpoint: {run / 'checkpoint'} " \
                                      f"(step 7)\n"


# ---------------------------------------------------------------------------------------------------------
# 8. Atomic writes: a reader finds the old file or the new one, never a part
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl"])
def test_a_failed_write_on_resume_leaves_config_and_metrics_whole(finished, tmp_path, capsys, monkeypatch, name):
    """A resume rewrites config.json, then metrics.jsonl (dropping what followed the checkpoint: the final eval), and
    appends to resumes.jsonl last. A full disk there: one line naming the intact checkpoint (exit 1, a runtime failure,
    not a usage error), the old file whole, no record of a resume that never ran."""
    out = shutil.copytree(finished[0], tmp_path / "run")
    before = (out / name).read_text()
    fail_writes(monkeypatch, name, train, run_folder)
    line = fails_with_one_line(capsys, ["--resume", str(out), "--steps", "4"], code=1)
    assert "No space left on device" in line and "last good checkpoint" in line and "(step 3)" in line
    assert (out / name).read_text() == before and not list(out.glob("*.tmp"))   # the old file, whole
    assert not (out / "resumes.jsonl").exists()


def test_a_failed_write_leaves_the_eval_result_whole(model_dir, tmp_path, monkeypatch):
    import eval as ev
    fast = ["--model", model_dir, "--tasks", "arith", "--samples", "1", "--limit", "4", "--max-new-tokens", "4",
            "--bootstrap", "20", "--out", str(tmp_path / "eval.json")]
    ev.run_eval(ev.resolve(ev.parse_args(fast)))
    before = (tmp_path / "eval.json").read_text()
    fail_writes(monkeypatch, "eval.json", ev, run_folder)
    with pytest.raises(OSError):
        ev.run_eval(ev.resolve(ev.parse_args(fast)))
    assert (tmp_path / "eval.json").read_text() == before and os.listdir(tmp_path) == ["eval.json"]
