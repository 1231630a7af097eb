"""Run folders that cannot be turned against their user (issue 26): no write through a symbolic or hard link, a run
folder pinned against a swapped --out link, a model identity over every byte, config.json and metrics.jsonl that a
resume checks before it writes anything, torn records recovered, a full disk that loses nothing, a converted real
model verified before use. Each test fails on the code before the issue (checked). Runs: the tiny random Llama,
2-3 steps, in-process except where the test is about a process. Part 2, the inputs a run trusts (model identity,
the converted real model, caps, hostile inputs): test_hardening_inputs.py."""
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import run_folder
from tools import provenance
import train
from conftest import fail_writes
from test_run_folder import SMALL, fails_with_one_line, finished  # noqa: F401 (finished: a fixture used here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run(finished, tmp_path):
    return shutil.copytree(finished[0], tmp_path / "run", symlinks=True)


def victim(tmp_path):
    v = tmp_path / "victim"
    v.write_text("precious\n")
    return v


# ---------------------------------------------------------------------------------------------------------
# 1. Never write through a link
# ---------------------------------------------------------------------------------------------------------
def test_a_symlinked_lock_in_a_fresh_folder_is_refused_and_the_victim_kept(model_dir, tmp_path, capsys):
    out, v = tmp_path / "r", victim(tmp_path)
    out.mkdir()
    (out / ".lock").symlink_to(v)
    line = fails_with_one_line(capsys, ["--model", model_dir, "--out", str(out), *SMALL])
    assert "symbolic link" in line and ".lock" in line
    assert v.read_text() == "precious\n" and os.listdir(out) == [".lock"]


def test_a_hard_linked_lock_is_refused_and_its_other_name_kept(model_dir, tmp_path, capsys):
    out, v = tmp_path / "r", victim(tmp_path)
    out.mkdir()
    os.link(v, out / ".lock")
    line = fails_with_one_line(capsys, ["--model", model_dir, "--out", str(out), *SMALL])
    assert "hard link" in line and v.read_text() == "precious\n"


@pytest.mark.parametrize("name", ["metrics.png", "resumes.jsonl", "config.json", "metrics.jsonl"])
def test_a_run_file_linked_elsewhere_refuses_the_resume_and_the_victim_is_kept(run, tmp_path, capsys, name):
    v = victim(tmp_path)
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(v)
    line = fails_with_one_line(capsys, ["--resume", str(run), "--steps", "4"])
    assert "link" in line and name in line, line
    assert v.read_text() == "precious\n"


@pytest.mark.parametrize("name", ["metrics.png", "resumes.jsonl", "config.json"])
def test_a_hard_linked_copy_resumes_and_its_other_name_is_kept(run, tmp_path, name):
    """A file train.py replaces by rename (not in place) may have other names, as in a `cp -al` / `rsync --link-dest`
    copy of a run: the rename breaks the link, so the resume goes on and the other name keeps its content."""
    other = tmp_path / "other-name"
    os.link(run / name, other) if (run / name).exists() else other.write_text('{"from_step": 1}\n')
    if not (run / name).exists():
        os.link(other, run / name)
    before = other.read_bytes()
    assert train.main(["--resume", str(run), "--steps", "4"]) == 0
    assert other.read_bytes() == before and os.stat(other).st_nlink == 1


def test_a_hard_linked_metrics_jsonl_of_a_fresh_run_is_refused(model_dir, tmp_path, capsys):
    """metrics.jsonl is written in place: an (empty) file with another name there is refused before anything is
    written into it, so the other name never receives a run's records."""
    out, v = tmp_path / "r", tmp_path / "empty-victim"
    out.mkdir()
    v.write_text("")
    os.link(v, out / "metrics.jsonl")
    with pytest.raises(SystemExit):
        train.main(["--model", model_dir, "--out", str(out), *SMALL])
    assert "hard link" in capsys.readouterr().err and v.read_text() == ""


def test_a_checkpoint_tmp_link_to_a_folder_is_never_written_into(run, tmp_path, capsys):
    target = tmp_path / "someone-elses"
    target.mkdir()
    (target / "README.md").write_text("mine\n")
    (run / "checkpoint.tmp").symlink_to(target, target_is_directory=True)
    line = fails_with_one_line(capsys, ["--resume", str(run), "--steps", "4"])
    assert "checkpoint.tmp" in line and "symbolic link" in line
    assert os.listdir(target) == ["README.md"] and (target / "README.md").read_text() == "mine\n"


