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
  python train.py                  # offline CPU default: tiny Llama on arith, ~1.5 min on 2 cores; held-out greedy
                                   # accuracy 0.676 -> 0.824, sampled 0.328 -> 0.608 (seed 0)
  python train.py --kl k3-in-loss                        # another arm, same setup
  python train.py --model Qwen/Qwen2.5-7B --task math --kl k1-in-reward --load-in-4bit --gradient-checkpointing
  python train.py --preset paper-onpolicy --kl k3-in-reward --beta 0.1     # β grid of §4.1: 0, 0.05, 0.1, 0.3, 1
  python train.py --preset paper-async --kl k1-in-reward
  python train.py --resume runs/NAME --steps 500                           # continue from the last checkpoint
  python eval.py --adapter runs/NAME --tasks arith,arith_spaced             # pass@k with bootstrap CIs
Outputs in --out: config.json, metrics.jsonl (one "train" record per step, "eval" records), metrics.png,
checkpoint/ (peft adapter + state.pt: optimizer, RNG states, step, async snapshots).

Memory levers for a 7B on one 24 GB GPU, and every flag grouped: README.md (Training).
"""
import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from estimators import KL_CONFIGS, KL_IS, LEVELS, parse_kl
from kl_rl import ADVANTAGES, policy_loss, seq_kl_values, shaped_advantages
from run_folder import checkpoint_dir, last_checkpoint, read_state, report, restore, save_checkpoint
from tasks import TASKS, TaskError, build_prompt, load_task, reward

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
    memory_budget_gb: float = arg(None, "memory (GiB) the no-grad passes may fill; sets their rows per pass (default: "
                                  "the GPU's memory, or RAM on a CPU)", OPT, type=float)
    max_new_tokens: int = arg(8, "completion length limit", GEN)
    temperature: float = arg(1.0, "sampling temperature (KL and ratios use logits / T too)", GEN)
    rollout_batch_size: int = arg(0, "sequences per generate call (0 = the whole batch)", GEN)
    compile_decode: bool = arg(False, "static KV cache + torch.compile of the decode step (4-bit: cache only)", GEN)
    rollout_bf16_copy: bool = arg(False, "sample from a bf16 copy of the base, LoRA merged in (CUDA, +2 B/param)", GEN)
    async_level: int = arg(0, "behaviour policy = adapters of this many steps ago (0 = on-policy)", ASYNC)
    ratio_clip: tuple = arg((0.0, 8.0), "clamp of the token importance ratio (no PPO min)", ASYNC, nargs=2,
                            metavar=("LO", "HI"))
    eval_every: int = arg(50, "held-out eval every N steps, and at the end (0: start and end only)", LOG)
    eval_n: int = arg(500, "held-out problems per eval task", LOG)
    eval_modes: tuple = arg(("greedy", "sample"), "greedy and/or sampled (at --temperature) held-out accuracy", LOG,
                            nargs="+", choices=("greedy", "sample"), type=str)
    save_every: int = arg(0, "checkpoint every N steps, and at the end (0: end only)", LOG)
    diag_every: int = arg(1, "exact full-vocabulary KLs and entropy every N steps (0: never; others omit them)", LOG)
    out: str = arg(None, "run folder (default runs/<time>-<task>-<kl>)", LOG, type=str)
    resume: str = arg(None, "run folder to continue from its checkpoint", LOG, type=str)
    preset: str = arg(None, "named setup (explicit flags override it)", LOG, type=str,
                      choices=("paper-onpolicy", "paper-async"))
    seed: int = arg(0, "seed (step s draws prompts and samples with seed·100003 + s)", LOG)
    device: str = arg(None, "cuda / cpu (default: cuda if available)", LOG, type=str)
    threads: int = arg(1, "torch threads on CPU (tiny models: more threads only wait at barriers; 0 = torch's)", LOG)
    export: str = arg(None, "print this run as a command for a multi-GPU engine and exit without training", "scaling out",
                      type=str, choices=("verl", "openrlhf", "trl"))


HUB_TASKS = ("math", "math500", "mmlu_college_physics", "mmlu_college_chemistry", "mmlu_college_biology")
PAPER_7B = dict(model="Qwen/Qwen2.5-7B", task="math", eval_tasks=("math500",), load_in_4bit=True,
                gradient_checkpointing=True, micro_batch_size=4, rollout_batch_size=64, max_new_tokens=1024,
                temperature=1.0, eval_every=50, eval_n=200, eval_modes=("sample",), save_every=25)
# lr: the paper fine-tunes all weights at 1e-6 (§4.2; §4.1 reports none). LoRA (alpha 32) wants ~10x a full fine-tuning
# lr (Schulman et al. 2025, "LoRA Without Regret"; TRL's reproduction trains GRPO with LoRA at 1e-5 against full
# fine-tuning at 1e-6, lora_alpha 32, all-linear); Unsloth's QLoRA GRPO notebooks use 5e-6 at alpha = r (half our
# scale alpha/r = 2). --lr 1e-6 gives the paper's value.
PRESETS = {
    # §4.1: RLOO, strictly on-policy (ratio ≡ 1); 51 × 5 = 255 ≈ 256 samples per step
    "paper-onpolicy": dict(PAPER_7B, adv="rloo", group_size=5, prompts_per_step=51, beta=0.05, async_level=0,
                           lr=1e-5, steps=250),
    # §4.2: Dr. GRPO, 32 × 16 = 512 samples, behaviour policy 10 steps old, token ratio clamped to [0, 8]
    "paper-async": dict(PAPER_7B, adv="dr_grpo", group_size=16, prompts_per_step=32, beta=0.005, async_level=10,
                        ratio_clip=(0.0, 8.0), lr=1e-5, weight_decay=0.01, steps=420),
}


RESUMABLE = ("resume", "steps", "eval_every", "save_every", "diag_every", "device", "threads", "compile_decode",
             "memory_budget_gb", "export")                                       # speed and logging only: cannot change the run
EXAMPLES = """examples:
  python train.py                                             # the offline default: tiny model, arith, k1-in-reward
  python train.py --kl k3-in-loss --beta 0.5 --out runs/k3    # another arm
  python train.py --preset paper-onpolicy --kl k1-in-reward   # the paper's 7B on-policy setup (QLoRA, one GPU)
  python train.py --resume runs/k3 --steps 300                # continue a run (only --steps and cadence may change)"""


