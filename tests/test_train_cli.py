"""train.py as a user and an attacker meet it: resume that cannot change the run, run folders that are data
(never code), one-line errors for bad input, a fast --help, progress without a terminal, and the run summary.
Runs use a tiny random Llama and 2 steps; most call train.main() in-process."""
import builtins
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "3", "--micro-batch-size", "4",
         "--max-new-tokens", "4", "--eval-n", "4", "--lr", "0.05"]


@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory):
    """A 2-step run made through the real command line (stderr is a pipe, not a terminal)."""
    out = tmp_path_factory.mktemp("run") / "r"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", model_dir, "--out", str(out),
                        *SMALL], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    return out, p


def copy_run(src, dst):
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def fails_with_one_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "train.py" in line]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("train.py: error:"), err
    return err[0]


# ---------------------------------------------------------------------------------------------------------
# Progress and summary
# ---------------------------------------------------------------------------------------------------------
def test_progress_lines_without_a_terminal(finished_run):
    out, p = finished_run
    assert "train.py: step 1/2" in p.stderr and "train.py: step 2/2" in p.stderr   # no bar, but progress


def test_the_in_reward_penalty_is_logged_beside_the_zero_kl_term(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "reward", lambda name, text, ex: float(zlib.crc32(text.encode()) % 2))
    assert train.main(["--model", model_dir, "--out", str(tmp_path), *SMALL, "--steps", "3", "--beta", "0.5"]) == 0
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"train"' in line]
    for r in recs:   # k1-in-reward: nothing in the loss, β·mean(Σ k1) subtracted from the reward
        assert r["kl_term"] == 0 and r["kl_penalty"] == pytest.approx(0.5 * r["kl_k1"], abs=1e-6)
    assert recs[-1]["kl_penalty"] != 0


def test_summary_averages_the_last_tenth_of_steps_and_the_plot_is_titled(tmp_path, capsys, monkeypatch):
    cfg = dict(kl="k3-in-loss", beta=0.3, lr=0.01, adv="rloo", group_size=4)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    keys = ("reward", "kl_k1", "kl_k3", "token_rkl", "token_fkl", "entropy", "completion_len", "kl_term", "kl_penalty",
            "grad_norm", "time_step")
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(40):   # reward = step: first 0, the last 4 steps (10%) average 37.5
            exact = ("token_rkl", "token_fkl", "entropy") if step % 15 else ()   # --diag-every 15: steps 0, 15, 30
            f.write(json.dumps({"type": "train", "step": step, **{k: float(step) for k in keys if k not in exact}})
                    + "\n")
    titles, legends = [], []
    import matplotlib.figure
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (titles.append(fig._suptitle.get_text()), legends.extend(
                            t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()),
                                              save(fig, *a, **k)))
    from tools.report import report
    report(str(tmp_path))
    out = capsys.readouterr().out
    assert "| train reward | 0.0000 | 37.5000 |" in out and "mean of the last 4 steps" in out
    assert "| train entropy | 0.0000 | 30.0000 |" in out        # no diagnostic in the last 4: the last of 3 logged
    assert "--kl k3-in-loss" in titles[0] and "β = 0.3" in titles[0] and "lr = 0.01" in titles[0]
    assert "reward (mean of 2)" in legends                   # 40 steps: a 2-step moving average over the raw curve