def test_save_checkpoint_removes_a_planted_link_instead_of_writing_through_it(run, tmp_path):
    """The save itself (a link planted after the start): the link goes, the target stays as it was."""
    import torch
    target = tmp_path / "someone-elses"
    target.mkdir()
    (run / "checkpoint.tmp").symlink_to(target, target_is_directory=True)

    class Adapter:                                   # what save_checkpoint needs of a peft model
        def save_pretrained(self, d):
            with open(os.path.join(d, "adapter_model.safetensors"), "w") as f:
                f.write("x")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    run_folder.save_checkpoint(str(run), Adapter(), opt, 9, [])
    assert os.listdir(target) == [] and run_folder.read_state(str(run))["step"] == 9


def test_write_atomic_never_follows_a_link_planted_at_its_temporary_name(tmp_path):
    v = victim(tmp_path)
    path = tmp_path / "config.json"
    os.symlink(v, f"{path}.{os.getpid()}.tmp")
    run_folder.write_atomic(str(path), "{}")
    assert v.read_text() == "precious\n" and path.read_text() == "{}" and not path.is_symlink()


def test_open_nofollow_refuses_links_hard_links_and_devices(tmp_path):
    v = victim(tmp_path)
    (tmp_path / "s").symlink_to(v)
    os.link(v, tmp_path / "h")
    for name, mode in (("s", "a"), ("s", "w"), ("h", "w"), ("h", "a")):
        with pytest.raises(ValueError):
            run_folder.open_nofollow(str(tmp_path / name), mode)
    with pytest.raises(ValueError):
        run_folder.open_nofollow("/dev/zero", "r")
    assert v.read_text() == "precious\n"
    with run_folder.open_nofollow(str(tmp_path / "new"), "w") as f:
        f.write("ok")
    assert (tmp_path / "new").read_text() == "ok"


# ---------------------------------------------------------------------------------------------------------
# 2. The run folder is pinned: a swapped --out link does not redirect writes (a real process)
# ---------------------------------------------------------------------------------------------------------
def test_swapping_the_out_symlink_mid_run_does_not_redirect_writes(model_dir, tmp_path):
    a, b, link = tmp_path / "a", tmp_path / "b", tmp_path / "link"
    a.mkdir()
    b.mkdir()
    link.symlink_to(a, target_is_directory=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--model", model_dir, "--out", str(link),
                          *SMALL, "--steps", "6", "--save-every", "1", "--kl", "k1-in-loss", "--beta", "0.1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    with open(b / ".lock", "w") as held:             # b: another run's folder, its lock held
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            deadline = time.time() + 240
            while not (a / "checkpoint" / "state.pt").exists() and p.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            os.symlink(b, tmp_path / "link.new")
            os.replace(tmp_path / "link.new", link)   # --out now names b
            err = p.communicate(timeout=240)[1]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 0, err[-2000:]
    assert sorted(os.listdir(b)) == [".lock"]                                 # nothing written into the other run
    assert run_folder.read_state(str(a))["step"] == 6 and (a / "metrics.png").exists()
    steps = [json.loads(line)["step"] for line in open(a / "metrics.jsonl") if '"train"' in line]
    assert steps == list(range(6))


def test_one_process_relocking_its_folder_by_another_spelling_takes_it_over(tmp_path):
    """An in-process caller (a notebook running train.main twice) may name its run folder by another path, here a
    symlink to it: the second lock_run replaces this process's first hold instead of reporting itself as the other
    writer (the hold was keyed by the spelling only), and at() through the new spelling reaches the pinned folder."""
    real, alias = tmp_path / "real", tmp_path / "alias"
    real.mkdir()
    alias.symlink_to(real)
    run_folder.lock_run(str(real))
    try:
        run_folder.lock_run(str(alias))                   # before: ValueError "in use by another process (PID <self>)"
        assert str(real.resolve()) not in {os.path.realpath(k) for k in run_folder._held if k != str(alias)}
        assert os.path.samefile(run_folder.at(str(alias)), real) and run_folder.at(str(alias)).startswith("/proc/")
        assert run_folder.holder(str(real)) == str(os.getpid())
    finally:
        run_folder.release_run(str(alias), [])
    assert run_folder.holder(str(real)) is None             # released: nobody holds it


# ---------------------------------------------------------------------------------------------------------
# 5. A resume trusts only a whole train.py config.json, and a failed resume writes nothing
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [{}, {"config": {"model": "x"}, "tasks": {"arith": {}}},
                                    "drop:prompts_per_step", "drop:model_id"])