def die(msg):
    print(f"train.py: error: {msg}", file=sys.stderr)      # one line, exit 2: the argparse convention
    sys.exit(2)


def shown(v):
    """A default as a user would type it: on/off, `0.0 8.0` for a pair, nothing for an empty list."""
    return ("on" if v else "off") if isinstance(v, bool) else " ".join(map(str, v)) if isinstance(v, tuple) else v


def parse_config(argv=None):
    """defaults < --preset < the resumed run's config.json < flags given on the command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    if "resume" in given:
        resumed = resumed_config(given)
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


def resumed_config(given):
    """The run's config.json; refuses a flag that would change what the run is (a different arm, lr, model...)."""
    run = given["resume"]
    try:
        saved = json.load(open(os.path.join(run, "config.json")))
        assert isinstance(saved, dict)
    except FileNotFoundError:
        die(f"--resume {run}: no config.json there (not a run folder)")
    except (OSError, ValueError, AssertionError):
        die(f"--resume {run}: config.json is unreadable or corrupt (not a JSON object)")
    names = {f.name: f.default for f in fields(Config)}
    resumed = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names}
    for k, v in given.items():
        was = resumed.get(k, names[k])
        if k not in RESUMABLE and (tuple(v) if isinstance(v, list) else v) != was:
            die(f"--resume {run}: --{k.replace('_', '-')} {shown(v)} would change the run (it has {shown(was)}); "
                f"only {', '.join('--' + r.replace('_', '-') for r in RESUMABLE[1:-1])} may change on resume")
    return resumed


