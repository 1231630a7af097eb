"""tests/test_export.py -- export.py: every configuration either exports or is refused with one line naming the nearest
expressible configuration, and the printed flag names and values match a table written here from the peers' sources
(/work/shared/docs/flag-map.md: verl b178a3cd, OpenRLHF 3c3be623, TRL f2cd5771), not from export.py.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_export.py
"""
import ast
import dataclasses
import itertools
import os
import shlex
import shutil
import subprocess

import pytest

from tools import export
import train
from estimators import KL_CONFIGS

# distinct, non-default values so that a value printed under the wrong flag is caught
BASE = dataclasses.replace(train.parse_config([]), beta=0.037, group_size=6, prompts_per_step=11, lr=3e-4,
                           max_new_tokens=17, steps=23, lora_r=8, lora_alpha=24, temperature=0.7)
FIELD = {"--kl": "kl", "--kl-level": "kl_level", "--kl-is": "kl_is", "--adv": "adv"}


def valid(c):
    """train.py rejects a token level without a reward placement and an off-policy weight without a loss placement."""
    place = c.kl.partition("-in-")[2]
    return not (c.kl_level == "token" and place not in ("reward", "both")
                or c.kl_is != "none" and place not in ("loss", "both")
                or c.kl_is == "prefix" and c.kl not in ("k1-in-loss", "k3-in-loss"))   # prefix: k1/k3 in the loss only


GRID = [c for kl, level, adv, kl_is in itertools.product(KL_CONFIGS, ("sequence", "token"), ("rloo", "dr_grpo", "grpo"),
                                                         ("none", "rho", "sg_rho", "prefix"))
        if valid(c := dataclasses.replace(BASE, kl=kl, kl_level=level, adv=adv, kl_is=kl_is))]


# ---------------------------------------------------------------------------------------------------------
# The table, from flag-map.md and the peers' configs (verl ppo_trainer.yaml, OpenRLHF train_ppo_ray, TRL GRPOConfig)
# ---------------------------------------------------------------------------------------------------------
def expressible(engine, c):
    place = c.kl.partition("-in-")[2]
    if c.kl_is == "prefix":                           # prefix importance weights: in none of the three
        return False
    if engine == "verl":                              # no reward-to-go, no off-policy weights
        return c.kl_level == "sequence" and c.kl_is == "none"
    if engine == "openrlhf":                          # in-reward KL always reward-to-go; use_loss turns it off
        return c.kl_is == "none" and place != "both" and (place != "reward" or c.kl_level == "token")
    return (c.kl == "none" or c.kl == "k1-in-reward" and c.kl_level == "sequence" and c.adv == "rloo"
            and c.kl_is == "none" or c.kl == "k3-in-loss" and c.adv != "rloo" and c.kl_is in ("none", "rho"))


def verl_table(c):
    est, _, place = c.kl.partition("-in-")
    kl_name = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}.get(est)
    t = {"actor_rollout_ref.model.path": c.model, "data.train_batch_size": 11, "actor_rollout_ref.rollout.n": 6,
         "data.max_response_length": 17, "actor_rollout_ref.rollout.temperature": 0.7,
         "actor_rollout_ref.actor.optim.lr": 3e-4, "trainer.total_training_steps": 23,
         "actor_rollout_ref.model.lora_rank": 8, "actor_rollout_ref.model.lora_alpha": 24,
         "actor_rollout_ref.actor.ppo_mini_batch_size": 11,
         "actor_rollout_ref.actor.clip_ratio_low": 1, "actor_rollout_ref.actor.clip_ratio_high": 7,
         "actor_rollout_ref.actor.clip_ratio_c": 8,
         "actor_rollout_ref.actor.loss_agg_mode": "seq-mean-token-sum" if c.token_budget is None
         else "seq-mean-token-sum-norm",
         "algorithm.use_kl_in_reward": str(place in ("reward", "both")),
         "actor_rollout_ref.actor.use_kl_loss": str(place in ("loss", "both")),
         "algorithm.adv_estimator": {"rloo": "rloo", "dr_grpo": "grpo", "grpo": "grpo"}[c.adv]}
    if c.adv != "rloo":
        t["algorithm.norm_adv_by_std_in_grpo"] = str(c.adv == "grpo")
    if place in ("reward", "both"):
        t.update({"algorithm.kl_penalty": kl_name, "algorithm.kl_ctrl.type": "fixed",
                  "algorithm.kl_ctrl.kl_coef": 0.037})
    if place in ("loss", "both"):
        t.update({"actor_rollout_ref.actor.kl_loss_type": kl_name, "actor_rollout_ref.actor.kl_loss_coef": 0.037})
    return t


