"""export.py -- the same run for verl, OpenRLHF or TRL, printed instead of trained.

    python train.py --kl k3-in-loss --adv grpo --export trl        # train.py calls export(cfg, "trl")

prints a verl or OpenRLHF command line, or a TRL Python snippet, for the run the other flags describe, then `#`
comments naming every difference from our run that the engine cannot avoid. A configuration the engine cannot
express raises ExportError: one line naming the nearest configuration it can express and how that one's gradient
differs (train.py exits with code 2). Flag names and differences follow /work/shared/docs/flag-map.md (measured
against verl b178a3cd, OpenRLHF 3c3be623, TRL f2cd5771); names we could not check are marked "unverified" in the
output. Data and reward files are placeholders, with a comment on converting our rows (tasks.py) into them.
"""
import dataclasses
import json
import os
import shlex

ENGINES = ("verl", "openrlhf", "trl")
NAME = {"verl": "verl", "openrlhf": "OpenRLHF", "trl": "TRL"}
VERL_KL = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}
OPENRLHF_ADV = {"rloo": "rloo", "dr_grpo": "dr_grpo", "grpo": "group_norm"}
FLAG = {"kl": "--kl", "kl_level": "--kl-level", "kl_is": "--kl-is", "adv": "--adv"}
ADAM_NOTE = "(Adam is nearly scale-free, the gradient clip is not)"


class ExportError(ValueError):
    """The engine cannot express this configuration; str(e) is one line naming the nearest one it can."""


def parse_kl(kl):
    """'k3-in-loss' -> ('k3', 'loss'); 'none' -> (None, None)."""
    return (None, None) if kl == "none" else tuple(kl.split("-in-"))


