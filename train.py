"""train.py -- KL-regularised RL fine-tuning of an LLM with LoRA on one GPU (or a CPU for the tiny default).

Maximises  E[R(x, y)] − β·KL(π_θ(·|x) ‖ π_ref(·|x)), the KL estimated from the sampled tokens by k1, k2 or
k3 and placed in the reward, the loss or both (--kl; see estimators.py for what each gradient equals). π_ref is the
frozen base model (LoRA adapters switched off), so a run holds one copy of the base weights. One step of main():
  1. sample   P prompts × G completions from the behaviour policy μ (π_θ, or its adapters --async-level steps ago)
  2. score    task rewards (tasks.reward); no-grad passes for log π_ref (and log μ when async)
  3. loss     per micro-batch of whole groups: log π_θ with grad, advantages from its detached copy
              (kl_rl.shaped_advantages), kl_rl.policy_loss, backward; gradients add up over micro-batches
  4. step     gradient-norm clip, one AdamW step
Setups: --preset paper-onpolicy (§4.1: RLOO, G=5, β=0.05, strictly on-policy, ≈256 samples per step; also what a
data-set task without --preset gets) and --preset paper-async (§4.2: Dr. GRPO, G=16, β=0.005, async level 10, ratio
clipped to [0, 8]); the paper's arms are --kl values (k1-in-reward, k1-in-loss, k3-in-reward, k3-in-loss, ...).
Explicit flags override a preset.

Simplifications vs the paper: LoRA instead of full fine-tuning (the presets use lr 1e-5, 10x the paper's full-fine-
tuning 1e-6, as LoRA GRPO recipes do; --lr 1e-6 is the paper's); HF generate instead of vLLM; completions of at
most 1024 tokens instead of 4096; asynchrony is simulated on one device (the behaviour policy is a stored copy of
the adapters N steps old, so μ is exactly that checkpoint).

Commands
  python train.py                  # offline CPU default: tiny Llama on arith, ~1.5 min on 2 cores; one run (seed 0):
                                   # held-out greedy 0.676 -> 0.836 (an example: floats differ on another CPU kind)
  python train.py --kl k3-in-loss                        # another arm, same setup
  python train.py --model Qwen/Qwen2.5-7B --task math --kl k1-in-reward --load-in-4bit --gradient-checkpointing
  python train.py --preset paper-onpolicy --kl k3-in-reward --beta 0.1     # β grid of §4.1: 0, 0.05, 0.1, 0.3, 1
  python train.py --preset paper-async --kl k1-in-reward
  python train.py --resume runs/NAME --steps 500                           # continue from the last checkpoint
  python eval.py --adapter runs/NAME --tasks arith,arith_spaced             # pass@k with bootstrap CIs
Outputs in --out: config.json (+ provenance: code_commit, code_dirty, model_id), metrics.jsonl (one "train" record
per step, "eval" records), metrics.png, checkpoint/ (peft adapter + state.pt: optimizer, RNG states, step, async
snapshots).

What a run refuses before it writes and when it stops (one line each): guards.py. Memory levers for a 7B on one
24 GB GPU, and every flag grouped: README.md (Training).
"""
import argparse
import json
import os
import random
import sys
import time
import warnings
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pickle import UnpicklingError
from types import SimpleNamespace

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from estimators import KL_CONFIGS, KL_IS, LEVELS
from kl_rl import ADVANTAGES, policy_loss, seq_kl_values, shaped_advantages
from guards import (Log, Stop, check_config, check_grad_norm, check_loss, check_out, check_resume, end_step,
                    eval_files, finite_sampling, load_data, resumed_config, shown, stop_on_signals)
from run_folder import (append_record, at, checkpoint_dir, last_checkpoint, lock_run, one_line, portable, release_run,
                        restore, write_atomic)
from tasks import PROMPT_FORMATS, TASKS, build_prompt, reward
from tools.provenance import code_version, machine, model_identity

