"""train.py end to end on tiny models (offline, CPU): every KL config and advantage, 4-bit, parameter updates, exact
resume, async ratios, bad input (exit 2, one line) and non-finite losses (exit 1, checkpoint intact).

Most runs call train.main() in-process (no 5 s interpreter start each) on a random tiny Llama with a stand-in reward
that varies between samples, so every step has a learning signal; two subprocess runs use the shipped model."""
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
from safetensors.torch import load_file

import policy
import train
from estimators import KL_CONFIGS
from kl_rl import ADVANTAGES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "assets", "tiny-arith")
VOLATILE = ("time_", "tokens_per_s", "peak_mem_gb")       # wall-clock fields: never equal between two runs


@pytest.fixture(autouse=True)
def varied_reward(monkeypatch):
    """A deterministic stand-in for tasks.reward that is 1 for about half of the (random-model) completions."""
    monkeypatch.setattr(train, "reward", lambda name, text, ex: float(zlib.crc32(text.encode()) % 2))


def run(model_dir, out, *flags):
    argv = ["--model", model_dir, "--out", str(out), "--steps", "2", "--prompts-per-step", "2", "--group-size", "3",
            "--micro-batch-size", "4", "--max-new-tokens", "4", "--eval-n", "4", "--lr", "0.05", *map(str, flags)]
    return train.main(argv)


def records(out, kind="train"):
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["type"] == kind]


def stable(recs):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in recs]


# ---------------------------------------------------------------------------------------------------------
# Every configuration trains
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kl,adv", [(kl, ADVANTAGES[i % 3]) for i, kl in enumerate(KL_CONFIGS)]
                         + [("k1-in-reward", "dr_grpo"), ("k1-in-reward", "grpo")])
def test_every_kl_config_and_advantage(model_dir, tmp_path, kl, adv):
    assert run(model_dir, tmp_path, "--kl", kl, "--adv", adv, "--beta", "0.1") == 0
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [0, 1]
    assert all(isinstance(v, str) or v == v and abs(v) != float("inf") for r in recs for v in r.values())
    for key in ("reward", "kl_k1", "kl_k2", "kl_k3", "token_rkl", "token_fkl", "entropy", "pg_term", "kl_term",
                "grad_norm", "completion_len", "truncated_frac", "ratio_mean", "time_generate", "peak_mem_gb"):
        assert key in recs[0], key
    assert recs[0]["kl_k1"] == 0 and recs[0]["token_rkl"] == 0          # fresh LoRA: π_θ = π_ref exactly
    if "loss" not in kl and "both" not in kl:
        assert all(r["kl_term"] == 0 for r in recs)
    assert recs[1]["grad_norm"] > 0
    assert os.path.isfile(os.path.join(tmp_path, "checkpoint", "adapter_config.json"))
    assert len(records(tmp_path, "eval")) == 2                          # before the first and after the last step