# ---------------------------------------------------------------------------------------------------------
# What each engine cannot express, and the nearest configuration it can (gradients: estimators.py's table)
# ---------------------------------------------------------------------------------------------------------
def _fix(engine, c, G):
    """One step towards an expressible configuration: (changes, how the gradient differs), or None."""
    est, place = parse_kl(c["kl"])
    if c["kl_is"] == "prefix":                       # no engine weights k_s by the prefix product W_{1:s}
        return dict(kl_is="rho"), ("the token-level reverse-KL gradient at μ's states instead of the sequence-level "
                                   "one (no engine has prefix importance weights)")
    if engine != "verl" and place == "both":         # OpenRLHF's use_loss turns the in-reward KL off; TRL has no both
        if est == "k2":
            new = dict(kl="k2-in-loss") if engine == "openrlhf" else dict(kl="k3-in-loss", kl_is="rho")
            return dict(new, kl_level="sequence"), ("whose gradient drops the score term E[Σ_t k2_t·∇log π(y)], "
                                                     "keeping the token-local gradient E[Σ_t δ_t ∇log π_t]")
        level = "token" if engine == "openrlhf" else "sequence"
        return dict(kl="k1-in-reward", kl_level=level, kl_is="none"), "whose expected KL gradient is ∇ reverse KL"
    if c["kl_is"] == "sg_rho":
        if engine == "trl" and c["kl"] == "k2-in-loss":
            return dict(kl="k3-in-loss", kl_is="rho"), ("the same per-token gradient ρ_t·δ_t·∇log π_t "
                                                        "(use_bias_correction_kl), only the loss value differs")
        return dict(kl_is="none"), ("the same gradient on-policy (sg(ρ) = 1), but off-policy the in-loss KL "
                                    "gradient is taken under μ instead of π_θ")
    if c["kl_is"] == "rho" and not (engine == "trl" and c["kl"] == "k3-in-loss"):
        if engine == "trl":                           # the loss placement here
            return dict(kl="k3-in-loss"), {"k1": "the same expected gradient (ρ·k1 only adds the zero-mean "
                                                 "term ρ_t·∇log π_t)",
                                           "k2": "whose gradient lacks the term E_π[Σ_t ½δ_t²·∇log π_t]"}[est]
        if c["kl"] == "k3-in-loss":
            return dict(kl="k2-in-loss", kl_is="none"), ("the same gradient on-policy (δ_t·∇log π_t per token), "
                                                          "but off-policy taken under μ instead of π_θ")
        return dict(kl_is="none"), "dropping ρ's gradient term k_t·∇log π_t (on-policy: the in-loss score term)"
    if engine == "verl" and c["kl_level"] == "token":
        return dict(kl_level="sequence"), "same expected gradient, higher variance (verl has no reward-to-go KL)"
    if engine == "openrlhf" and place == "reward" and c["kl_level"] == "sequence":
        return dict(kl_level="token"), ("same expected gradient, usually lower variance (OpenRLHF's is always "
                                        "reward-to-go)")
    if engine != "trl":
        return None
    if place == "reward" and est != "k1":
        yours = {"k2": "a biased score term", "k3": "∇ reverse KL − the token-forward-KL gradient"}[est]
        return dict(kl="k1-in-reward"), f"whose expected gradient is ∇ reverse KL, not {yours} (TRL: k1 only)"
    if place == "reward" and c["kl_level"] == "token":
        return dict(kl_level="sequence"), "same expected gradient, higher variance (RLOOTrainer sums the KL)"
    if c["kl"] == "k1-in-loss":
        return dict(kl="none"), "the same expected gradient (exactly 0) without k1-in-loss's noise"
    if c["kl"] == "k2-in-loss":
        return dict(kl="k3-in-loss", kl_is="rho"), ("the same per-token gradient δ_t·∇log π_t on-policy (ρ·k3, "
                                                    "use_bias_correction_kl), ρ-weighted off-policy")
    if place == "reward" and c["adv"] != "rloo":
        return dict(adv="rloo"), ("the leave-one-out baseline of RLOOTrainer (TRL's only trainer with the KL in the "
                                  "reward), whose gradient is " + (f"Dr. GRPO's × G/(G−1) = {G / (G - 1):.4g}"
                                  if c["adv"] == "dr_grpo" else "not divided by each group's std"))
    if place == "loss" and c["adv"] == "rloo":
        return dict(adv="dr_grpo"), (f"the group-mean baseline of GRPOTrainer (no leave-one-out one), whose policy "
                                     f"gradient is RLOO's × (1 − 1/G) = {1 - 1 / G:.4g}, the in-loss KL's unchanged")
    return None


def check(engine, cfg):
    """Raise ExportError naming the nearest expressible configuration if `engine` cannot express `cfg`."""
    c = dict(kl=cfg.kl, kl_level=cfg.kl_level, kl_is=cfg.kl_is, adv=cfg.adv)
    start, hows = dict(c), []
    while (step := _fix(engine, c, cfg.group_size)) is not None:
        c.update(step[0])
        hows.append(step[1])
    if hows:                                          # --kl, the flags that change, and any non-default context
        keys = [k for k in FLAG if k == "kl" or c[k] != start[k] or start[k] in ("rho", "sg_rho", "prefix", "token")]
        given, nearest = (" ".join(f"{FLAG[k]} {d[k]}" for k in keys) for d in (start, c))
        raise ExportError(f"{NAME[engine]} cannot express {given}; nearest: {nearest}, {'; '.join(hows)}")