HERE = os.path.dirname(os.path.abspath(__file__))
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")   # peft/transformers version noise
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")   # tasks.py reads data files with datasets


# ---------------------------------------------------------------------------------------------------------
# Configuration: one dataclass, one flag per field, grouped in --help
# ---------------------------------------------------------------------------------------------------------
def arg(default, help, group, **kw):
    return field(default=default, metadata={"help": help, "group": group, **kw})


MODEL, TASK, KL, RL, OPT, GEN, ASYNC, LOG = ("model", "task", "KL", "RL/advantage", "optimisation", "generation",
                                             "async", "logging/eval/checkpoint")


@dataclass
class Config:
    model: str = arg("assets/tiny-arith", "hub id or local folder of the base model", MODEL)
    load_in_4bit: bool = arg(False, "load the base model in 4-bit NF4 (QLoRA)", MODEL)
    lora_r: int = arg(16, "LoRA rank (adapters on every linear layer)", MODEL)
    lora_alpha: int = arg(32, "LoRA alpha", MODEL)
    lora_dropout: float = arg(0.0, "LoRA dropout", MODEL)
    gradient_checkpointing: bool = arg(False, "recompute activations in backward", MODEL)
    dtype: str = arg("auto", "compute dtype of the base weights (auto: bf16 on CUDA, fp32 on CPU)", MODEL,
                     choices=("auto", "fp32", "bf16"))
    task: str = arg("arith", "training task", TASK, choices=tuple(TASKS))
    data_path: str = arg(None, "local data file for the task (jsonl/parquet)", TASK, type=str)
    prompt_format: str = arg("auto", "chat: the tokenizer's chat template (instruct models); plain: the question as "
                             "text (base models); auto: chat if the tokenizer has a template", TASK,
                             choices=PROMPT_FORMATS)
    thinking: bool = arg(False, "let a template that supports it think (Qwen3 hybrids: enable_thinking)", TASK)
    eval_tasks: tuple = arg((), "held-out tasks (test splits; default: the training task's)", TASK, nargs="*",
                            choices=tuple(TASKS), type=str)
    eval_data: tuple = arg((), "local files for held-out data-set tasks, e.g. math500=MATH-500.jsonl", TASK,
                           nargs="*", type=str, metavar="TASK=FILE")
    kl: str = arg("k1-in-reward", "KL estimator and placement", KL, choices=KL_CONFIGS)
    kl_level: str = arg("sequence", "in-reward KL: one sequence penalty or reward-to-go", KL, choices=LEVELS)
    beta: float = arg(0.05, "KL coefficient β", KL)
    kl_is: str = arg("none", "off-policy weight on an in-loss KL (rho: RPG, token level; sg_rho: with k2; prefix: "
                     "sequence level, with k1/k3-in-loss)", KL, choices=KL_IS)
    kl_is_clip: float = arg(None, "truncate the prefix weights at c (--kl-is prefix only; default: no truncation, "
                            "unbiased)", KL, type=float)
    adv: str = arg("rloo", "advantage baseline", RL, choices=ADVANTAGES)
    group_size: int = arg(8, "G: completions per prompt", RL)
    prompts_per_step: int = arg(32, "prompts per step (batch = prompts × G sequences)", RL)
    token_budget: float = arg(None, "constant the summed loss is divided by (besides #sequences)", RL, type=float)
    lr: float = arg(2e-3, "AdamW learning rate (betas 0.9/0.99, constant)", OPT)
    weight_decay: float = arg(0.0, "AdamW weight decay", OPT)
    max_grad_norm: float = arg(1.0, "gradient-norm clip (0 = off)", OPT)
    steps: int = arg(150, "optimizer steps", OPT)
    micro_batch_size: int = arg(256, "sequences per forward/backward pass", OPT)
    optim: str = arg("adamw", "optimizer", OPT, choices=("adamw", "paged_adamw_8bit"))
    share_prompt: bool = arg(False, "log-prob passes run a group's prompt once for its G rows (float rounding)", OPT)
    memory_budget_gb: float = arg(0.0, "memory (GiB) the no-grad passes may fill, which sets their rows per pass (0: "
                                  "the GPU's memory, or RAM on a CPU)", OPT)
    max_new_tokens: int = arg(8, "completion length limit", GEN)
    temperature: float = arg(1.0, "sampling temperature (KL and ratios use logits / T too)", GEN)
    rollout_batch_size: int = arg(0, "sequences per generate call (0 = the whole batch)", GEN)
    compile_decode: bool = arg(False, "static KV cache + torch.compile of the decode step (4-bit: cache only)", GEN)
    rollout_bf16_copy: bool = arg(False, "sample from a bf16 copy of the base, LoRA merged in (CUDA, +2 B/param)", GEN)
    async_level: int = arg(0, "behaviour policy = adapters of this many steps ago (0 = on-policy)", ASYNC)
    ratio_clip: tuple = arg((0.0, 8.0), "clamp of the token importance ratio (no PPO min)", ASYNC, nargs=2,
                            metavar=("LO", "HI"))
    eval_every: int = arg(50, "held-out eval every N steps, and at the end (0: start and end only)", LOG)
    eval_n: int = arg(500, "held-out problems per eval task (0: none during the run; eval.py evaluates it after)", LOG)
    eval_modes: tuple = arg(("greedy", "sample"), "greedy and/or sampled (at --temperature) held-out accuracy", LOG,
                            nargs="+", choices=("greedy", "sample"), type=str)
    save_every: int = arg(0, "checkpoint every N steps, and at the end (0: end only)", LOG)
    diag_every: int = arg(1, "exact full-vocabulary KLs and entropy every N steps (0: never; others omit them)", LOG)
    out: str = arg(None, "run folder (default runs/<time>-<task>-<kl>)", LOG, type=str)
    resume: str = arg(None, "run folder to continue from its checkpoint", LOG, type=str)
    preset: str = arg(None, "named setup (explicit flags override it)", LOG, type=str,
                      choices=("paper-onpolicy", "paper-async", "smollm2-cpu"))
    seed: int = arg(0, "seed (step s draws prompts and samples with seed·100003 + s)", LOG)
    device: str = arg(None, "cuda / cpu (default: cuda if available)", LOG, type=str)
    threads: int = arg(1, "torch threads on CPU (tiny models: more threads only wait at barriers; 0 = torch's)", LOG)
    export: str = arg(None, "print this run as a command for a multi-GPU engine and exit without training", "scaling out",
                      type=str, choices=("verl", "openrlhf", "trl"))