def test_a_config_json_without_the_runs_keys_refuses_resume_untouched(run, capsys, config):
    saved = json.loads((run / "config.json").read_text())
    if isinstance(config, str):
        saved.pop(config.split(":")[1])
        config = saved
    (run / "config.json").write_text(json.dumps(config))
    before = {n: (run / n).read_bytes() for n in ("config.json", "metrics.jsonl")}
    line = fails_with_one_line(capsys, ["--resume", str(run), "--steps", "4"])
    assert "not a train.py run's configuration" in line
    assert {n: (run / n).read_bytes() for n in before} == before and not (run / "resumes.jsonl").exists()


def test_a_failed_resume_writes_nothing(run, capsys):
    """A corrupt record in the middle of metrics.jsonl is found before config.json or resumes.jsonl is touched."""
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"type": "train", "st\n'
    (run / "metrics.jsonl").write_text("".join(lines))
    before = {n: (run / n).read_bytes() for n in ("config.json", "metrics.jsonl")}
    mtime = os.stat(run / "config.json").st_mtime_ns
    line = fails_with_one_line(capsys, ["--resume", str(run), "--steps", "4"])
    assert "metrics.jsonl: line 2" in line
    assert {n: (run / n).read_bytes() for n in before} == before and not (run / "resumes.jsonl").exists()
    assert os.stat(run / "config.json").st_mtime_ns == mtime


@pytest.mark.parametrize("damage", ["no adapter weights", "no adapter config"])
def test_a_resume_of_a_damaged_checkpoint_names_the_users_folder_not_the_pinned_one(run, capsys, damage):
    """The resume reads its checkpoint through the pinned folder (/proc/self/fd/N): a message must still name the
    folder the user gave (a checkpoint without its adapter weights once printed peft's "Repo id must be in the form
    ... '/proc/self/fd/3/checkpoint'"), and nothing is written."""
    os.remove(run / "checkpoint" / ("adapter_model.safetensors" if damage == "no adapter weights" else
                                    "adapter_config.json"))
    before = (run / "config.json").read_bytes()
    line = fails_with_one_line(capsys, ["--resume", str(run), "--steps", "4"])
    assert "/proc/" not in line and f"{run}/checkpoint" in line, line
    assert (run / "config.json").read_bytes() == before and not (run / "resumes.jsonl").exists()


def test_a_resumable_checkpoint_exists_at_every_moment_of_a_save(run, monkeypatch):
    """Resumed from checkpoint.old (a crash between the two renames of a save), the next save must not remove
    checkpoint.old before its new checkpoint is in place: at every rename, a resumable checkpoint exists."""
    os.replace(run / "checkpoint", run / "checkpoint.old")
    real_replace, seen = os.replace, []

    def replace(src, dst):
        if str(src).endswith("checkpoint.tmp"):
            seen.append((run / "checkpoint").is_dir() or (run / "checkpoint.old").is_dir())
        return real_replace(src, dst)
    monkeypatch.setattr(run_folder.os, "replace", replace)
    assert train.main(["--resume", str(run), "--steps", "4"]) == 0
    monkeypatch.undo()
    assert seen and all(seen) and (run / "checkpoint").is_dir() and not (run / "checkpoint.old").exists()


def test_a_corrupt_resumes_jsonl_refuses_before_config_json_is_rewritten(run, capsys):
    """A resume that will be refused for resumes.jsonl (a corrupt middle line) writes nothing: config.json keeps
    its --steps (it was rewritten with the new flags before resumes.jsonl was read)."""
    (run / "resumes.jsonl").write_text('{"from_step": 1}\nGARBAGE\n{"from_step": 2}\n')
    before = (run / "config.json").read_bytes()
    line = fails_with_one_line(capsys, ["--resume", str(run), "--steps", "6"])
    assert "resumes.jsonl: line 2" in line and (run / "config.json").read_bytes() == before