# ---------------------------------------------------------------------------------------------------------
# Notes shared by the engines
# ---------------------------------------------------------------------------------------------------------
def _common_notes(engine, cfg):
    notes = ["sampling and prompt order use the engine's own RNG: runs agree in distribution, not sample by sample"]
    if engine != "trl":
        notes.append("rollouts come from vLLM and the trainer recomputes log-probs, so sampling and scoring differ "
                     "by kernel noise (ours samples and scores with the same HF model)")
    if os.path.exists(cfg.model) or cfg.model.startswith((".", "/", "~")):
        notes.append(f"model {shlex.quote(cfg.model)} is a local folder (the shipped tiny model by default): "
                     f"{NAME[engine]} needs a model it can load{' in vLLM' if engine != 'trl' else ''}, at a path its "
                     f"workers read")
    lo, hi = cfg.ratio_clip
    if lo > 0 and not (engine == "trl" and "RLOO" in _trl_trainer(cfg)):
        notes.append(f"--ratio-clip {lo:g} {hi:g} maps to a PPO-style min with a dual clip, exact only for LO = 0: "
                     f"ratios below {lo:g} stay unclamped where the advantage is positive (on-policy ρ = 1)")
    if cfg.async_level:
        notes.append({"verl": "verl's main_ppo trainer is on-policy (its one-step/fully-async recipes are not "
                              f"mapped here): no behaviour policy {cfg.async_level} steps old, this trains on-policy",
                      "openrlhf": "--train.async_enable overlaps generation and training: the behaviour policy is "
                                  "as old as the rollout queue is long (queue-size flag unverified), not exactly "
                                  f"{cfg.async_level} steps",
                      "trl": f"TRL has no behaviour policy a fixed {cfg.async_level} steps old "
                             "(steps_per_generation = k gives staleness 0..k-1): this snippet trains on-policy",
                      }[engine])
    return notes


def _rows(cfg, split, task, lit=repr):
    """The Python expression for our rows; lit writes a string literal (repr, or _dq inside a shell command)."""
    path = f", path={lit(cfg.data_path)}" if cfg.data_path and split == "train" else ""
    return f"tasks.load_task({lit(task)}, {lit(split)}, seed={cfg.seed}{path})"


def _dq(s):
    """A double-quoted Python string literal (JSON's escapes are Python's), so that shlex.quote of code built with it
    is one plain '...' for ordinary values."""
    return json.dumps(s, ensure_ascii=False)


def _python_c(code):
    """A `python -c CODE` line a user can paste: CODE single-quoted for the shell, so nothing in it is expanded."""
    return "#   python -c " + shlex.quote(code)


def _shell(module, parts):
    return f"python3 -m {module} \\\n" + " \\\n".join("    " + p for p in parts)


