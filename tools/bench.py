"""bench.py -- seconds per RL step and peak memory of our trainer next to TRL's GRPOTrainer (issue 12).

Same model, LoRA, prompts, G, completion length L, β, 4-bit setting, dtype and device on both sides. Every completion
has exactly L tokens (min_new_tokens = L masks every stop token), so both generate the same number of tokens. Our side
is train.main with the loss matched to TRL's (k3-in-loss, --adv grpo = scale_rewards="group", --token-budget L =
loss_type="dr_grpo", use_bias_correction_kl=False); its split comes from metrics.jsonl. TRL's split comes from its own
profiling contexts (transformers.generate, _prepare_inputs) plus Trainer callbacks around the optimizer step.

Each arm runs in its own process (peak memory is its own: RSS on a CPU, the caching allocator's peak reserve on CUDA),
arms interleaved over --repeats rounds so the machine's load hits all alike; the first --warmup steps of each process
are dropped.

    python tools/bench.py                                            # tiny model, CPU: ours, the levers, TRL if installed
    python tools/bench.py --length 64 --repeats 5 --json out.json
    python tools/bench.py --model configs/qwen2.5-7b.json --load-in-4bit --prompts 1 --length 256   # a GPU: 7B-shaped QLoRA
    python tools/bench.py --tree /tmp/old                            # also an older checkout (git worktree): before/after
    python tools/bench.py --model smollm2-135m --task arith_q --levers share-prompt   # the real model at its preset's shape

A configs/*.json model gets random weights (saved once under --cache, bf16) and the shipped tiny tokenizer: prompts
are its ids (< 300), valid ids of the big vocabulary; sampled ids it cannot decode decode to nothing (reward 0).
On CUDA the table also gives the decode floor: bytes read per decode step (the generating model's weights, minus an
untied input embedding, plus the mean KV cache) / the measured device-to-device copy bandwidth.
"""
import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repo root: `python tools/bench.py` runs from here,
if ROOT not in sys.path:                                             # and the core modules (train, run_folder, ...) sit one
    sys.path.insert(0, ROOT)                                         # folder up

TINY = os.path.join(ROOT, "assets", "tiny-arith")
CORE = ("train", "guards", "run_folder", "policy", "tasks", "graders", "estimators", "kl_rl", "tools")  # a --tree: its own
# lever arms: flags added to our matched run; "cuda" ones need a GPU (--rollout-bf16-copy refuses elsewhere)
LEVERS = {"diag-every-0": ["--diag-every", "0"], "diag-every-10": ["--diag-every", "10"],
          "share-prompt": ["--share-prompt"], "share-prompt+diag-every-10": ["--share-prompt", "--diag-every", "10"],
          "bf16": ["--dtype", "bf16"], "compile": ["--compile-decode"], "bf16-copy": ["--rollout-bf16-copy"],
          "bf16-copy+compile": ["--rollout-bf16-copy", "--compile-decode"],
          "all": ["--share-prompt", "--diag-every", "10", "--rollout-bf16-copy", "--compile-decode"]}
DEFAULT_LEVERS = {"cpu": "diag-every-0,diag-every-10,share-prompt,share-prompt+diag-every-10",
                  "cuda": "diag-every-0,diag-every-10,share-prompt,compile,bf16-copy,bf16-copy+compile,all"}