HUB_TASKS = ("math", "math500", "mmlu_college_physics", "mmlu_college_chemistry", "mmlu_college_biology")
PAPER_7B = dict(model="Qwen/Qwen2.5-7B", task="math", eval_tasks=("math500",), load_in_4bit=True,
                gradient_checkpointing=True, micro_batch_size=4, rollout_batch_size=64, max_new_tokens=1024,
                temperature=1.0, eval_every=50, eval_n=200, eval_modes=("sample",), save_every=25)
# lr 1e-5: LoRA wants ~10x the paper's full-fine-tuning 1e-6 (§4.2; Schulman et al. 2025, "LoRA Without Regret", whose
# TRL reproduction runs GRPO+LoRA at 1e-5, alpha 32, all-linear; README: Training). --lr 1e-6 is the paper's.
PRESETS = {
    # §4.1: RLOO, strictly on-policy (ratio ≡ 1); 51 × 5 = 255 ≈ 256 samples per step
    "paper-onpolicy": dict(PAPER_7B, adv="rloo", group_size=5, prompts_per_step=51, beta=0.05, async_level=0,
                           lr=1e-5, steps=250),
    # §4.2: Dr. GRPO, 32 × 16 = 512 samples, behaviour policy 10 steps old, token ratio clamped to [0, 8]
    "paper-async": dict(PAPER_7B, adv="dr_grpo", group_size=16, prompts_per_step=32, beta=0.005, async_level=10,
                        ratio_clip=(0.0, 8.0), lr=1e-5, weight_decay=0.01, steps=420),
    # a real pretrained model on a 2-core CPU in ~20 min (real_model.py; README "A real model on a CPU"): SmolLM2-
    # 135M-Instruct on arith_q, out of domain mul_q. T = 0.7: at T = 1 its samples are almost never right.
    "smollm2-cpu": dict(model="smollm2-135m", task="arith_q", eval_tasks=("arith_q", "mul_q"), group_size=8,
                        prompts_per_step=4, max_new_tokens=32, temperature=0.7, lr=1e-3, steps=30, eval_every=0,
                        eval_n=200, save_every=10, threads=1, share_prompt=True),
}