# ---------------------------------------------------------------------------------------------------------
# verl: Hydra overrides for python3 -m verl.trainer.main_ppo (names from ppo_trainer.yaml / actor.yaml)
# ---------------------------------------------------------------------------------------------------------
def _verl(cfg):
    est, place = parse_kl(cfg.kl)
    P, G, lo, hi = cfg.prompts_per_step, cfg.group_size, *cfg.ratio_clip
    mb = min(cfg.micro_batch_size, P * G)
    a, m, r = "actor_rollout_ref.actor.", "actor_rollout_ref.model.", "actor_rollout_ref.rollout."
    o = {"data.train_files": "TRAIN.parquet", "data.val_files": "TEST.parquet", "data.train_batch_size": P,
         "data.max_response_length": cfg.max_new_tokens, m + "path": cfg.model, m + "lora_rank": cfg.lora_r,
         m + "lora_alpha": cfg.lora_alpha, m + "target_modules": "all-linear", r + "name": "vllm", r + "n": G,
         r + "temperature": cfg.temperature, r + "tensor_model_parallel_size": 1,
         r + "log_prob_micro_batch_size_per_gpu": mb, "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": mb,
         a + "optim.lr": cfg.lr, a + "optim.weight_decay": cfg.weight_decay, a + "optim.betas": "[0.9,0.99]",
         a + "grad_clip": cfg.max_grad_norm or 1e9, a + "ppo_mini_batch_size": P, a + "ppo_epochs": 1,
         a + "ppo_micro_batch_size_per_gpu": mb,
         a + "loss_agg_mode": "seq-mean-token-sum" if cfg.token_budget is None else "seq-mean-token-sum-norm"}
    if cfg.token_budget is not None:
        o[a + "loss_scale_factor"] = cfg.token_budget
    o.update({a + "clip_ratio_low": 1 - lo, a + "clip_ratio_high": hi - 1, a + "clip_ratio_c": hi,
              "algorithm.adv_estimator": "rloo" if cfg.adv == "rloo" else "grpo"})
    if cfg.adv != "rloo":
        o["algorithm.norm_adv_by_std_in_grpo"] = cfg.adv == "grpo"
    o["algorithm.use_kl_in_reward"] = place in ("reward", "both")
    if place in ("reward", "both"):
        o.update({"algorithm.kl_penalty": VERL_KL[est], "algorithm.kl_ctrl.type": "fixed",
                  "algorithm.kl_ctrl.kl_coef": cfg.beta})
    o[a + "use_kl_loss"] = place in ("loss", "both")
    if place in ("loss", "both"):
        o.update({a + "kl_loss_type": VERL_KL[est], a + "kl_loss_coef": cfg.beta})
    o.update({"custom_reward_function.path": "REWARD.py", "custom_reward_function.name": "compute_score",
              "trainer.total_training_steps": cfg.steps, "trainer.n_gpus_per_node": 1, "trainer.nnodes": 1,
              "trainer.test_freq": cfg.eval_every or -1, "trainer.logger": '["console"]'})
    row = ('{"prompt": [{"role": "user", "content": e["question"]}], "data_source": %s, "reward_model": '
           '{"style": "rule", "ground_truth": e["answer"]}, "extra_info": e}' % _dq(cfg.task))
    head = ["# data: TRAIN/TEST.parquet hold our rows in verl's format; from kl-rl's repository root:"]
    head += [_python_c(f"import tasks, pandas as pd; pd.DataFrame([{row} for e in {_rows(cfg, split, task, _dq)}])"
                       f".to_parquet({_dq(name)})")
             for split, task, name in (("train", cfg.task, "TRAIN.parquet"),
                                       ("test", (cfg.eval_tasks or (cfg.task,))[0], "TEST.parquet"))]
    head += ["# reward: REWARD.py defines compute_score(data_source, solution_str, ground_truth, extra_info) "
             f"returning tasks.reward({cfg.task!r}, solution_str, extra_info)"]
    notes = _common_notes("verl", cfg)
    notes += ["k3 (low_var_kl) is clamped to [-10, 10] (−δ to ±20): exact only for δ ∈ [−2.61, 11.0], "
              "gradient 0 outside (ours: exact, δ clamped at −20 inside the exponential)"] if est == "k3" else []
    notes += ["GRPO's std gets ε = 1e-6 (ours 1e-4); the in-reward KL is divided by the std, as ours"
              ] if cfg.adv == "grpo" else []
    notes += ["actor.loss_scale_factor needs a recent verl; older ones divide by the padded response length "
              "(data.max_response_length), not --token-budget"] if cfg.token_budget is not None else []
    notes += ["verl has no 4-bit (bitsandbytes) loading: base model and reference run in bf16"
              ] if cfg.load_in_4bit else []
    notes += [f"verl's LoRA has no dropout (ours: --lora-dropout {cfg.lora_dropout})"] if cfg.lora_dropout else []
    notes += ["ours does not clip (--max-grad-norm 0); verl always does, so grad_clip is huge"
              ] if not cfg.max_grad_norm else []
    notes.append("optim.betas is a newer verl key; older versions use Adam betas (0.9, 0.999), ours (0.9, 0.99)")
    return head, _shell("verl.trainer.main_ppo", [shlex.quote(f"{k}={v}") for k, v in o.items()]), notes