PARTS = ("generate", "no_grad", "policy", "optimizer")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=TINY, help="model folder, a short name (smollm2-135m: real_model.py), or a "
                    "configs/*.json for random weights")
    ap.add_argument("--task", default="arith", help="prompts and reward (arith_q: the smollm2-cpu preset's)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    ap.add_argument("--length", type=int, default=8, help="L: tokens per completion (exactly)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per process (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of each process")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of all arms, interleaved")
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--load-in-4bit", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (both sides)")
    ap.add_argument("--levers", default=None, help=f"comma list of {', '.join(LEVERS)} or none "
                    f"(default: {DEFAULT_LEVERS['cpu']} on a CPU; {DEFAULT_LEVERS['cuda']} on CUDA)")
    ap.add_argument("--tree", action="append", default=[], help="also run our side from this checkout")
    ap.add_argument("--ours-flags", default="", help="train.py flags added to every arm of ours, e.g. \"--kl k1-in-reward "
                    "--adv rloo --micro-batch-size 8\" (then TRL no longer runs the same loss: use --no-trl)")
    ap.add_argument("--no-trl", action="store_true", help="our side only")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/kl-rl-bench"), help="random-weight models")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)     # internal: one arm, one process
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# Shared by both sides: the model folder, the prompts of each step, fixed-length generation
# ---------------------------------------------------------------------------------------------------------
def model_folder(model, cache, device):
    """A folder as is, a short name as its converted folder (real_model.py); configs/NAME.json -> cache/NAME with
    random bf16 weights and the tiny tokenizer (built once)."""
    if not model.endswith(".json"):
        from tools.real_model import resolve
        return resolve(model)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    out = os.path.join(cache, os.path.basename(model)[:-5])
    if not os.path.isfile(os.path.join(out, "model.safetensors.index.json")) and \
            not os.path.isfile(os.path.join(out, "model.safetensors")):
        torch.manual_seed(0)
        with torch.device(device):
            net = AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.load(open(model))), dtype=torch.bfloat16)
        net.save_pretrained(out)
        AutoTokenizer.from_pretrained(TINY).save_pretrained(out)
    return out


def step_examples(steps, prompts, task="arith", seed=0):
    """The examples train.py draws at each step (its per-step RNG), so TRL gets the very same prompts."""
    from tasks import load_task
    train = load_task(task, "train", seed=seed)
    return [random.Random(seed * 100003 + s).sample(train, prompts) for s in range(steps)]


def force_length():
    """Every generate call that sets max_new_tokens also gets min_new_tokens = max_new_tokens (stop tokens masked)."""
    from transformers.generation.utils import GenerationMixin
    generate = GenerationMixin.generate

    def fixed(self, *args, **kwargs):
        if kwargs.get("max_new_tokens"):
            kwargs.update(min_new_tokens=kwargs["max_new_tokens"], min_length=None)   # one lower bound, no warning
        return generate(self, *args, **kwargs)
    GenerationMixin.generate = fixed