@pytest.mark.parametrize("four_bit", [False, True])
def test_every_trainable_parameter_changes_and_base_weights_do_not(model_dir, tmp_path, monkeypatch, four_bit):
    seen = {}

    def capture(*args, **kwargs):
        model, tok = load(*args, **kwargs)
        seen["model"], seen["before"] = model, {n: p.detach().clone() for n, p in model.named_parameters()}
        return model, tok

    load = policy.load_policy                              # train.py imports it after validating its flags
    monkeypatch.setattr(policy, "load_policy", capture)
    flags = ["--kl", "k1-in-both", "--weight-decay", "0"] + (["--load-in-4bit"] if four_bit else [])
    assert run(model_dir, tmp_path, *flags) == 0
    after = dict(seen["model"].named_parameters())
    trainable = [n for n, p in after.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in after.items():
        changed = not torch.equal(p.detach(), seen["before"][n])
        assert changed == p.requires_grad, n              # every LoRA tensor moved (A from step 2), nothing else
    if four_bit:
        assert any(type(m).__name__ == "Linear4bit" for m in seen["model"].modules())
    saved = load_file(os.path.join(tmp_path, "checkpoint", "adapter_model.safetensors"))
    assert len(saved) == len(trainable)


# ---------------------------------------------------------------------------------------------------------
# Resume and async
# ---------------------------------------------------------------------------------------------------------
def test_resume_replays_an_uninterrupted_run_exactly(model_dir, tmp_path):
    flags = ["--async-level", "2", "--kl", "k3-in-both", "--eval-every", "2", "--eval-modes", "greedy", "sample"]
    assert run(model_dir, tmp_path / "full", "--steps", "4", "--save-every", "2", *flags) == 0
    assert run(model_dir, tmp_path / "cut", "--steps", "2", *flags) == 0
    assert train.main(["--resume", str(tmp_path / "cut"), "--steps", "4"]) == 0
    full, cut = stable(records(tmp_path / "full")), stable(records(tmp_path / "cut"))
    assert [r["step"] for r in cut] == [0, 1, 2, 3]
    assert cut == full                                      # rewards, losses, KLs, ratios: bit-identical
    assert records(tmp_path / "cut", "eval") == records(tmp_path / "full", "eval")
    assert json.load(open(tmp_path / "cut" / "config.json"))["steps"] == 4


@pytest.mark.parametrize("level", [0, 1])
def test_async_level_zero_is_exactly_on_policy(model_dir, tmp_path, level):
    assert run(model_dir, tmp_path, "--steps", "3", "--async-level", level, "--kl", "k3-in-loss",
               "--kl-is", "rho") == 0
    recs = records(tmp_path)
    ratios = [(r["ratio_min"], r["ratio_max"]) for r in recs]
    if level == 0:
        assert all(r == (1.0, 1.0) for r in ratios)         # behav_logp=None: ρ = exp(logp − sg(logp)) ≡ 1
    else:
        assert ratios[0] == pytest.approx((1.0, 1.0), abs=1e-5)   # step 0: μ = θ_0 = π_θ
        assert any(abs(lo - 1) > 1e-3 or abs(hi - 1) > 1e-3 for lo, hi in ratios[1:])   # μ = θ_{s−1} ≠ π_θ


# ---------------------------------------------------------------------------------------------------------
# Presets, bad input, non-finite losses
# ---------------------------------------------------------------------------------------------------------
def test_presets_and_explicit_flags_override():
    cfg = train.parse_config(["--preset", "paper-async", "--beta", "0.1"])
    assert (cfg.adv, cfg.group_size, cfg.async_level, cfg.ratio_clip, cfg.lr) == ("dr_grpo", 16, 10, (0.0, 8.0), 1e-5)
    assert cfg.beta == 0.1
    assert train.parse_config(["--preset", "paper-async", "--lr", "1e-6"]).lr == 1e-6   # the paper's lr: one flag
    cfg = train.parse_config(["--preset", "paper-onpolicy", "--no-load-in-4bit"])
    assert (cfg.adv, cfg.group_size, cfg.beta, cfg.async_level, cfg.load_in_4bit) == ("rloo", 5, 0.05, 0, False)
    assert 250 <= cfg.group_size * cfg.prompts_per_step <= 256
    # the README's 7B command names no preset: a real task must still get the paper's layout, not arith's
    cfg = train.parse_config(["--model", "Qwen/Qwen2.5-7B", "--task", "math", "--kl", "k1-in-reward", "--load-in-4bit",
                              "--group-size", "4"])
    assert (cfg.preset, cfg.adv, cfg.max_new_tokens, cfg.eval_tasks) == ("paper-onpolicy", "rloo", 1024, ("math500",))
    assert cfg.group_size == 4 and cfg.gradient_checkpointing and cfg.micro_batch_size < 16
    assert train.parse_config([]).preset is None and train.parse_config([]).max_new_tokens == 8


def bad_math_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"no_problem_field": 1}\n')
    return str(path)