# ---------------------------------------------------------------------------------------------------------
# OpenRLHF: flags for python3 -m openrlhf.cli.train_ppo_ray (the dotted CLI that flag-map.md measured)
# ---------------------------------------------------------------------------------------------------------
def _openrlhf(cfg):
    est, place = parse_kl(cfg.kl)
    P, G, lo, hi = cfg.prompts_per_step, cfg.group_size, *cfg.ratio_clip
    mb = min(cfg.micro_batch_size, P * G)
    f = [("--actor.model_name_or_path", cfg.model), ("--data.prompt_dataset", "TRAIN.jsonl"),
         ("--data.input_key", "question"), ("--data.label_key", "answer"), ("--data.apply_chat_template",),
         ("--reward.remote_url", "REWARD.py"), ("--rollout.batch_size", P), ("--rollout.n_samples_per_prompt", G),
         ("--rollout.max_new_tokens", cfg.max_new_tokens), ("--rollout.temperature", cfg.temperature),
         ("--rollout.micro_batch_size", mb), ("--train.batch_size", P * G), ("--train.micro_batch_size", mb),
         ("--train.max_epochs", 1), ("--train.num_episodes", 1), ("--data.max_samples", P * cfg.steps),
         ("--actor.adam.lr", cfg.lr), ("--actor.adam.weight_decay", cfg.weight_decay),
         ("--actor.adam.betas", 0.9, 0.99), ("--actor.lora.rank", cfg.lora_r), ("--actor.lora.alpha", cfg.lora_alpha)]
    f += [("--actor.lora.dropout", cfg.lora_dropout)] if cfg.lora_dropout else []
    f += [("--actor.load_in_4bit",)] if cfg.load_in_4bit else []
    f += [("--algo.advantage.estimator", OPENRLHF_ADV[cfg.adv]), ("--algo.kl.init_coef", cfg.beta if est else 0)]
    f += [("--algo.kl.estimator", est)] if est else []
    f += [("--algo.kl.use_loss",)] if place == "loss" else []
    f += [("--actor.eps_clip_low_high", 1 - lo, hi - 1), ("--actor.dual_clip", hi)]
    f += [("--train.async_enable",)] if cfg.async_level else []
    f += [("--train.seed", cfg.seed), ("--actor.num_gpus_per_node", 1), ("--ref.num_gpus_per_node", 1),
          ("--vllm.num_engines", 1), ("--train.colocate_all",)]
    head = ["# data: TRAIN.jsonl holds our rows {question, answer, ...}; from kl-rl's repository root:",
            _python_c('import json, tasks; open("TRAIN.jsonl", "w").writelines(json.dumps(e) + "\\n" for e in '
                      + _rows(cfg, "train", cfg.task, _dq) + ")"),
            "# reward: REWARD.py defines reward_func(queries, prompts, labels) returning tasks.reward("
            f"{cfg.task!r}, completion, {{'answer': label}}) per sample (as OpenRLHF's examples/python/reward_func.py)"]
    div = "the number of sequences" + (f" × {cfg.token_budget:g}" if cfg.token_budget is not None else "")
    notes = _common_notes("openrlhf", cfg)
    notes.append(f"the loss is a token mean (× N/Σ|y| per step relative to ours, which sums over tokens and divides "
                 f"by {div})" + (": the in-loss KL weighs as a per-token KL" if place == "loss" else ""))
    notes += ["every estimator, k1 included, is clamped to [-10, 10] (k1 exact for |δ| ≤ 10, k2 for |δ| ≤ 4.37, "
              "k3 for δ ∈ [−2.33, 10.2]); ours clamps only δ ≥ −20 inside k3's exponential"] if est else []
    if place == "reward":
        notes.append("its group baseline uses the task rewards only: the siblings' KL is not subtracted (same "
                     "expected gradient, other variance)")
        notes += {"rloo": [], "dr_grpo": ["Dr. GRPO does not shrink the KL gradient by 1 − 1/G (ours does)"],
                  "grpo": ["group_norm does not divide the KL by the group's std (ours does)"]}[cfg.adv]
    notes += ["group_norm's std gets ε = 1e-9 (ours 1e-4)"] if cfg.adv == "grpo" else []
    notes += ["the reference is a separate model worker (ours: the policy's base, adapters off)"] if est else []
    notes += [f"OpenRLHF runs len(data)/rollout.batch_size steps per episode: {cfg.steps} steps need {P * cfg.steps} "
              "rows in TRAIN.jsonl (else raise --train.num_episodes)",
              "unverified: --actor.lora.*, --actor.load_in_4bit, --actor.adam.weight_decay/betas follow train_sft's "
              "dotted CLI; not set: a constant lr without warmup (default cosine_with_min_lr, 3% warmup) and gradient "
              f"clip {cfg.max_grad_norm:g} (default 1.0); flat CLI: --lr_scheduler constant --lr_warmup_ratio 0 "
              "--max_norm",
              "older OpenRLHF spells these --pretrain --prompt_data --input_key --label_key --remote_rm_url "
              "--rollout_batch_size --n_samples_per_prompt --generate_max_len --temperature --actor_learning_rate "
              "--lora_rank --lora_alpha --init_kl_coef --kl_estimator --use_kl_loss --advantage_estimator"]
    parts = [" ".join([flag, *(shlex.quote(str(v)) for v in values)]) for flag, *values in f]
    return head, _shell("openrlhf.cli.train_ppo_ray", parts), notes