def decode_bytes(model, n_seqs, mean_context):
    """Bytes one decode step reads: every weight (4-bit ones packed) except an untied input embedding, plus the KV
    cache at the mean context length. A lower bound: quantisation constants and activations are left out."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    skip = {id(emb.weight)} if head is None or head.weight is not emb.weight else set()
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in skip)
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = n_seqs * mean_context * c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 2   # bf16 K and V
    return weights + kv


def bandwidth(device):
    """Device memory bandwidth in bytes/s from a 1 GiB device-to-device copy (reads + writes), best of 5."""
    import torch
    a = torch.empty(2**28, dtype=torch.float32, device=device)
    b, best = torch.empty_like(a), float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best


# ---------------------------------------------------------------------------------------------------------
# Workers: one arm in this process -> {"steps": [{generate, no_grad, policy, optimizer, step}, ...], peak, ...}
# ---------------------------------------------------------------------------------------------------------
def ours(spec, tmp):
    """train.main (from spec["tree"]) on the matched configuration; the split is what it logs in metrics.jsonl."""
    sys.path.insert(0, spec["tree"])
    for name in [n for n in sys.modules if n.split(".")[0] in CORE]:   # none of this checkout's code: the tree's own
        del sys.modules[name]
    import train
    force_length()
    seen = {}
    if os.path.isfile(os.path.join(spec["tree"], "policy.py")):   # older checkouts kept rollout elsewhere
        import policy
        rollout = policy.rollout

        def capture(model, *args, **kwargs):              # the model that generates: the policy or its bf16 copy
            seen.setdefault("model", model)
            return rollout(model, *args, **kwargs)
        policy.rollout = capture
    train.report = lambda out: None                        # no summary table or plot (checkouts before tools/)
    if os.path.isfile(os.path.join(spec["tree"], "tools", "report.py")):
        import tools.report
        tools.report.report = lambda out: None
    out = os.path.join(tmp, "run")
    L, G, P = spec["length"], spec["group_size"], spec["prompts"]
    flags = dict(model=spec["model"], out=out, steps=spec["warmup"] + spec["steps"], prompts_per_step=P, group_size=G,
                 max_new_tokens=L, micro_batch_size=P * G, kl="k3-in-loss", adv="grpo", token_budget=L,
                 beta=spec["beta"], lr=spec["lr"], lora_r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], eval_every=0,
                 eval_n=1, threads=spec["threads"], device=spec["device"], task=spec["task"])
    if spec["dtype"] != "auto":                            # older checkouts have no --dtype
        flags["dtype"] = spec["dtype"]
    argv = [x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))] + spec["flags"]
    argv += ["--load-in-4bit"] * spec["load_in_4bit"] + ["--gradient-checkpointing"] * spec["gradient_checkpointing"]
    if train.main(argv) != 0:
        raise SystemExit("bench.py: our run failed")
    recs = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["type"] == "train"]
    steps = [{"generate": r["time_generate"], "no_grad": r["time_no_grad"], "policy": r["time_policy"],
              "optimizer": r.get("time_optimizer"), "step": r["time_step"], "length": r["completion_len"]}
             for r in recs]
    result = {"steps": steps, "peak_mem_gb": max(r["peak_mem_gb"] for r in recs)}   # CUDA: reset every step
    if spec["device"] == "cuda":
        result["decode_bytes"] = decode_bytes(seen["model"], P * G, 16 + L / 2)   # arith prompts: ~14-16 tokens
    return result


def trl(spec, tmp):
    """TRL's GRPOTrainer on the same model, LoRA, prompts, G, L, β, dtype and device."""
    import torch
    import trl.extras.profiling as profiling
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import policy
    from tasks import build_prompt, reward
    torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timings = []                                           # (name, seconds) from TRL's profiling contexts, in order

    def enter(self):
        sync()
        self._start_time = time.perf_counter()
        return self

    def leave(self, *exc):
        sync()
        timings.append((self.name.split(".", 1)[1], time.perf_counter() - self._start_time))
        return False
    profiling.ProfilingContext.__enter__, profiling.ProfilingContext.__exit__ = enter, leave
    steps, marks = [], {}

    class Clock(TrainerCallback):                          # step and optimizer boundaries (Trainer callbacks)
        def on_step_begin(self, *a, **k):
            sync()
            timings.clear()
            marks["begin"] = time.perf_counter()

        def on_pre_optimizer_step(self, *a, **k):
            sync()
            marks["pre"] = time.perf_counter()

        def on_optimizer_step(self, *a, **k):
            sync()
            marks["opt"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            step = time.perf_counter() - marks["begin"]
            gen = sum(t for n, t in timings if n == "transformers.generate")
            prep = sum(t for n, t in timings if n == "_prepare_inputs")
            steps.append({"generate": gen, "no_grad": prep - gen, "policy": step - prep - (marks["opt"] - marks["pre"]),
                          "optimizer": marks["opt"] - marks["pre"], "step": step})

    L, G, P, K = spec["length"], spec["group_size"], spec["prompts"], spec["warmup"] + spec["steps"]
    tok = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    rows = [dict(ex, prompt=build_prompt(tok, ex["question"])) for batch in step_examples(K, P, spec["task"])
            for ex in batch]
    dtype = policy.DTYPES.get(spec["dtype"], torch.bfloat16 if cuda else torch.float32)
    init = {"dtype": dtype, "device_map": {"": spec["device"]}}
    if spec["load_in_4bit"]:
        init["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    args = GRPOConfig(output_dir=os.path.join(tmp, "trl"), per_device_train_batch_size=P * G, num_generations=G,
                      gradient_accumulation_steps=1, max_completion_length=L, generation_kwargs={"min_new_tokens": L},
                      temperature=1.0, top_p=1.0, top_k=0, beta=spec["beta"], loss_type="dr_grpo",
                      scale_rewards="group", use_bias_correction_kl=False, learning_rate=spec["lr"],
                      lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.99, weight_decay=0.0,
                      max_grad_norm=1.0, max_steps=K, logging_steps=1, report_to=[], save_strategy="no", seed=0,
                      shuffle_dataset=False, bf16=dtype == torch.bfloat16, use_cpu=not cuda, disable_tqdm=True,
                      gradient_checkpointing=spec["gradient_checkpointing"], model_init_kwargs=init)
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    score = lambda completions, answer, **kw: [reward(spec["task"], c, {"answer": a}) for c, a in
                                               zip(completions, answer)]
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=score, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    for s, n in zip(steps, lengths):
        s["length"] = n
    result = {"steps": steps, "peak_mem_gb": policy.peak_memory_gb()}
    if cuda:
        result["decode_bytes"] = decode_bytes(trainer.model, P * G, 16 + L / 2)
    return result


# ---------------------------------------------------------------------------------------------------------
# The parent: arms, interleaved rounds, the table
# ---------------------------------------------------------------------------------------------------------
def commit(tree):
    """A checkout's short commit hash (its folder name if it is no git checkout)."""
    p = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() or os.path.basename(os.path.normpath(tree))


def run_arm(spec):
    """One arm in a fresh process -> its result dict (raises with the worker's last lines if it failed)."""
    import run_folder
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM":
           "false"}
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], capture_output=True,
                       text=True, env=env, cwd=ROOT,
                       preexec_fn=run_folder.die_with_parent)
    lines = [line for line in p.stdout.splitlines() if line.startswith("BENCH ")]
    if p.returncode or not lines:
        raise SystemExit(f"bench.py: arm {spec['arm']} failed:\n" + "\n".join((p.stdout + p.stderr).splitlines()[-15:]))
    return json.loads(lines[-1][6:])