def openrlhf_table(c):
    est, _, place = c.kl.partition("-in-")
    t = {"--actor.model_name_or_path": [c.model], "--rollout.batch_size": [11], "--rollout.n_samples_per_prompt": [6],
         "--rollout.max_new_tokens": [17], "--rollout.temperature": [0.7], "--actor.adam.lr": [3e-4],
         "--train.batch_size": [66], "--actor.lora.rank": [8], "--actor.lora.alpha": [24],
         "--actor.eps_clip_low_high": [1, 7], "--actor.dual_clip": [8], "--data.input_key": ["question"],
         "--data.label_key": ["answer"],
         "--algo.advantage.estimator": [{"rloo": "rloo", "dr_grpo": "dr_grpo", "grpo": "group_norm"}[c.adv]],
         "--algo.kl.init_coef": [0.037 if c.kl != "none" else 0]}
    if c.kl != "none":
        t["--algo.kl.estimator"] = [est]
    if place == "loss":
        t["--algo.kl.use_loss"] = []
    return t


def trl_table(c):
    rloo = c.kl == "k1-in-reward" or c.kl == "none" and c.adv == "rloo"
    t = {"num_generations": 6, "max_completion_length": 17, "temperature": 0.7, "learning_rate": 3e-4,
         "max_steps": 23, "beta": 0.037 if c.kl != "none" else 0.0, "lr_scheduler_type": "constant"}
    if not rloo:
        t.update(loss_type="dr_grpo", scale_rewards="group" if c.adv == "grpo" else "none", epsilon=1.0,
                 epsilon_high=7.0, delta=8.0)
    if c.kl == "k3-in-loss":
        t["use_bias_correction_kl"] = c.kl_is == "rho"
        if c.kl_is == "rho":
            t["importance_sampling_level"] = "token"
    return ("RLOO" if rloo else "GRPO"), t


# ---------------------------------------------------------------------------------------------------------
# Reading the output back
# ---------------------------------------------------------------------------------------------------------
def shell_tokens(text):
    """The command (the lines that are not comments), split as a shell would; the whole text must parse in bash."""
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    return shlex.split("\n".join(lines).replace("\\\n", " "))


def verl_overrides(text):
    tok = shell_tokens(text)
    assert tok[:3] == ["python3", "-m", "verl.trainer.main_ppo"]
    return dict(t.split("=", 1) for t in tok[3:])


def openrlhf_flags(text):
    tok = shell_tokens(text)
    assert tok[:3] == ["python3", "-m", "openrlhf.cli.train_ppo_ray"]
    flags = {}
    for t in tok[3:]:
        if t.startswith("--"):
            assert t not in flags, f"{t} given twice"
            flags[t] = []
        else:
            flags[list(flags)[-1]].append(t)
    return flags


def trl_calls(text):
    """{callable name: {keyword: literal value}} for every call in the snippet (it must compile)."""
    compile(text, "x", "exec")
    calls = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            kw = {}
            for k in node.keywords:
                try:
                    kw[k.arg] = ast.literal_eval(k.value)
                except ValueError:
                    kw[k.arg] = ast.unparse(k.value)
            calls[node.func.id] = kw
    return calls


def same(printed, expected):
    if isinstance(expected, bool) or isinstance(expected, str):
        return printed == expected
    return float(printed) == pytest.approx(float(expected), rel=1e-12)


def check_table(engine, c, text):
    if engine == "verl":
        got = verl_overrides(text)
        for k, v in verl_table(c).items():
            assert k in got and same(got[k], v), (k, got.get(k), v)
        place = c.kl.partition("-in-")[2]
        for k in ("algorithm.kl_penalty", "actor_rollout_ref.actor.kl_loss_type"):
            assert (k in got) == (place in (("reward", "both") if k.startswith("algorithm") else ("loss", "both")))
    elif engine == "openrlhf":
        got = openrlhf_flags(text)
        for k, v in openrlhf_table(c).items():
            assert k in got and len(got[k]) == len(v) and all(map(same, got[k], v)), (k, got.get(k), v)
        assert ("--algo.kl.use_loss" in got) == c.kl.endswith("-in-loss")
        assert ("--algo.kl.estimator" in got) == (c.kl != "none")
    else:
        trainer, table = trl_table(c)
        calls = trl_calls(text)
        assert f"{trainer}Trainer" in calls and f"{trainer}Config" in calls
        got = calls[f"{trainer}Config"]
        for k, v in table.items():
            assert k in got and same(got[k], v), (k, got.get(k), v)
        assert got["per_device_train_batch_size"] * got["gradient_accumulation_steps"] == 66   # one step per batch
        assert calls["LoraConfig"]["r"] == 8 and calls["LoraConfig"]["lora_alpha"] == 24
        assert calls[f"{trainer}Trainer"]["model"] == c.model


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", export.ENGINES)
def test_every_configuration_exports_or_names_the_nearest(engine):
    assert len(GRID) == 10 * 3 + 6 * 3 + 6 * 3 * 2 + 3 * 3 * 2 + 2 * 3   # sequence, token, + weight, prefix
    for c in GRID:
        if expressible(engine, c):
            text = export.export(c, engine)
            check_table(engine, c, text)
            assert "cannot avoid:" in text
            continue
        with pytest.raises(export.ExportError) as err:
            export.export(c, engine)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"{export.NAME[engine]} cannot express ") and "nearest: --" in msg
        assert "gradient" in msg or "variance" in msg, msg
        fixed = dataclasses.replace(c, **{FIELD[f]: v for f, v in nearest_flags(msg).items()})
        assert valid(fixed) and expressible(engine, fixed), (msg, fixed.kl, fixed.kl_level, fixed.kl_is, fixed.adv)
        export.export(fixed, engine)                   # the nearest configuration really exports