# ---------------------------------------------------------------------------------------------------------
# TRL: a GRPOTrainer or RLOOTrainer snippet (fields from grpo_config.py / rloo_config.py)
# ---------------------------------------------------------------------------------------------------------
def _trl_trainer(cfg):
    return "RLOO" if cfg.kl == "k1-in-reward" or cfg.kl == "none" and cfg.adv == "rloo" else "GRPO"


def _trl(cfg):
    est, place = parse_kl(cfg.kl)
    trainer, (lo, hi), L, tb = _trl_trainer(cfg), cfg.ratio_clip, cfg.max_new_tokens, cfg.token_budget
    args = dict(output_dir=f"runs/trl-{cfg.kl}", seed=cfg.seed, max_steps=cfg.steps, learning_rate=cfg.lr,
                lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.99,
                weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                per_device_train_batch_size=cfg.group_size, gradient_accumulation_steps=cfg.prompts_per_step,
                num_generations=cfg.group_size, max_completion_length=L, temperature=cfg.temperature,
                beta=cfg.beta if est else 0.0, num_iterations=1)
    if trainer == "RLOO":
        args["normalize_advantages"] = False
    else:
        args.update(loss_type="dr_grpo", scale_rewards="group" if cfg.adv == "grpo" else "none",
                    use_bias_correction_kl=cfg.kl_is == "rho", importance_sampling_level="token",
                    epsilon=1 - lo, epsilon_high=hi - 1, delta=hi)
    args = {k: repr(v) for k, v in args.items()}
    args.update(gradient_checkpointing=repr(cfg.gradient_checkpointing), logging_steps="1", report_to="'none'")
    if cfg.load_in_4bit:
        args["model_init_kwargs"] = ("{'quantization_config': BitsAndBytesConfig(load_in_4bit=True, "
                                     "bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, "
                                     "bnb_4bit_compute_dtype=torch.bfloat16)}")
    lines = ["import tasks  # kl-rl's tasks.py (run from the repository root): our rows and the 0/1 reward",
             "from datasets import Dataset", "from peft import LoraConfig",
             f"from trl import {trainer}Config, {trainer}Trainer"]
    lines += ["import torch", "from transformers import BitsAndBytesConfig"] if cfg.load_in_4bit else []
    lines += ["", f"TASK = {cfg.task!r}", f"rows = {_rows(cfg, 'train', cfg.task)}",
              "train = Dataset.from_list([{**r, 'prompt': [{'role': 'user', 'content': r['question']}]}"
              " for r in rows])",
              "FIELDS = list(rows[0])", "", "",
              "def reward(completions, **columns):  # TRL passes every other dataset column by name",
              "    texts = [c[-1]['content'] if isinstance(c, list) else c for c in completions]",
              "    return [tasks.reward(TASK, t, {k: columns[k][i] for k in FIELDS}) for i, t in enumerate(texts)]",
              "", "", f"config = {trainer}Config("] + [f"    {k}={v}," for k, v in args.items()] + [")"]
    lines += [f"peft_config = LoraConfig(r={cfg.lora_r}, lora_alpha={cfg.lora_alpha}, lora_dropout={cfg.lora_dropout},"
              " target_modules='all-linear', task_type='CAUSAL_LM')",
              f"trainer = {trainer}Trainer(model={cfg.model!r}, reward_funcs=reward, args=config, train_dataset=train,"
              " peft_config=peft_config)", "trainer.train()"]
    notes = _common_notes("trl", cfg)
    if trainer == "RLOO":
        notes.append("RLOOTrainer's importance ratio is per sequence (exp of the summed log-ratio), clipped "
                     "PPO-style; on-policy it is 1 and nothing binds")
        notes += [f"RLOOTrainer divides the loss by the number of sequences only: ours × --token-budget {tb:g} "
                  + ADAM_NOTE] if tb is not None else []
    elif tb != L:
        notes.append(f"loss_type='dr_grpo' divides by max_completion_length = {L}, i.e. ours with --token-budget {L}; "
                     f"this run has {'none' if tb is None else f'{tb:g}'}: a constant factor " + ADAM_NOTE)
    notes += ["TRL does not clamp k3: in float32 it overflows to inf below δ ≈ −88 (ours clamps δ at −20 "
              "inside the exponential)"] if est == "k3" else []
    notes += ["use_bias_correction_kl is set explicitly: its default became True in TRL 1.10"
              ] if est and trainer == "GRPO" else []
    return [], "\n".join(lines), notes


HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}   # real_model.py's short names -> their hub ids


def export(cfg, engine):
    """The text to print for `engine` (one of ENGINES): command or snippet, then the unavoidable differences."""
    if engine not in ENGINES:
        raise ExportError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    for f in dataclasses.fields(cfg):                   # a line break would end a `#` comment: the rest would run
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, str) and not v.isprintable():
                raise ExportError(f"--{f.name.replace('_', '-')} {v!r} holds a line break or another control "
                                  f"character; a pasted command would run what follows it")
    check(engine, cfg)
    ours_model = cfg.model
    if cfg.model in HUB_IDS:                            # our short name means nothing to another engine
        cfg = dataclasses.replace(cfg, model=HUB_IDS[cfg.model])
    head, body, notes = {"verl": _verl, "openrlhf": _openrlhf, "trl": _trl}[engine](cfg)
    if ours_model in HUB_IDS:
        notes = [f"--model {ours_model} is kl-rl's local conversion of {HUB_IDS[ours_model]} (real_model.py: its "
                 "weights dequantised from a 4-bit GGUF); the command above loads the hub's original weights"] + notes
    q = shlex.quote                                     # every string as a shell reads it back
    ours = (f"--model {q(ours_model)} --task {q(cfg.task)} --kl {q(cfg.kl)} --kl-level {q(cfg.kl_level)} --kl-is "
            f"{q(cfg.kl_is)} --beta {cfg.beta:g} --adv {q(cfg.adv)} --group-size {cfg.group_size} --prompts-per-step "
            f"{cfg.prompts_per_step} --steps {cfg.steps} --lr {cfg.lr:g} --max-new-tokens {cfg.max_new_tokens}")
    top = [f"# {NAME[engine]} version of: python train.py {ours}"] + head
    tail = [f"# differences from our run that {NAME[engine]} cannot avoid:"] + [f"#  - {n}" for n in notes]
    return "\n".join(top + [body] + tail) + "\n"