def summarise(results, spec, device, bw):
    """Pooled post-warm-up steps of every round -> min/median/max seconds, median split, tokens/s, memory."""
    steps = [s for r in results for s in r["steps"][spec["warmup"]:]]
    med = lambda key: statistics.median(s[key] for s in steps) if all(s.get(key) is not None for s in steps) else None
    total = [s["step"] for s in steps]
    n_tokens = spec["prompts"] * spec["group_size"] * spec["length"]
    out = {"n_steps": len(steps), "step_min": min(total), "step_median": statistics.median(total),
           "step_max": max(total), **{p: med(p) for p in PARTS}, "gen_tokens_per_s": n_tokens / med("generate"),
           "peak_mem_gb": max(r["peak_mem_gb"] for r in results), "completion_len": med("length")}
    if device == "cuda" and bw:
        floor = results[0]["decode_bytes"] / bw
        out.update(decode_floor_ms=1e3 * floor, decode_step_ms=1e3 * med("generate") / spec["length"])
        out["decode_over_floor"] = out["decode_step_ms"] / out["decode_floor_ms"]
    return out


def table(summary, device):
    trl_median = summary.get("trl", {}).get("step_median")
    cols = ["arm", "s/step min", "median", "max", "generate", "no-grad", "fwd+bwd", "optimizer", "gen tok/s", "peak GB",
            "TRL / arm"] + (["decode ms", "floor ms", "× floor"] if device == "cuda" else [])
    f = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for arm, s in summary.items():
        row = [arm, f(s["step_min"]), f(s["step_median"]), f(s["step_max"]), *(f(s[p]) for p in PARTS),
               f(s["gen_tokens_per_s"], 0), f(s["peak_mem_gb"], 2), f(trl_median and trl_median / s["step_median"], 2)]
        row += [f(s.get("decode_step_ms"), 2), f(s.get("decode_floor_ms"), 2), f(s.get("decode_over_floor"), 1)] \
            if device == "cuda" else []
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    if args.worker:                                         # a child: run one arm, print its result
        spec = json.loads(args.worker)
        with tempfile.TemporaryDirectory() as tmp:
            result = (trl if spec["arm"] == "trl" else ours)(spec, tmp)
        print("BENCH " + json.dumps(result), flush=True)
        return 0
    import importlib.util
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    levers = [x for x in (args.levers or DEFAULT_LEVERS[device]).split(",") if x and x != "none"]
    if bad := [x for x in levers if x not in LEVERS]:
        raise SystemExit(f"bench.py: unknown lever {bad[0]}; choose from {', '.join(LEVERS)}")
    if device != "cuda" and (bad := [x for x in levers if "--rollout-bf16-copy" in LEVERS[x]]):
        raise SystemExit(f"bench.py: lever {bad[0]} needs a CUDA device")
    base = dict(model=os.path.abspath(model_folder(args.model, args.cache, device)), task=args.task,
                prompts=args.prompts, group_size=args.group_size, length=args.length, steps=args.steps,
                warmup=args.warmup, beta=args.beta, lr=args.lr, lora_r=args.lora_r, load_in_4bit=args.load_in_4bit,
                dtype=args.dtype, device=device, gradient_checkpointing=args.gradient_checkpointing,
                threads=args.threads, tree=ROOT, flags=shlex.split(args.ours_flags))
    arms = [dict(base, arm="ours")] + [dict(base, arm=f"ours {x}", flags=base["flags"] + LEVERS[x]) for x in levers]
    arms += [dict(base, arm=f"ours @{commit(t)}", tree=os.path.abspath(t)) for t in args.tree]
    has_trl = importlib.util.find_spec("trl") is not None
    if has_trl and not args.no_trl:
        arms.append(dict(base, arm="trl"))
    results, loads = {a["arm"]: [] for a in arms}, []
    for r in range(args.repeats):                           # interleaved: each round runs every arm once
        for spec in arms[r % len(arms):] + arms[:r % len(arms)]:
            loads.append(os.getloadavg()[0])
            print(f"bench.py: round {r + 1}/{args.repeats}: {spec['arm']}", file=sys.stderr, flush=True)
            results[spec["arm"]].append(run_arm(spec))
    bw = bandwidth(device) if device == "cuda" else None
    summary = {arm: summarise(res, base, device, bw) for arm, res in results.items()}
    title = (f"{os.path.basename(args.model)}, {args.task}, {args.prompts} prompts × G = {args.group_size} × L = "
             f"{args.length}, "
             f"{'4-bit' if args.load_in_4bit else args.dtype}, {device}"
             + (f" ({torch.cuda.get_device_name()}, {bw / 1e9:.0f} GB/s copy)" if bw else f", {args.threads} thread(s)")
             + f"; {args.repeats} rounds × {args.steps} steps; load average {statistics.median(loads):.1f} "
             f"(median over runs); {time.strftime('%Y-%m-%d')}")
    print(f"{title}\n\n{table(summary, device)}")
    if not has_trl and not args.no_trl:
        print("\n(trl is not installed: pip install -r requirements-bench.txt for the TRL column)")
    if args.json:
        import transformers
        meta = {"title": title, "argv": sys.argv[1:] if argv is None else argv, "device": device, "load_avg": loads,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
        if has_trl:
            meta["versions"]["trl"] = __import__("trl").__version__
        json.dump({**meta, "summary": summary, "raw": results}, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