def check_config(cfg):
    """Reject bad values before anything heavy runs (ValueError -> one line, exit 2). -> the parsed KLConfig."""
    kl = parse_kl(cfg.kl, cfg.kl_level, cfg.kl_is, is_clip=math.inf if cfg.kl_is_clip is None else cfg.kl_is_clip)
    rules = dict(group_size=(2, 1), prompts_per_step=(1, 1), steps=(0, 1), micro_batch_size=(1, 1),
                 max_new_tokens=(1, 1), eval_n=(1, 1), async_level=(0, 1), lora_r=(1, 1), lora_alpha=(0, 0),
                 temperature=(0, 0), lr=(0, 0), weight_decay=(0, 1), lora_dropout=(0, 1), eval_every=(0, 1),
                 save_every=(0, 1), rollout_batch_size=(0, 1), diag_every=(0, 1))   # name -> (bound, 1: >=, 0: >)
    for name, (bound, inclusive) in rules.items():
        v = getattr(cfg, name)
        if not (math.isfinite(v) and (v >= bound if inclusive else v > bound)):
            raise ValueError(f"--{name.replace('_', '-')} must be finite and {'>=' if inclusive else '>'} {bound}, "
                             f"got {v}")
    if not cfg.lora_dropout < 1:
        raise ValueError(f"--lora-dropout is a probability < 1, got {cfg.lora_dropout}")
    if not (math.isfinite(cfg.beta) and cfg.beta >= 0):
        raise ValueError(f"--beta must be a finite number >= 0, got {cfg.beta}")
    if not (cfg.max_grad_norm >= 0 and (cfg.token_budget is None or cfg.token_budget > 0)):
        raise ValueError("--max-grad-norm must be >= 0 and --token-budget > 0: a negative one flips the gradient")
    if cfg.rollout_bf16_copy and (cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cuda":
        raise ValueError("--rollout-bf16-copy needs a CUDA device (a CPU run samples from the training model)")
    if not cfg.ratio_clip[0] <= cfg.ratio_clip[1]:
        raise ValueError(f"--ratio-clip LO HI needs LO <= HI, got {cfg.ratio_clip}")
    if cfg.resume and not os.path.isfile(os.path.join(checkpoint_dir(cfg.resume), "state.pt")):
        raise ValueError(f"--resume {cfg.resume}: no checkpoint in it")
    states = ("checkpoint", "checkpoint.old", "checkpoint.tmp")   # a crash can leave any of them
    if not cfg.resume and cfg.out and any(os.path.exists(os.path.join(cfg.out, n)) for n in states):
        raise ValueError(f"{cfg.out} already holds a run; continue it with --resume {cfg.out} or pick another --out")
    return kl


def load_data(cfg):
    """Train set, held-out sets and the tokenizer; checks that every prompt + max_new_tokens fits the context."""
    train = load_task(cfg.task, "train", seed=cfg.seed, path=cfg.data_path)
    files = dict(item.partition("=")[::2] for item in cfg.eval_data)     # offline machines: no hub for test sets
    if any(not f for f in files.values()):
        raise ValueError(f"--eval-data takes TASK=FILE pairs, got {' '.join(cfg.eval_data)}")
    held_out = {name: load_task(name, "test", n=cfg.eval_n, path=files.get(name))
                for name in (cfg.eval_tasks or (cfg.task,))}
    for name, rows in [(cfg.task, train), *held_out.items()]:
        if not rows:
            raise TaskError(f"task {name!r} has no examples")
    from policy import check_model_source
    from transformers import AutoConfig, AutoTokenizer
    check_model_source(cfg.model)
    try:
        tok, model_cfg = AutoTokenizer.from_pretrained(cfg.model), AutoConfig.from_pretrained(cfg.model)
    except OSError as e:                                     # hub id not cached offline, no access, no such repo
        raise OSError(f"cannot load model {cfg.model!r}: {str(e).strip().splitlines()[0]}") from None
    context = getattr(model_cfg.get_text_config(), "max_position_embeddings", None)
    questions = [ex["question"] for rows in (train, *held_out.values()) for ex in rows]
    longest = max(len(ids) for ids in tok([build_prompt(tok, q) for q in questions])["input_ids"])
    if context and longest + cfg.max_new_tokens > context:
        raise ValueError(f"longest prompt ({longest} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds the "
                         f"model's context of {context} tokens")
    return train, held_out


# ---------------------------------------------------------------------------------------------------------
# Helpers: no-grad passes, evaluation, checkpoints, the run folder
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, tok, cfg, held_out, step):
    """Held-out accuracy (greedy and/or sampled at --temperature) on each eval task -> list of JSONL records."""
    from policy import rollout
    model.eval()
    records = []
    for name, rows in held_out.items():
        rec = {"type": "eval", "step": step, "task": name, "n": len(rows)}
        prompts = [build_prompt(tok, ex["question"]) for ex in rows]
        for mode in cfg.eval_modes:
            ro = rollout(model, tok, prompts, 1, cfg.max_new_tokens, 0.0 if mode == "greedy" else cfg.temperature,
                         seed=cfg.seed * 100003 + 10**9 + step, batch_size=cfg.rollout_batch_size)
            rec[f"{mode}_acc"] = sum(reward(name, t, ex) > 0.5 for t, ex in zip(ro["texts"], rows)) / len(rows)
            rec[f"{mode}_len"] = ro["completion_mask"].sum(1).mean().item()
        records.append(rec)
    return records