def test_a_run_from_before_full_hashing_still_resumes(run, finished, capsys):
    """Runs started before model_id hashed every byte recorded the sampled fingerprint; they stay resumable against
    the same model (provenance.legacy_identity), and another model is still refused."""
    cfg = json.loads((run / "config.json").read_text())
    legacy = provenance.legacy_identity(cfg["model"])
    assert legacy and legacy != cfg["model_id"]
    (run / "config.json").write_text(json.dumps({**cfg, "model_id": legacy}))
    assert train.main(["--resume", str(run), "--steps", "4"]) == 0
    (run / "config.json").write_text(json.dumps({**cfg, "model_id": "0" * 16}))
    assert "another model" in fails_with_one_line(capsys, ["--resume", str(run), "--steps", "5"])


# ---------------------------------------------------------------------------------------------------------
# 6. Torn records are recovered; a full disk loses nothing and leaves no temporary file
# ---------------------------------------------------------------------------------------------------------
def train_steps(run):
    return [json.loads(line)["step"] for line in open(run / "metrics.jsonl") if '"train"' in line]


def test_a_torn_last_metrics_record_is_dropped_and_redone(run, capsys):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 3, "reward": 0.')              # a crash or a full disk mid-append
    with open(run / "resumes.jsonl", "w") as f:
        f.write('{"time": "x", "from_step": 1}\n{"time": "y", "fro')        # a torn resumes.jsonl too
    capsys.readouterr()
    assert train.main(["--resume", str(run), "--steps", "4"]) == 0
    err = capsys.readouterr().err
    assert "was cut off" in err and "dropped and redone" in err and "Traceback" not in err
    assert train_steps(run) == [0, 1, 2, 3]
    resumes = [json.loads(line) for line in open(run / "resumes.jsonl")]   # every line parses
    assert [r["from_step"] for r in resumes] == [1, 3]


def test_a_full_disk_during_a_metrics_append_names_the_checkpoint_and_stays_resumable(run, capsys, monkeypatch):
    fail_writes(monkeypatch, "metrics.jsonl", train, run_folder, nth=2, exact=True)     # the second record of the resumed run
    before = (run / "metrics.jsonl").read_text()
    kept = "".join(line for line in before.splitlines(keepends=True) if json.loads(line)["step"] < 3)
    line = fails_with_one_line(capsys, ["--resume", str(run), "--steps", "6"], code=1)
    assert "No space left on device" in line and f"last good checkpoint: {run / 'checkpoint'} (step 3)" in line
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n") and text.startswith(kept) and [json.loads(x) for x in text.splitlines()]
    monkeypatch.undo()
    assert train.main(["--resume", str(run), "--steps", "4"]) == 0                # resumable, no hand-editing
    assert train_steps(run) == [0, 1, 2, 3]