def test_report_cli_redraws_a_run_but_never_a_live_or_foreign_folder(tmp_path, capsys):
    """python tools/report.py RUN: exit 0 on a run folder; one line, exit 2, nothing written on a folder without
    metrics.jsonl or one whose lock another process holds (train.py running there: one writer per run folder)."""
    from tools import report
    json.dump(dict(kl="k1-in-reward", beta=0.05, lr=0.01, adv="rloo", group_size=2), open(tmp_path / "config.json", "w"))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 0, "reward": 0.5, "time_step": 1.0})
                                            + "\n")
    assert report.main([str(tmp_path)]) == 0 and (tmp_path / "metrics.png").is_file()
    assert report.main([str(tmp_path / "no-run")]) == 2 and not (tmp_path / "no-run").exists()
    (tmp_path / "metrics.png").unlink()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); import run_folder; "
                               "run_folder.lock_run(sys.argv[2]); print('locked', flush=True); time.sleep(60)", ROOT,
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert report.main([str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"PID {holder.pid}" in err[0] and not (tmp_path / "metrics.png").exists(), err
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------------------
# Resume: the same run or nothing
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [["--kl", "k3-in-loss"], ["--lr", "1e6"], ["--beta", "0.2"], ["--group-size", "4"],
                                   ["--seed", "1"]])
def test_resume_refuses_a_flag_that_changes_the_run(finished_run, tmp_path, capsys, flags):
    run = copy_run(finished_run[0], tmp_path / "r")
    before = open(run / "config.json").read()
    line = fails_with_one_line(capsys, ["--resume", str(run), *flags])
    assert "would change the run" in line and flags[0] in line
    assert open(run / "config.json").read() == before and not os.path.exists(run / "resumes.jsonl")


def test_resume_with_more_steps_is_recorded(finished_run, tmp_path):
    run = copy_run(finished_run[0], tmp_path / "r")
    assert train.main(["--resume", str(run), "--steps", "3", "--eval-every", "0"]) == 0
    record = [json.loads(line) for line in open(run / "resumes.jsonl")]
    assert len(record) == 1 and record[0]["from_step"] == 2 and "--steps" in record[0]["argv"]
    assert json.load(open(run / "config.json"))["steps"] == 3


class CodeInPickle:
    """What a crafted state.pt could hold: unpickling it calls open(marker, "w"), i.e. runs code."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_a_crafted_checkpoint_is_refused_without_running_its_code(finished_run, tmp_path, capsys):
    run = copy_run(finished_run[0], tmp_path / "r")
    marker = tmp_path / "code-ran"
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=True)
    torch.save({**state, "payload": CodeInPickle(str(marker))}, run / "checkpoint" / "state.pt")
    line = fails_with_one_line(capsys, ["--resume", str(run), "--steps", "3"])
    assert "refusing to unpickle" in line and not marker.exists()


def test_a_truncated_checkpoint_or_corrupt_config_is_one_line_and_rewrites_nothing(finished_run, tmp_path, capsys):
    run = copy_run(finished_run[0], tmp_path / "r")
    path = run / "checkpoint" / "state.pt"
    path.write_bytes(path.read_bytes()[:100])
    before = open(run / "config.json").read()
    assert "truncated" in fails_with_one_line(capsys, ["--resume", str(run), "--steps", "3"])
    assert open(run / "config.json").read() == before
    (run / "config.json").write_text('{"kl": "k1-in-rew')
    assert "corrupt" in fails_with_one_line(capsys, ["--resume", str(run)])


@pytest.mark.parametrize("leftover", ["checkpoint", "checkpoint.old", "checkpoint.tmp"])
def test_out_refuses_a_folder_holding_any_checkpoint_state(model_dir, tmp_path, capsys, leftover):
    (tmp_path / leftover).mkdir()
    line = fails_with_one_line(capsys, ["--model", model_dir, "--out", str(tmp_path), *SMALL])
    assert "already holds a run" in line and (tmp_path / leftover).is_dir()


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before anything is written
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,says", [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--lora-dropout", "1.5"], "--lora-dropout"),
    (["--eval-every", "-1"], "--eval-every"), (["--save-every", "-2"], "--save-every"),
    (["--rollout-batch-size", "-8"], "--rollout-batch-size"), (["--weight-decay", "inf"], "--weight-decay"),
])
def test_bad_numbers_are_one_line(model_dir, tmp_path, capsys, flags, says):
    line = fails_with_one_line(capsys, ["--model", model_dir, "--out", str(tmp_path / "run"), *flags])
    assert says in line and not os.path.exists(tmp_path / "run")


def test_broken_model_folders_are_one_line(model_dir, tmp_path, capsys):
    no_weights = copy_run(model_dir, tmp_path / "no-weights")
    os.remove(no_weights / "model.safetensors")
    truncated = copy_run(model_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
    for folder in (no_weights, truncated):
        line = fails_with_one_line(capsys, ["--model", str(folder), "--out", str(tmp_path / "run"), *SMALL])
        assert "cannot load model" in line and not os.path.exists(tmp_path / "run")


def test_mistyped_local_folder_is_not_taken_for_a_hub_id(tmp_path, capsys, monkeypatch):
    (tmp_path / "mymodels").mkdir()
    monkeypatch.chdir(tmp_path)
    assert "model folder not found: mymodels/tiny" in fails_with_one_line(capsys, ["--model", "mymodels/tiny"])


def test_unwritable_out_is_one_line(model_dir, capsys):
    if os.access("/sys", os.W_OK) and os.path.isdir("/sys/kl-rl"):
        pytest.skip("/sys is writable here")
    assert "kl-rl" in fails_with_one_line(capsys, ["--model", model_dir, "--out", "/sys/kl-rl/run", *SMALL])


# ---------------------------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------------------------
def test_help_is_readable_and_does_not_load_the_model_stack(capsys):
    probe = ("import runpy, sys; sys.argv = ['train.py', '--help']\n"
             "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('LOADED', [m for m in ('transformers', 'peft', 'bitsandbytes') if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "LOADED []" in p.stdout, p.stdout[-300:]
    text = p.stdout
    assert "Commands" in text and "--resume" in text
    assert "(default: ())" not in text and "(0.0, 8.0)" not in text and "(default: None)" not in text
    assert "default: 0.0 8.0" in text and "default: off" in text
    assert "default: the training task's) (default" not in text                  # no default said twice