def start_run(cfg, argv):
    """Model, tokenizer, optimizer, the metrics log and the first step (0, or the resumed checkpoint's).
    Everything that can fail on bad input (the checkpoint, the model files, the run folder) is tried before the
    run folder is written, so a failed start loses nothing."""
    from policy import load_policy
    if cfg.threads and (cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        torch.set_num_threads(cfg.threads)
    state = read_state(cfg.resume) if cfg.resume else None
    torch.manual_seed(cfg.seed)                              # LoRA initialisation
    try:
        model, tok = load_policy(cfg.model, load_in_4bit=cfg.load_in_4bit, lora_r=cfg.lora_r,
                                 lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 gradient_checkpointing=cfg.gradient_checkpointing, device=cfg.device,
                                 adapter=checkpoint_dir(cfg.resume) if cfg.resume else None, dtype=cfg.dtype)
    except (OSError, RuntimeError, SafetensorError) as e:  # no weights, a truncated file, an unknown architecture
        raise ValueError(f"cannot load model {cfg.model!r}: {str(e).strip().splitlines()[0][:200]}") from None
    out = cfg.resume or cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.task}-{cfg.kl}")
    os.makedirs(out, exist_ok=True)
    json.dump(asdict(cfg), open(os.path.join(out, "config.json"), "w"), indent=2)
    if state:                                                # every resume is on record, with the flags it had
        with open(os.path.join(out, "resumes.jsonl"), "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "from_step": state["step"],
                                "argv": list(sys.argv[1:] if argv is None else argv)}) + "\n")
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    else:
        import bitsandbytes as bnb
        optimizer = bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    snapshots = deque(maxlen=cfg.async_level + 1)           # adapters at the start of the last N+1 steps
    metrics_path = os.path.join(out, "metrics.jsonl")
    start = restore(state, optimizer, snapshots, metrics_path) if state else 0
    log = open(metrics_path, "a" if state else "w")         # a fresh run never appends to an old file
    return out, model, tok, params, optimizer, snapshots, log, start