def nearest_flags(msg):
    """'... nearest: --kl k1-in-reward --kl-level token, how ...' -> {'--kl': 'k1-in-reward', '--kl-level': 'token'}"""
    words = msg.split("nearest: ", 1)[1].split(",")[0].split()
    return dict(zip(words[::2], words[1::2]))


@pytest.mark.parametrize("engine, flags, nearest", [
    ("verl", ["--kl", "k1-in-reward", "--kl-level", "token"], {"--kl-level": "sequence"}),
    ("openrlhf", ["--kl", "k1-in-both"], {"--kl": "k1-in-reward", "--kl-level": "token"}),
    ("trl", ["--kl", "k1-in-both"], {"--kl": "k1-in-reward"}),
    ("openrlhf", ["--kl", "k1-in-reward"], {"--kl-level": "token"}),
    ("trl", ["--kl", "k3-in-reward"], {"--kl": "k1-in-reward"}),
    ("trl", ["--kl", "k1-in-loss", "--adv", "dr_grpo"], {"--kl": "none"}),
    ("trl", ["--kl", "k2-in-loss", "--adv", "grpo"], {"--kl": "k3-in-loss", "--kl-is": "rho"}),
    ("trl", ["--kl", "k3-in-loss", "--adv", "rloo"], {"--adv": "dr_grpo"}),
    ("trl", ["--kl", "k1-in-reward", "--adv", "grpo"], {"--adv": "rloo"}),
    ("verl", ["--kl", "k3-in-loss", "--kl-is", "rho"], {"--kl": "k2-in-loss", "--kl-is": "none"}),
    ("trl", ["--kl", "k2-in-both", "--kl-level", "token", "--adv", "grpo"], {"--kl-level": "sequence"}),
] + [(e, ["--kl", "k2-in-loss", "--kl-is", "sg_rho", "--adv", "grpo"], {}) for e in export.ENGINES]
  + [(e, ["--kl", "k3-in-loss", "--kl-is", "prefix"], {}) for e in export.ENGINES]
  + [("trl", ["--kl", "k3-in-loss", "--kl-is", "prefix", "--adv", "dr_grpo"], {"--kl-is": "rho"})])
def test_refusals(engine, flags, nearest):
    with pytest.raises(export.ExportError) as err:
        export.export(train.parse_config(flags), engine)
    msg = str(err.value)
    assert "\n" not in msg and nearest.items() <= nearest_flags(msg).items(), msg


def test_default_run_exports_with_the_tiny_model():
    c = train.parse_config([])                          # arith on assets/tiny-arith, k1-in-reward, RLOO
    for engine in ("verl", "trl"):
        text = export.export(c, engine)
        assert c.model in text and "local folder" in text
    assert "algorithm.kl_ctrl.kl_coef=0.05" in shell_tokens(export.export(c, "verl"))
    with pytest.raises(export.ExportError, match="nearest: --kl k1-in-reward --kl-level token,"):
        export.export(c, "openrlhf")                    # OpenRLHF's in-reward KL is always reward-to-go
    with pytest.raises(export.ExportError, match="unknown engine"):
        export.export(c, "deepspeed-chat")


def test_token_budget_async_and_4bit():
    c = dataclasses.replace(BASE, kl="k3-in-loss", adv="dr_grpo", token_budget=17.0, async_level=4,
                            load_in_4bit=True, lora_dropout=0.05)
    got = verl_overrides(export.export(c, "verl"))
    assert got["actor_rollout_ref.actor.loss_agg_mode"] == "seq-mean-token-sum-norm"
    assert float(got["actor_rollout_ref.actor.loss_scale_factor"]) == 17
    assert "on-policy" in export.export(c, "verl") and "4-bit" in export.export(c, "verl")
    flags = openrlhf_flags(export.export(c, "openrlhf"))
    assert "--train.async_enable" in flags and "--actor.load_in_4bit" in flags and flags["--actor.lora.dropout"]
    text = export.export(c, "trl")
    assert "BitsAndBytesConfig" in trl_calls(text) and "constant factor" not in text   # L = max_completion_length
    assert "constant factor" in export.export(dataclasses.replace(c, token_budget=None), "trl")
    assert "max_steps=23" in text and "trains on-policy" in text