@pytest.mark.parametrize("flags", [
    ["--kl", "k4-in-reward"], ["--task", "nope"], ["--model", "./no/such/model"], ["--group-size", "1"],
    ["--temperature", "0"], ["--beta", "nan"], ["--max-new-tokens", "100000"], ["--kl", "k1-in-loss", "--kl-level",
                                                                                 "token"],
    ["--max-grad-norm", "-1"], ["--token-budget", "0"], ["--resume", "/no/such/run"], ["--task", "math", "--data-path", "EMPTY"], ["--task", "math", "--data-path", "BAD"],
])
def test_bad_input_exits_2_with_one_line(model_dir, tmp_path, capsys, flags):
    (tmp_path / "empty.jsonl").write_text("")
    flags = [{"EMPTY": str(tmp_path / "empty.jsonl"), "BAD": bad_math_file(tmp_path)}.get(f, f) for f in flags]
    with pytest.raises(SystemExit) as e:
        train.main(["--model", model_dir, "--out", str(tmp_path / "run"), *flags])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "train.py" in line]
    assert len(err) == 1 and err[0].startswith("train.py: error:"), err   # (strict one-line check: the CLI test)
    assert not os.path.exists(tmp_path / "run" / "checkpoint")


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(model_dir, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}

    def exploding(*args, **kwargs):
        loss, m = policy_loss(*args, **kwargs)
        calls["n"] += args[0].requires_grad                  # count the gradient passes, not the metrics call
        if calls["n"] > 2:                                   # one micro-batch per step: step 2 blows up
            m["kl_term"] = float("nan")
            return loss + float("nan"), m
        return loss, m

    policy_loss = train.policy_loss
    monkeypatch.setattr(train, "policy_loss", exploding)
    assert run(model_dir, tmp_path, "--steps", "4", "--save-every", "1", "--prompts-per-step", "1") == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 2 (kl term" in err
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 2 and not os.path.exists(tmp_path / "checkpoint.tmp")
    assert [r["step"] for r in records(tmp_path)] == [0, 1]


# ---------------------------------------------------------------------------------------------------------
# The real command line on the shipped model
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isdir(TINY), reason="assets/tiny-arith not built")
@pytest.mark.parametrize("four_bit", [False, True])
def test_cli_on_the_shipped_model(tmp_path, four_bit):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--steps", "2", "--prompts-per-step", "4", "--eval-n", "20",
           "--out", str(tmp_path)] + (["--load-in-4bit"] if four_bit else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| train reward |" in p.stdout
    for name in ("config.json", "metrics.jsonl", "metrics.png", "checkpoint/adapter_config.json",
                 "checkpoint/state.pt"):
        assert os.path.isfile(tmp_path / name), name
    assert len(records(tmp_path)) == 2 and records(tmp_path)[0]["reward"] > 0   # the tiny model solves some


@pytest.mark.parametrize("flags", [["--task", "nope"], ["--task", "math", "--data-path", "BAD"]])
def test_cli_bad_input_is_one_line_on_stderr(tmp_path, flags):
    flags = [bad_math_file(tmp_path) if f == "BAD" else f for f in flags]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("train.py: error:"), p.stderr


def test_held_out_data_set_from_a_local_file(model_dir):
    # offline machines have no hub: the held-out MATH-500 comes from --eval-data, in the hub's schema
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    argv = ["--model", model_dir, "--task", "math", "--data-path", os.path.join(fixtures, "math_train.jsonl"),
            "--max-new-tokens", "4"]
    cfg = train.parse_config(argv + ["--eval-data", "math500=" + os.path.join(fixtures, "math500.jsonl")])
    train_set, held_out = train.load_data(cfg)
    assert list(held_out) == ["math500"] and len(held_out["math500"]) == 5 and len(train_set) == 5
    assert all(ex["question"].endswith("\\boxed{}.") for ex in held_out["math500"])
    with pytest.raises(ValueError, match="TASK=FILE"):
        train.load_data(train.parse_config(argv + ["--eval-data", "math500"]))