# ---------------------------------------------------------------------------------------------------------
# Training: the recipe of the module docstring
# ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    cfg = parse_config(argv)
    try:
        kl = check_config(cfg)
        if argv is None and not cfg.load_in_4bit and cfg.optim == "adamw":   # the command line, not a caller's process
            sys.modules.setdefault("bitsandbytes", None)    # peft imports it if installed: ~1.2 s, here never used
        if cfg.export:                                       # a command for another engine, no training
            from export import export
            print(export(cfg, cfg.export).rstrip("\n"))
            return 0
        train_set, held_out = load_data(cfg)
        if cfg.preset:
            print(f"train.py: preset {cfg.preset} (model {cfg.model}); explicit flags override it", file=sys.stderr)
        out, model, tok, params, optimizer, snapshots, log, start = start_run(cfg, argv)
    except (ValueError, OSError) as e:                      # TaskError and ExportError are ValueErrors
        die(str(e).strip().splitlines()[0])
    from policy import (adapter_snapshot, clock, device_memory, kl_stats_from_hidden, logprobs_in_chunks as
                        logprobs_nograd, nograd_bytes_per_token, nograd_chunk_rows, peak_memory_gb, reset_peak_memory, rollout,
                        rollout_copy, swapped_adapter, sync_rollout_copy, token_logprobs)
    G, N = cfg.group_size, cfg.prompts_per_step * cfg.group_size
    mb = max(1, cfg.micro_batch_size // G) * G              # whole groups: a group's baseline needs all its members
    rows = [slice(i, i + mb) for i in range(0, N, mb)]
    # no-grad passes keep no activations: as many rows per pass as the memory budget holds (README: Memory levers)
    device = model.get_input_embeddings().weight.device
    budget = cfg.memory_budget_gb * 2**30 if cfg.memory_budget_gb else device_memory(device, "total")
    per_token = nograd_bytes_per_token(model.config, 4 if model.config.dtype == torch.float32 else 2)
    # sg(log π_θ) (an in-reward KL) and the policy half of the exact KL diagnostics come from the grad pass itself,
    # unless dropout would perturb it
    nograd_policy_pass = cfg.lora_dropout > 0
    shared = G if cfg.share_prompt else 1                    # rows per prompt pass (policy._completion_hidden)
    sampler = rollout_copy(model) if cfg.rollout_bf16_copy else None    # CUDA only (check_config)

    def write(rec):
        log.write(json.dumps(rec) + "\n")
        log.flush()

    pbar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=None)
    for step in pbar:
        if step % (cfg.eval_every or cfg.steps + 1) == 0:
            for rec in evaluate(model, tok, cfg, held_out, step):
                write(rec)
        # 1. sample: P prompts × G completions from the behaviour policy μ -------------------------------------
        t0 = clock()
        rng = random.Random(cfg.seed * 100003 + step)       # per-step seeds: a resumed run replays exactly
        batch = rng.sample(train_set, cfg.prompts_per_step) if cfg.prompts_per_step <= len(train_set) else \
            rng.choices(train_set, k=cfg.prompts_per_step)
        prompts = [build_prompt(tok, ex["question"]) for ex in batch]
        model.eval()                                         # generate and no-grad passes: no dropout, KV cache on
        if cfg.async_level:
            snapshots.append(adapter_snapshot(model))
        behaviour = swapped_adapter(model, snapshots[0], live=snapshots[-1]) if cfg.async_level else nullcontext()
        reset_peak_memory()                                  # peak_mem_gb: this step's peak
        with behaviour:
            ro = rollout(sync_rollout_copy(sampler, model) if sampler else model, tok, prompts, G, cfg.max_new_tokens,
                         cfg.temperature, seed=cfg.seed * 100003 + step, batch_size=cfg.rollout_batch_size,
                         compile=cfg.compile_decode)
            t1 = clock()
            nb = nograd_chunk_rows(N, G, ro["input_ids"].shape[1], per_token, budget - device_memory(device, "used"))
            nograd_rows = [slice(i, i + nb) for i in range(0, N, nb)]
            behav_logp = logprobs_nograd(model, ro, nograd_rows, cfg.temperature, 0, shared)[0] if cfg.async_level \
                else None
        ids, attn, P, mask = ro["input_ids"], ro["attention_mask"], ro["prompt_len"], ro["completion_mask"]
        # 2. score: task rewards, log π_ref (and the reference's hidden states for the exact KL diagnostics) ------
        rewards = torch.tensor([reward(cfg.task, text, ex) for text, ex in
                                zip(ro["texts"], (ex for ex in batch for _ in range(G)))], device=mask.device)  # (N,)
        # exact KLs need full logits: the first few rows suffice, every --diag-every steps
        D = min(N, cfg.micro_batch_size, 64) if cfg.diag_every and step % cfg.diag_every == 0 else 0
        with model.disable_adapter():
            ref_logp, ref_h = logprobs_nograd(model, ro, nograd_rows, cfg.temperature, D, shared)   # (N, C) π_ref
        sg_logp, sg_h = logprobs_nograd(model, ro, nograd_rows, cfg.temperature, D, shared) if nograd_policy_pass \
            else (None, None)
        t2 = clock()
        # 3. loss: advantages and policy_loss per micro-batch of whole groups; gradients add up ----------------
        model.train()
        optimizer.zero_grad(set_to_none=True)
        logps, hs = [], []
        for sl in rows:                                      # (n, C) with grad, and hidden states for the exact KLs
            logp, h = token_logprobs(model, ids[sl], attn[sl], P, cfg.temperature, keep_hidden=max(0, D - sl.start),
                                     group_size=shared)
            advantages, _ = shaped_advantages(rewards[sl], logp.detach() if sg_logp is None else sg_logp[sl],
                                              ref_logp[sl], mask[sl], G, cfg.beta, kl, cfg.adv)   # (n, C)
            loss, m = policy_loss(logp, ref_logp[sl], mask[sl], advantages, cfg.beta, kl,
                                  None if behav_logp is None else behav_logp[sl], cfg.ratio_clip, n_seqs=N,
                                  token_budget=cfg.token_budget)
            if not math.isfinite(loss.item()):
                bad = " and ".join(t[:-5] for t in ("pg_term", "kl_term") if not math.isfinite(m[t])) or "total"
                print(f"train.py: error: non-finite loss at step {step} ({bad} term: pg_term={m['pg_term']}, "
                      f"kl_term={m['kl_term']}); {last_checkpoint(out)}", file=sys.stderr)
                return 1
            loss.backward()
            logps.append(logp.detach())
            hs.append(h)
        t3 = clock()
        # exact KLs from the states those passes computed (the policy's from the no-grad pass when dropout is on)
        exact = kl_stats_from_hidden(model, sg_h if nograd_policy_pass else torch.cat(hs), ref_h, cfg.temperature) \
            if D else {}
        # 4. step ------------------------------------------------------------------------------------------------
        t4 = clock()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")).item()
        if not math.isfinite(grad_norm):
            print(f"train.py: error: non-finite gradient norm at step {step}; {last_checkpoint(out)}", file=sys.stderr)
            return 1
        optimizer.step()
        t5 = clock()

        logp = torch.cat(logps)                              # (N, C) the whole batch's metrics, no grad
        rec = {"type": "train", "step": step, **batch_metrics(cfg, kl, rewards, logp, sg_logp, ref_logp, mask,
                                                              behav_logp), **exact, "grad_norm": grad_norm,
               "truncated_frac": ro["truncated"].float().mean().item(),
               "time_generate": t1 - t0, "time_no_grad": t2 - t1 + t4 - t3, "time_policy": t3 - t2,
               "time_optimizer": t5 - t4, "time_step": t5 - t0, "tokens_per_s": attn.sum().item() / (t5 - t0),
               "peak_mem_gb": peak_memory_gb()}
        write(rec)
        pbar.set_postfix(reward=f"{rec['reward']:.3f}", kl=f"{rec['kl_k1']:.4f}", len=f"{rec['completion_len']:.1f}")
        if pbar.disable and (step + 1) % max(1, cfg.steps // 20) == 0:   # a log file or a scheduler: no bar
            print(f"train.py: step {step + 1}/{cfg.steps}  reward {rec['reward']:.3f}  kl_k1 {rec['kl_k1']:.4f}  "
                  f"{rec['time_step']:.2f} s/step", file=sys.stderr, flush=True)
        if step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            save_checkpoint(out, model, optimizer, step + 1, snapshots)
    pbar.close()
    for rec in evaluate(model, tok, cfg, held_out, cfg.steps):
        write(rec)
    log.close()
    report(out)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