PATHS = ("model", "data_path", "out", "resume")              # stored relative to the repository root (portable)


def die(msg):
    print(f"train.py: error: {msg}", file=sys.stderr)      # one line, exit 2: the argparse convention
    sys.exit(2)


def parse_config(argv=None):
    """defaults < --preset < the resumed run's config.json < flags given on the command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
                                 epilog=__doc__[__doc__.index("Commands"):__doc__.index("Outputs in")], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.error = die                                           # one line instead of usage + error
    groups = {}
    for f in fields(Config):
        meta = dict(f.metadata)
        group = groups.setdefault(meta.pop("group"), ap.add_argument_group(f.metadata["group"]))
        if "default" not in meta["help"] and f.default not in (None, ()):
            meta["help"] += f" (default: {shown(f.default)})"
        if isinstance(f.default, bool):
            meta["action"] = argparse.BooleanOptionalAction
        elif "type" not in meta:
            meta["type"] = type(f.default[0]) if isinstance(f.default, tuple) else type(f.default)
        group.add_argument("--" + f.name.replace("_", "-"), **meta)
    given = vars(ap.parse_args(argv))
    resumed = {}
    if "resume" in given:                                    # the run's config.json, the flags that may change
        try:
            resumed = resumed_config(given, fields(Config), PATHS)
        except ValueError as e:
            die(one_line(e))
    preset = given.get("preset", resumed.get("preset"))
    task = given.get("task", resumed.get("task", Config.task))
    if preset is None and not resumed and task in HUB_TASKS:
        # the defaults above fit the tiny offline model; a data-set task gets the paper's on-policy setup (§4.1)
        given["preset"] = preset = "paper-onpolicy"                        # main() says so once input is valid
        given.setdefault("eval_tasks", ("math500",) if task == "math" else ())
    cfg = Config(**{**PRESETS.get(preset, {}), **resumed, **given})
    cfg.eval_tasks, cfg.eval_modes, cfg.ratio_clip = tuple(cfg.eval_tasks), tuple(cfg.eval_modes), tuple(cfg.ratio_clip)
    cfg.eval_data = tuple(cfg.eval_data)
    if not os.path.isdir(cfg.model) and os.path.isdir(os.path.join(HERE, cfg.model)):
        cfg.model = os.path.join(HERE, cfg.model)            # the shipped tiny model, from any working directory
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Training: the recipe of the module docstring; guards at a step's start (sampling) and end (end_step)
# ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    cfg = parse_config(argv)
    try:
        kl = check_config(cfg)
        if argv is None and not cfg.load_in_4bit and cfg.optim == "adamw":   # the command line, not a caller's process
            sys.modules.setdefault("bitsandbytes", None)    # peft imports it if installed: ~1.2 s, here never used
        if cfg.export:                                       # a command for another engine, no training
            from tools.export import export
            print(export(cfg, cfg.export).rstrip("\n"))
            return 0
        train_set, held_out = load_data(cfg)
        if cfg.preset:
            print(f"train.py: preset {cfg.preset} (model {cfg.model}); explicit flags override it", file=sys.stderr)
        run = start_run(cfg, argv)                           # the locked run folder, model, optimizer, metrics log
    except (ValueError, OSError) as e:                      # TaskError and ExportError are ValueErrors
        die(one_line(e))
    from policy import clock, kl_stats_from_hidden, logprobs_in_chunks as logprobs_nograd, peak_memory_gb, rollout_copy
    model, G, N = run.model, cfg.group_size, cfg.prompts_per_step * cfg.group_size
    shared = G if cfg.share_prompt else 1                    # rows per prompt pass (policy._completion_hidden)
    # sg(log π_θ) (an in-reward KL) and the policy half of the exact KL diagnostics come from the grad pass itself,
    # unless dropout would perturb it
    nograd_policy_pass = cfg.lora_dropout > 0
    sampler = rollout_copy(model) if cfg.rollout_bf16_copy else None    # CUDA only (check_config)
    pbar = tqdm(range(run.start, cfg.steps), initial=run.start, total=cfg.steps, desc="train", disable=None)
    try:
        for step in pbar:
            if held_out and step % (cfg.eval_every or cfg.steps + 1) == 0:
                run.log.records(evaluate(model, run.tok, cfg, held_out, step, run.out))
            # 1. sample: P prompts × G completions from the behaviour policy μ (and log μ when μ is a stale copy)
            t0 = clock()
            batch, ro, behav_logp, nograd_rows, t1 = sample(run, cfg, train_set, sampler, step)
            mask = ro["completion_mask"]                     # (N, C) 1 on completion tokens up to their EOS
            # 2. score: task rewards, log π_ref (and the reference's hidden states for the exact KL diagnostics)
            rewards = torch.tensor([reward(cfg.task, text, ex) for text, ex in
                                    zip(ro["texts"], (ex for ex in batch for _ in range(G)))], device=mask.device)  # (N,)
            # exact KLs need full logits: the first few rows suffice, every --diag-every steps
            D = min(N, cfg.micro_batch_size, 64) if cfg.diag_every and step % cfg.diag_every == 0 else 0
            with model.disable_adapter():
                ref_logp, ref_h = logprobs_nograd(model, ro, nograd_rows, cfg.temperature, D, shared)   # (N, C) π_ref
            sg_logp, sg_h = logprobs_nograd(model, ro, nograd_rows, cfg.temperature, D, shared) if nograd_policy_pass \
                else (None, None)
            t2 = clock()
            # 3. loss: advantages and policy_loss per micro-batch of whole groups; gradients add up
            logp, hs = backward(run, cfg, kl, ro, rewards, ref_logp, sg_logp, behav_logp, D, step)   # (N, C), no grad
            t3 = clock()
            # exact KLs from the states those passes computed (the policy's from the no-grad pass when dropout is on)
            exact = kl_stats_from_hidden(model, sg_h if nograd_policy_pass else torch.cat(hs), ref_h,
                                         cfg.temperature) if D else {}
            # 4. step: clip, one AdamW step
            t4 = clock()
            grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm or float("inf")).item()
            check_grad_norm(grad_norm, step)                 # a non-finite norm stops before the weights change
            run.optimizer.step()
            t5 = clock()
            rec = {"type": "train", "step": step, **batch_metrics(cfg, kl, rewards, logp, sg_logp, ref_logp, mask,
                                                                  behav_logp), **exact, "grad_norm": grad_norm,
                   "truncated_frac": ro["truncated"].float().mean().item(),
                   "time_generate": t1 - t0, "time_no_grad": t2 - t1 + t4 - t3, "time_policy": t3 - t2,
                   "time_optimizer": t5 - t4, "time_step": t5 - t0,
                   "tokens_per_s": ro["attention_mask"].sum().item() / (t5 - t0), "peak_mem_gb": peak_memory_gb()}
            end_step(run, cfg, step, rec, rewards, logp, mask)   # checks, the metrics record, the checkpoint when due
            progress(pbar, cfg, step, rec)
    except Stop as e:                                        # one line naming the last good checkpoint, exit 1
        print(f"train.py: error: {e}; {last_checkpoint(run.out)}", file=sys.stderr)
        return 1
    pbar.close()
    run.log.records(evaluate(model, run.tok, cfg, held_out, cfg.steps, run.out))
    run.log.close()
    from tools.report import report                          # summary table on stdout, metrics.png
    report(run.out)
    return 0


def sample(run, cfg, train_set, sampler, step):
    """1. sample: P prompts (drawn with the step's seed) × G completions from the behaviour policy μ: π_θ, or with
    --async-level N the adapters of N steps ago, swapped in for the rollout and for μ's log-probs.
    -> batch (P examples), ro (policy.rollout's dict: input_ids (N, L), completion_mask (N, C), texts, ...),
       behav_logp ((N, C) log μ, or None on-policy), nograd_rows (rows per no-grad pass), the clock after generate."""
    from policy import (adapter_snapshot, clock, logprobs_in_chunks, nograd_passes, reset_peak_memory, rollout,
                        swapped_adapter, sync_rollout_copy)
    model, G, N = run.model, cfg.group_size, cfg.prompts_per_step * cfg.group_size
    rng = random.Random(cfg.seed * 100003 + step)           # per-step seeds: a resumed run replays exactly
    batch = rng.sample(train_set, cfg.prompts_per_step) if cfg.prompts_per_step <= len(train_set) else \
        rng.choices(train_set, k=cfg.prompts_per_step)
    prompts = [build_prompt(run.tok, ex["question"], cfg.prompt_format, cfg.thinking) for ex in batch]
    model.eval()                                             # generate and no-grad passes: no dropout, KV cache on
    if cfg.async_level:
        run.snapshots.append(adapter_snapshot(model))
    behaviour = swapped_adapter(model, run.snapshots[0], live=run.snapshots[-1]) if cfg.async_level else nullcontext()
    reset_peak_memory()                                      # peak_mem_gb: this step's peak
    with behaviour, finite_sampling(step, run.out):
        ro = rollout(sync_rollout_copy(sampler, model) if sampler else model, run.tok, prompts, G, cfg.max_new_tokens,
                     cfg.temperature, seed=cfg.seed * 100003 + step, batch_size=cfg.rollout_batch_size,
                     compile=cfg.compile_decode)
        t1 = clock()
        # no-grad passes keep no activations: as many rows per pass as the memory budget holds (README: Memory)
        nograd_rows = nograd_passes(model, N, G, ro["input_ids"].shape[1], cfg.memory_budget_gb)
        behav_logp = logprobs_in_chunks(model, ro, nograd_rows, cfg.temperature, 0, G if cfg.share_prompt else 1)[0] \
            if cfg.async_level else None
    return batch, ro, behav_logp, nograd_rows, t1


def backward(run, cfg, kl, ro, rewards, ref_logp, sg_logp, behav_logp, D, step):
    """3. loss: per micro-batch of whole groups (a group's baseline needs all its members), log π_θ with grad,
    advantages from its detached copy (kl_rl.shaped_advantages), kl_rl.policy_loss, backward; gradients add up.
    -> logp (N, C) detached, and the hidden states of the first D rows (exact KL diagnostics). A non-finite loss
    stops the run before its backward (guards.check_loss)."""
    from policy import release_freed_memory, token_logprobs
    G, N = cfg.group_size, cfg.prompts_per_step * cfg.group_size
    mb = max(1, cfg.micro_batch_size // G) * G              # whole groups
    ids, attn, P, mask = ro["input_ids"], ro["attention_mask"], ro["prompt_len"], ro["completion_mask"]
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    logps, hs = [], []
    for sl in (slice(i, i + mb) for i in range(0, N, mb)):   # (n, C) with grad, and hidden states for the exact KLs
        logp, h = token_logprobs(run.model, ids[sl], attn[sl], P, cfg.temperature, keep_hidden=max(0, D - sl.start),
                                 group_size=G if cfg.share_prompt else 1)
        advantages, _ = shaped_advantages(rewards[sl], logp.detach() if sg_logp is None else sg_logp[sl],
                                          ref_logp[sl], mask[sl], G, cfg.beta, kl, cfg.adv)   # (n, C)
        loss, m = policy_loss(logp, ref_logp[sl], mask[sl], advantages, cfg.beta, kl,
                              None if behav_logp is None else behav_logp[sl], cfg.ratio_clip, n_seqs=N,
                              token_budget=cfg.token_budget)
        check_loss(loss, m, step)
        loss.backward()
        logps.append(logp.detach())
        hs.append(h)
    release_freed_memory()                                   # the pass's freed activations leave RSS (CPU, glibc)
    return torch.cat(logps), hs


def progress(pbar, cfg, step, rec):
    """The bar's reward / KL / length, or, without a terminal (a log file, a scheduler), a line every 5% of steps."""
    pbar.set_postfix(reward=f"{rec['reward']:.3f}", kl=f"{rec['kl_k1']:.4f}", len=f"{rec['completion_len']:.1f}")
    if pbar.disable and (step + 1) % max(1, cfg.steps // 20) == 0:
        print(f"train.py: step {step + 1}/{cfg.steps}  reward {rec['reward']:.3f}  kl_k1 {rec['kl_k1']:.4f}  "
              f"{rec['time_step']:.2f} s/step", file=sys.stderr, flush=True)


def batch_metrics(cfg, kl, rewards, logp, sg_logp, ref_logp, mask, behav_logp):
    """Rewards, the three sequence KL estimates, both loss terms and ratio stats of the whole batch (no grad)."""
    advantages, adv_metrics = shaped_advantages(rewards, logp if sg_logp is None else sg_logp, ref_logp, mask,
                                                cfg.group_size, cfg.beta, kl, cfg.adv)
    _, loss_metrics = policy_loss(logp, ref_logp, mask, advantages, cfg.beta, kl, behav_logp, cfg.ratio_clip,
                                  token_budget=cfg.token_budget)
    # for an in-reward KL, kl_term is 0 by design: the penalty β·Σk it subtracts from the reward is logged beside it
    return {**adv_metrics, "kl_penalty": adv_metrics["reward"] - adv_metrics["shaped_reward"],
            "accuracy": (rewards > 0.5).float().mean().item(),
            **{f"kl_{k}": v for k, v in seq_kl_values(logp, ref_logp, mask).items()}, **loss_metrics,
            "loss": loss_metrics["pg_term"] + loss_metrics["kl_term"], "completion_len": mask.sum(1).mean().item()}


# ---------------------------------------------------------------------------------------------------------
# The run's edges: held-out evaluation, and the start (lock, checks, model, config.json, optimizer)
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, tok, cfg, held_out, step, out):
    """Held-out accuracy (greedy and/or sampled at --temperature) on each eval task -> list of JSONL records."""
    from policy import rollout
    model.eval()
    records = []
    for name, rows in held_out.items():
        rec = {"type": "eval", "step": step, "task": name, "n": len(rows)}
        prompts = [build_prompt(tok, ex["question"], cfg.prompt_format, cfg.thinking) for ex in rows]
        for mode in cfg.eval_modes:
            t0 = time.time()
            with finite_sampling(step, out):
                ro = rollout(model, tok, prompts, 1, cfg.max_new_tokens, 0.0 if mode == "greedy" else cfg.temperature,
                             seed=cfg.seed * 100003 + 10**9 + step, batch_size=cfg.rollout_batch_size)
            rec[f"{mode}_acc"] = sum(reward(name, t, ex) > 0.5 for t, ex in zip(ro["texts"], rows)) / len(rows)
            rec[f"{mode}_len"] = ro["completion_mask"].sum(1).mean().item()
            # a held-out evaluation of a real model takes minutes: never silent, in a terminal or a log file
            print(f"train.py: step {step} held-out {name} {mode} accuracy {rec[f'{mode}_acc']:.3f} ({len(rows)} "
                  f"problems, {time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        records.append(rec)
    return records


def start_run(cfg, argv):
    """-> the run: out, model, tok, params, optimizer, snapshots, log, start (0, or the resumed checkpoint's step),
    zeros (zero_gradient's count). The run folder is locked first (one writer; held until the process exits) and read
    through its pinned descriptor (at). Everything that can fail on bad input (the checkpoint, the model files, the
    run folder) is tried before the run folder is written, so a failed start loses nothing and leaves no folder."""
    from policy import load_policy
    if cfg.threads and (cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        torch.set_num_threads(cfg.threads)
    out = cfg.resume or cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.task}-{cfg.kl}")
    made = lock_run(out)                                     # one writer per run folder, before anything is read
    if argv is None:                                         # the command line (not a caller's process)
        stop_on_signals(out)
    try:
        check_out(cfg, out)
        state, provenance, kept = check_resume(cfg, out) if cfg.resume else (None, None, None)
        torch.manual_seed(cfg.seed)                          # LoRA initialisation
        try:
            model, tok = load_policy(cfg.model, load_in_4bit=cfg.load_in_4bit, lora_r=cfg.lora_r,
                                     lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                     gradient_checkpointing=cfg.gradient_checkpointing, device=cfg.device,
                                     adapter=checkpoint_dir(at(out)) if state else None, dtype=cfg.dtype)
        except (OSError, RuntimeError, SafetensorError, UnpicklingError, ValueError) as e:   # a truncated file, a pickle
            raise ValueError(f"cannot load model {cfg.model!r}: {one_line(e)[:200]}".replace(at(out), out)) from None
    except BaseException:
        release_run(out, made)                               # a failed start leaves no folder behind
        raise
    commit, dirty = code_version()
    if not state:                                            # provenance is written once, when the run starts
        provenance = {"code_commit": commit, "code_dirty": dirty, "model_id": model_identity(cfg.model),
                      "machine": machine()}
    stored = {**asdict(cfg), "out": out, **provenance}
    stored.update({k: portable(stored[k]) for k in PATHS})
    stored["eval_data"] = eval_files(cfg.eval_data, portable)
    try:                                                     # a full disk here: one line, the checkpoint intact
        write_atomic(at(out, "config.json"), json.dumps(stored, indent=2))   # readers trust it whole
        if state:
            write_atomic(at(out, "metrics.jsonl"), kept)    # what followed the checkpoint is dropped and redone
            append_record(out, "resumes.jsonl", {           # every resume is on record, last: only one that started
                "time": time.strftime("%Y-%m-%d %H:%M:%S"), "from_step": state["step"],
                "argv": list(sys.argv[1:] if argv is None else argv), "code_commit": commit, "code_dirty": dirty,
                "machine": machine()})
    except OSError as e:
        print(f"train.py: error: {one_line(e)}; {last_checkpoint(out)}", file=sys.stderr)
        sys.exit(1)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    else:
        import bitsandbytes as bnb
        optimizer = bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    snapshots = deque(maxlen=cfg.async_level + 1)           # adapters at the start of the last N+1 steps
    start = restore(state, optimizer, snapshots) if state else 0
    return SimpleNamespace(out=out, model=model, tok=tok, params=params, optimizer=optimizer, snapshots=snapshots,
                           log=Log(out, append=bool(state)),   # a fresh run never appends to an old file
                           start=start, zeros={"zeros": 0, "moved": False, "warned": False})


if __name__ == "__main__":
    stop_on_signals(None)                                    # start_run names the run folder once there is one
    sys.exit(main())