def test_a_safetensors_error_during_a_save_is_one_line_and_leaves_no_temp_folder(model_dir, tmp_path, capsys,
                                                                                    monkeypatch):
    import peft.peft_model
    from safetensors import SafetensorError
    save, calls = peft.peft_model.safe_save_file, []

    def full_disk(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return save(tensors, path, *a, **k)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    out = tmp_path / "run"
    line = fails_with_one_line(capsys, ["--model", model_dir, "--out", str(out), *SMALL, "--steps", "3",
                                        "--save-every", "1"], code=1)
    assert "cannot write the step-2 checkpoint" in line and f"{out / 'checkpoint'} (step 1)" in line
    assert not (out / "checkpoint.tmp").exists() and run_folder.read_state(str(out))["step"] == 1


# ---------------------------------------------------------------------------------------------------------
# 9. Writes only into a new or own folder or file
# ---------------------------------------------------------------------------------------------------------
def test_out_refuses_a_folder_of_user_files_the_run_would_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.png").write_bytes(b"my own plot")
    line = fails_with_one_line(capsys, ["--model", model_dir, "--out", str(out), *SMALL])
    assert "metrics.png" in line and (out / "metrics.png").read_bytes() == b"my own plot"


def test_eval_out_never_overwrites_a_file_that_is_not_an_eval_result(model_dir, tmp_path):
    import eval as ev
    model = shutil.copytree(model_dir, tmp_path / "model")
    before = (model / "config.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        ev.resolve(ev.parse_args(["--model", str(model), "--tasks", "arith", "--out", str(model / "config.json")]))
    assert e.value.code == 2 and (model / "config.json").read_bytes() == before


def test_eval_out_accepts_its_own_earlier_result_of_any_size(model_dir, tmp_path):
    """An earlier eval.py result may be overwritten whatever its size (a long MATH evaluation passes 64 MiB): the check
    reads it whole as --compare does, not through the 64 MiB bound for JSON handed to the tools."""
    import eval as ev
    fast = ["--model", model_dir, "--tasks", "arith", "--samples", "1", "--limit", "2", "--max-new-tokens", "2",
            "--bootstrap", "10", "--out", str(tmp_path / "r.json")]
    ev.run_eval(ev.resolve(ev.parse_args(fast)))
    with open(tmp_path / "r.json", "a") as f:                       # still the same JSON value, 65 MiB long
        f.write(" " * (65 << 20))
    ev.resolve(ev.parse_args(fast))                                  # no SystemExit: the result may be redone


def test_eval_bootstrap_0_is_refused_before_evaluating(model_dir, tmp_path, capsys):
    import eval as ev
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", model_dir, "--tasks", "arith", "--samples", "1", "--limit", "2", "--max-new-tokens", "2",
                 "--bootstrap", "0", "--out", str(tmp_path / "r.json")])
    assert e.value.code == 2 and "--bootstrap" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------------------------------------------------
# 10. One line and the right exit code, or a refusal up front
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,says", [
    (["--group-size", str(10**400)], "--group-size must be finite"),
    (["--memory-budget-gb", "1e308"], "--memory-budget-gb must be"),
    (["--lr", "1e-50"], "no update would move a weight"),            # exited 0 with the weights unchanged
    (["--temperature", "1e-300"], "--temperature 1e-300 is too small"),  # failed blaming the learning rate
    (["--eval-data", "arith=a.jsonl", "arith=b.jsonl"], "one TASK=FILE pair per task"),   # kept the last silently
])
def test_flags_that_broke_a_run_are_one_line_up_front(model_dir, tmp_path, capsys, flags, says):
    line = fails_with_one_line(capsys, ["--model", model_dir, "--out", str(tmp_path / "run"), *SMALL, *flags])
    assert says in line and not (tmp_path / "run").exists()


@pytest.mark.parametrize("clip", [[0.0, 1.0, 8.0], []])
def test_a_ratio_clip_of_other_than_two_items_in_config_json_is_one_line(run, capsys, clip):
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "ratio_clip": clip}))
    assert "config.json has ratio_clip" in fails_with_one_line(capsys, ["--resume", str(run), "--steps", "4"])


def test_an_adapter_with_modules_to_save_is_refused(run, finished):
    path = run / "checkpoint" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="modules_to_save"):
        run_folder.read_adapter_config(str(run / "checkpoint"), str(finished[1]))


@pytest.mark.parametrize("targets", [5, ["q_proj", 3], {"q_proj": 1}])
def test_an_adapter_whose_target_modules_are_not_names_is_refused(run, finished, targets):
    """peft raised a TypeError from deep inside for `"target_modules": 5`; now one ValueError that says why."""
    path = run / "checkpoint" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    assert run_folder.read_adapter_config(str(run / "checkpoint"), str(finished[1]))["target_modules"]   # as saved
    path.write_text(json.dumps({**cfg, "target_modules": targets}))
    with pytest.raises(ValueError, match="target_modules"):
        run_folder.read_adapter_config(str(run / "checkpoint"), str(finished[1]))


def test_gpu_check_on_a_missing_or_non_json_models_file_is_one_line(tmp_path, capsys):
    from tools import gpu_check
    (tmp_path / "bad.json").write_text("not json")
    for models in (str(tmp_path / "missing.json"), str(tmp_path / "bad.json")):
        assert gpu_check.main(["--memory", "--device", "cpu", "--models", models, "--cache", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("gpu_check.py: error: --models")