# ---------------------------------------------------------------------------------------------------------
# Hostile strings: the output is safe to paste (issue 17)
# ---------------------------------------------------------------------------------------------------------
HOSTILE = ["m$(touch PWNED1)`touch PWNED2`", "it's \"q\"; touch PWNED3 #", "a b\\c $HOME ${x} !!"]
STUB = "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done >> \"$ARGV_LOG\"; printf '\\n\\0' >> \"$ARGV_LOG\"\n"


def run_as_shell(text, tmp_path):
    """Run `text` with bash in tmp_path, python/python3 replaced by a stub that logs its arguments -> [argv, ...]."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    for name in ("python", "python3"):
        (tmp_path / "bin" / name).write_text(STUB)
        (tmp_path / "bin" / name).chmod(0o755)
    log = tmp_path / "argv.log"
    if log.exists():
        log.unlink()
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "ARGV_LOG": str(log), "HOME": str(tmp_path)}
    subprocess.run(["bash", "-c", text], cwd=tmp_path, env=env, check=True, capture_output=True)
    argvs = log.read_text().split("\n\0") if log.exists() else []
    return [a.split("\0")[:-1] for a in argvs if a]


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
@pytest.mark.parametrize("engine", export.ENGINES)
@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_model_and_data_path_are_quoted_and_nothing_runs(engine, hostile, tmp_path):
    c = dataclasses.replace(BASE, task="math", model=hostile, data_path=hostile + ".jsonl",
                            kl_level="token" if engine == "openrlhf" else "sequence")
    text = export.export(c, engine)
    if engine == "trl":                                  # Python: the strings are literals, no statement added
        tree = ast.parse(text)
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        assert hostile in strings and hostile + ".jsonl" in strings
        benign = ast.parse(export.export(dataclasses.replace(c, model="m", data_path="d.jsonl"), engine))
        assert ast.dump(benign).count("Call(") == ast.dump(tree).count("Call(") and len(tree.body) == len(benign.body)
        return
    argvs = run_as_shell(text, tmp_path)                 # the command, as pasted
    suggested = "\n".join(line[4:] for line in text.splitlines() if line.startswith("#   python -c "))
    argvs += run_as_shell(suggested, tmp_path)           # and the commented data-conversion commands
    assert not [f for f in os.listdir(tmp_path) if f.startswith("PWNED")]
    model_arg = f"actor_rollout_ref.model.path={hostile}" if engine == "verl" else hostile
    assert model_arg in argvs[0]                         # the argument arrived exactly
    assert len(argvs) == (3 if engine == "verl" else 2) and all(a[0] == "-c" and len(a) == 2 for a in argvs[1:])
    codes = [a[1] for a in argvs[1:]]
    paths = [k.value.value for code in codes for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)
             for k in n.keywords if k.arg == "path"]
    assert paths == [hostile + ".jsonl"]                 # the train rows' file, read back exactly
    assert hostile in text.splitlines()[0] or shlex.quote(hostile) in text.splitlines()[0]
    assert shlex.split(text.splitlines()[0].split("python train.py ", 1)[1])[1] == hostile   # header: --model VALUE


@pytest.mark.parametrize("field", ["model", "data_path"])
@pytest.mark.parametrize("bad", ["x\ntouch PWNED #", "x\rimport os", "x\x00y"])
def test_line_breaks_in_strings_are_refused(field, bad):
    c = dataclasses.replace(BASE, task="math", **{field: bad})
    for engine in export.ENGINES:
        with pytest.raises(export.ExportError, match=f"--{field.replace('_', '-')} .* line break"):
            export.export(dataclasses.replace(c, kl_level="token" if engine == "openrlhf" else "sequence"), engine)


@pytest.mark.parametrize("engine", ["verl", "openrlhf", "trl"])
def test_our_short_model_name_exports_as_its_hub_id(engine):
    """`--model smollm2-135m` names this project's local conversion; another engine gets the hub id, and a note says
    the weights differ (issue 28: the exported command named a model only kl-rl knows, uncommented)."""
    level = ["--kl-level", "token"] if engine == "openrlhf" else []          # OpenRLHF's KL is always reward-to-go
    text = export.export(train.parse_config(["--preset", "smollm2-cpu", *level]), engine)
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert any("HuggingFaceTB/SmolLM2-135M-Instruct" in line for line in body)
    assert not any("smollm2-135m" in line for line in body)
    assert "--model smollm2-135m" in text.splitlines()[0]              # our own command, as the user wrote it
    assert "local conversion of HuggingFaceTB/SmolLM2-135M-Instruct" in text
