"""gpu_check.py -- the memory model of a train.py step, and one command for every GPU table (issue 16).

Memory model (--memory): each phase of a train.py step runs on a random model with a config's true width (hidden,
intermediate, vocabulary, heads; configs/*.json), 4-bit NF4 with bf16 compute, LoRA r = 16 on every linear,
gradient checkpointing, in a fresh process per model and depth: tools/gpu_probe.py, the measuring worker (how a
peak is read: CUDA max_memory_reserved, a CPU's peak RSS; totals above the process before the model was loaded).
This file picks what to measure and turns the readings into the table. Phases, rows per call as train.main runs
them, P = 200 prompt tokens:
  static       4-bit weights, fp32 LM head (policy.fp32_head_only), LoRA, its gradients and AdamW states
  generate     rollout of rollout-batch rows, exactly C new tokens (stop tokens masked)
  no-grad      the reference pass over the rows policy.nograd_passes picks for the budget: log-probs, hidden states
  grad         the policy pass with grad and its backward over one micro-batch
  diagnostics  the exact KLs over the LM head (D rows × C tokens)
Each phase is read in parts (decoder vs LM head, forward vs backward, prefill vs decoding) and the table takes the
largest part. On CUDA every shape runs at its true rows, lengths and depth: measured. On a CPU (slow: a 7B-wide
4-bit layer takes ~0.1 s per token) the parts run at 1 layer (1 row) and 2 layers (1 and 2 rows) on short sequences
and are extrapolated: memory is affine in depth (each layer adds weights, KV cache and checkpointed inputs) and in
rows, a row's share scales with the tokens the part reads (the KV cache by its exact size per token), and the
vocabulary-sized chunks (0.5 GiB at most, policy.vocab_chunks) are full in every probe, so they are measured
as is. `--small` checks the extrapolation against a direct measurement of a small config at full depth and shape
(within 5% here), then runs the whole check's code path at CPU size (the tests run it: it cannot rot).

    python tools/gpu_check.py --memory                    # the README's table: three configs × four shapes (CPU: ~1.5 h)
    python tools/gpu_check.py --small                     # CPU-sized: extrapolated vs measured, bench.py, the report
    python tools/gpu_check.py                             # on a GPU: the table at true depth, a few 7B-shaped QLoRA steps
                                                    # with TRL beside them, the decode floor and the CUDA levers
                                                    # into gpu-check.md (target <= 8 min on an H100; never run yet)
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repo root: `python tools/gpu_check.py` runs from here,
if ROOT not in sys.path:                                             # and the core modules (train, run_folder, ...) sit one
    sys.path.insert(0, ROOT)                                         # folder up

from tools import bench
from tools import gpu_probe
from tools.gpu_probe import PHASES, random_model, run_worker   # names of this module: the tests patch them here
import run_folder

PAPER_MODELS = ("qwen2.5-7b", "llama-3.1-8b", "qwen3-4b")
PROMPT = 200                                    # prompt tokens: a MATH problem under a chat template
PROBE = dict(prompt=32, new=192, decode=8)      # CPU probes: 224 tokens a row (>= 174 completion rows fill a chunk)
GiB = 2**30
# --small: a config measured at full depth and size on a CPU in seconds (fp32, not 4-bit: a CPU's bf16 matmuls and bnb's
# per-call overhead are slow), next to its extrapolation from 1 and 2 layers; a 16 MiB vocabulary-chunk budget fills
# its chunks (64 rows) in the probes as 0.5 GiB fills a 152k vocabulary's
SMALL = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, intermediate_size=8192,
             num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=4, vocab_size=16384,
             max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-6)
SMALL_CHUNK_BYTES = 2**24
SMALL_SHAPE = dict(n=8, g=4, rollout=4, micro=4, diag=4, new=32, prompt=48)
SMALL_PROBE = dict(prompt=16, new=64, decode=8)
# bench.py arms of the check: on a GPU 2 timed steps of ours (and its CUDA levers, TRL if installed); --small: 1 step
GPU_BENCH = ["--load-in-4bit", "--gradient-checkpointing", "--prompts", "1", "--length", "256", "--repeats", "1",
             "--steps", "2", "--warmup", "1", "--levers", "compile,bf16-copy"]
TINY_BENCH = ["--prompts", "1", "--length", "4", "--repeats", "1", "--steps", "1", "--warmup", "0", "--levers", "none",
              "--no-trl"]


def shapes():
    """name -> per-call rows and lengths of a train.main step: n sequences, G, rollout rows, micro-batch rows,
    diagnostics rows D, new tokens C (no-grad rows come from the memory budget: memory_table)."""
    import train
    out = {"8 × 256": dict(n=8, g=8, rollout=8, micro=8, diag=8, new=256),
           "64 × 512": dict(n=64, g=8, rollout=64, micro=8, diag=8, new=512)}
    for name in ("paper-onpolicy", "paper-async"):
        p = train.PRESETS[name]
        g, n = p["group_size"], p["prompts_per_step"] * p["group_size"]
        out[name] = dict(n=n, g=g, rollout=p["rollout_batch_size"], micro=max(1, p["micro_batch_size"] // g) * g,
                         diag=min(n, p["micro_batch_size"], 64), new=p["max_new_tokens"])
    return out


def kv_bytes_per_token(cfg, bytes_per_value=2):
    """K and V of one token, every layer (the cache follows the compute dtype: policy.fp32_head_only)."""
    c = cfg.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_key_value_heads * head_dim * c.num_hidden_layers * bytes_per_value


# ---------------------------------------------------------------------------------------------------------
# The table: probes -> every shape's phases at true depth
# ---------------------------------------------------------------------------------------------------------
def cpu_probes(layers, probe=PROBE, prompt=PROMPT):
    """Each phase at 1 row at 1 layer and at 1 and 2 rows at 2 layers, short (see the module docstring); generate at
    the true prompt. A row's share is taken at 2 layers (at 1, the first layer is also the last and its peak is
    atypical); a second row at 1 layer would cost minutes of a 7B-wide layer for nothing."""
    out = []
    for rows in (1,) if layers == 1 else (1, 2):
        out += [dict(phase="generate", rows=rows, prompt=prompt, new=probe["decode"]),
                dict(phase="no-grad", rows=rows, prompt=probe["prompt"], new=probe["new"]),
                dict(phase="grad", rows=rows, prompt=probe["prompt"], new=probe["new"]),
                dict(phase="diagnostics", rows=rows, prompt=0, new=probe["new"])]
    return out


def extrapolate(runs, cfg, depth, phase, rows, new, value_bytes=2, probe=PROBE, prompt=PROMPT):
    """A phase's peak at `rows` × (prompt + new) and true `depth` from CPU probes (cpu_probes: 1 row at 1 layer, 1
    and 2 rows at 2). Per part: a per-row share s and the rest, both affine in depth. A layer adds to s only what it
    keeps for the row (the KV cache while generating, its checkpointed input in the grad pass; all else is freed
    before the next layer runs), so s is the 2-layer share less one layer's known growth, plus depth times it (a
    measured per-layer change of s would be mostly noise, and depth 28 multiplies it by 27). s then scales with the
    tokens the part reads (decoding: + its KV)."""
    def at(layers, r):
        return next(p["parts"] for p in runs[layers]["probes"] if p["phase"] == phase and p["rows"] == r)
    c = cfg.get_text_config()
    kv_layer = kv_bytes_per_token(cfg, value_bytes) // c.num_hidden_layers       # one token, one layer
    best = 0
    for part in at(1, 1):
        if phase == "generate":                              # the cache at the probe's end: prompt (+ decoded) tokens
            grow = kv_layer * (prompt + (probe["decode"] if part == "decode" else 0))
        else:                                                # the grad pass keeps each layer's input (rows, T, H)
            grow = (probe["prompt"] + probe["new"]) * c.hidden_size * value_bytes if phase == "grad" else 0
        share1 = at(2, 2)[part] - at(2, 1)[part] - grow                  # a row's share, one layer's growth off
        rest = {L: at(L, 1)[part] - (share1 + grow * (L - 1)) for L in (1, 2)}
        fixed = rest[1] + (depth - 1) * (rest[2] - rest[1])
        per_row = share1 + grow * (depth - 1)
        if phase == "generate":
            per_row += kv_layer * depth * (new - probe["decode"]) if part == "decode" else 0
        elif phase == "diagnostics":
            per_row *= new / probe["new"]
        else:
            per_row *= (prompt + new) / (probe["prompt"] + probe["new"])
        best = max(best, fixed + rows * per_row)
    return best


def measured(config, layers, probes, args):
    """run_worker for one config and depth, cached (re-measuring a 7B-wide layer takes minutes), and lifted to at
    least its tensors' bytes (at_least_tensor_bytes): every caller gets a run it can trust."""
    key = json.dumps([os.path.basename(config), layers, probes, args.device, args.threads], sort_keys=True)
    path = os.path.join(args.cache, "memory-" + hashlib.sha1(key.encode()).hexdigest()[:12] + ".json")
    cached = run_folder.read_json(path) if os.path.isfile(path) else {}   # a corrupt cache file: measured again
    if isinstance(cached, dict) and cached.get("key") == key and isinstance(cached.get("result"), dict):
        result = cached["result"]
    else:
        print(f"gpu_check.py: measuring {os.path.basename(config)} at {layers} layer(s)", file=sys.stderr, flush=True)
        spec = dict(folder=random_model(config, layers, args.cache), four_bit=True, dtype="bf16", device=args.device,
                    threads=args.threads, probes=probes)
        result = run_worker(spec)[0]
        run_folder.write_atomic(path, json.dumps({"key": key, "result": result}))   # a killed run leaves no half file
    if "tensor_bytes" not in result:                         # cached before it was recorded: a load without probes
        result["tensor_bytes"] = measured(config, layers, [], args)["tensor_bytes"]      # (~1 min at 7B width)
    return at_least_tensor_bytes(result)


def at_least_tensor_bytes(run):
    """A run whose static reads below its tensors' bytes, shifted up by the difference in static and every part.
    Memory in use cannot be less than the live tensors, so a lower reading has a base that held freed pages the load
    then reused (runs measured before measure() released them first: 4-bit static grew 0.01 GiB a layer for 0.05-0.11
    GiB of NF4 weights); every phase was read against that base and is low by the same amount (measured on a small
    4-bit config: each part moved by the static's 8.1 / 16.2 MiB at 1 / 2 layers, within 0.5 MiB)."""
    low = run["tensor_bytes"] - run["static"]
    if low <= 0:
        return run
    return {**run, "static": run["static"] + low,
            "probes": [{**p, "parts": {k: v + low for k, v in p["parts"].items()}} for p in run["probes"]]}


def memory_table(args):
    """Every config × shape: static and each phase's peak at true depth (bytes), and the no-grad rows of the budget.
    CUDA: every phase at its true rows and lengths at 1 and 2 layers (a 28-layer random model per config would cost
    minutes and 15 GB of disk each), true depth by m(L) = m(1) + (L − 1)·(m(2) − m(1)), exact for memory that is
    affine in depth. CPU: short probes, extrapolate()."""
    from transformers import AutoConfig
    import policy
    out = []
    for config in args.models.split(","):
        cfg = AutoConfig.for_model(**json.load(open(config)))
        depth = cfg.get_text_config().num_hidden_layers
        deep = lambda at: at(1) + (depth - 1) * (at(2) - at(1))                    # noqa: E731
        cuda = args.device == "cuda"
        runs = {layers: measured(config, layers, [] if cuda else cpu_probes(layers), args) for layers in (1, 2)}
        static = deep(lambda layers: runs[layers]["static"])
        rows = {}                                            # the no-grad rows train.py picks at full depth
        for shape_name, shape in shapes().items():
            rows[shape_name] = policy.nograd_chunk_rows(shape["n"], shape["g"], PROMPT + shape["new"],
                                                        policy.nograd_bytes_per_token(cfg, 2),
                                                        args.budget_gb * GiB - static)
        if cuda:
            probes = [p for shape_name, shape in shapes().items() for p in true_probes(shape, rows[shape_name])]
            runs = {layers: measured(config, layers, probes, args) for layers in (1, 2)}
        for i, (shape_name, shape) in enumerate(shapes().items()):
            row = dict(model=os.path.basename(config)[:-5], shape=shape_name, static=static,
                       nograd_rows=rows[shape_name])
            for phase, key, r in (("generate", "generate", shape["rollout"]), ("no-grad", "nograd", rows[shape_name]),
                                  ("grad", "grad", shape["micro"]), ("diagnostics", "diagnostics", shape["diag"])):
                if cuda:                                     # the 4 probes of shape i, each part at true depth
                    j = 4 * i + PHASES.index(phase)
                    row[key] = max(deep(lambda layers: runs[layers]["probes"][j]["parts"][part])
                                   for part in runs[1]["probes"][j]["parts"])
                else:
                    row[key] = extrapolate(runs, cfg, depth, phase, r, shape["new"])
            out.append(row)
    return out


def true_probes(shape, nograd_rows, prompt=PROMPT):
    """Each phase of a shape at its true rows and lengths (a direct measurement, at the folder's depth)."""
    return [dict(phase="generate", rows=shape["rollout"], prompt=prompt, new=shape["new"]),
            dict(phase="no-grad", rows=nograd_rows, prompt=prompt, new=shape["new"]),
            dict(phase="grad", rows=shape["micro"], prompt=prompt, new=shape["new"]),
            dict(phase="diagnostics", rows=shape["diag"], prompt=0, new=shape["new"])]


def direct(run, phase):
    return max(next(p["parts"] for p in run["probes"] if p["phase"] == phase).values())


def small_check(args):
    """The memory model on SMALL: extrapolated from 1 and 2 layers and 1-2 short rows vs measured at full depth and
    size, on this device -> markdown, and the relative errors by phase."""
    from transformers import AutoConfig
    os.makedirs(args.cache, exist_ok=True)
    config = os.path.join(args.cache, "small.json")
    run_folder.write_atomic(config, json.dumps(SMALL))
    cfg, depth = AutoConfig.for_model(**SMALL), SMALL["num_hidden_layers"]
    spec = dict(four_bit=False, dtype="fp32", device=args.device, threads=args.threads, chunk_bytes=SMALL_CHUNK_BYTES)
    sh = SMALL_SHAPE
    probes = {layers: cpu_probes(layers, SMALL_PROBE, sh["prompt"]) for layers in (1, 2)}
    full_probes = true_probes(sh, sh["n"], sh["prompt"])
    one, two, full = run_worker(*[{**spec, "folder": random_model(config, layers, args.cache), "probes": p}
                                  for layers, p in ((1, probes[1]), (2, probes[2]), (depth, full_probes))])
    runs = {1: one, 2: two}
    rows, errors = ["| phase | extrapolated | measured | error |", "|---|---|---|---|"], {}
    want = {"static": (runs[1]["static"] + (depth - 1) * (runs[2]["static"] - runs[1]["static"]), full["static"])}
    for phase, r in (("generate", sh["rollout"]), ("no-grad", sh["n"]), ("grad", sh["micro"]),
                     ("diagnostics", sh["diag"])):
        want[phase] = (extrapolate(runs, cfg, depth, phase, r, sh["new"], 4, SMALL_PROBE, sh["prompt"]),
                       direct(full, phase))
    for phase, (x, m) in want.items():
        errors[phase] = x / m - 1
        rows.append(f"| {phase} | {x / 2**20:.0f} MiB | {m / 2**20:.0f} MiB | {100 * errors[phase]:+.0f}% |")
    return "\n".join(rows), errors


def markdown(table, budget_gb, how, device):
    """The table: one row per model × shape, every cell marked extrapolated (CPU) or measured (GPU)."""
    source = "measured on GPU" if device == "cuda" else "extrapolated"
    lines = [f"| model | shape | static | generate | no-grad (rows) | grad | diagnostics | peak | ≤ {budget_gb:g} GiB | "
             "cells |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        peak = max(r[k] for k in ("static", "generate", "nograd", "grad", "diagnostics")) / GiB
        lines.append(f"| {r['model']} | {r['shape']} | {r['static'] / GiB:.1f} | {r['generate'] / GiB:.1f} | "
                     f"{r['nograd'] / GiB:.1f} ({r['nograd_rows']}) | {r['grad'] / GiB:.1f} | "
                     f"{r['diagnostics'] / GiB:.1f} | {peak:.1f} | {'yes' if peak <= budget_gb else '**no**'} | "
                     f"{source} |")
    return "\n".join(lines) + f"\n\n{how}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", action="store_true", help="the memory table only")
    ap.add_argument("--small", action="store_true", help="the memory model on a small config: extrapolated vs measured")
    ap.add_argument("--models", default=",".join(os.path.join(ROOT, "configs", m + ".json") for m in PAPER_MODELS),
                    help="comma list of config files (true width)")
    ap.add_argument("--budget-gb", type=float, default=24.0, help="the card the table is fitted to (GiB)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/kl-rl-bench"), help="random models, measurements")
    ap.add_argument("--out", default="gpu-check.md", help="the report of the full check")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:                                          # the measuring worker lives in gpu_probe.py
        return gpu_probe.main(["--worker", args.worker])
    for config in args.models.split(","):                   # one line, not a traceback deep in the table
        if not isinstance(run_folder.read_json(config), dict):
            print(f"gpu_check.py: error: --models {config}: not a readable JSON model config", file=sys.stderr)
            return 2
    import torch
    import transformers
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.cache, exist_ok=True)
    start = time.time()
    if args.small:                                           # the whole check's code path, CPU-sized (the tests)
        text = small_check(args)[0]
        folder, flags, title = os.path.join(ROOT, "assets", "tiny-arith"), TINY_BENCH, "the shipped tiny model"
    else:
        if args.device != "cuda" and not args.memory:
            raise SystemExit("gpu_check.py: the full check needs a GPU; on a CPU: --memory (extrapolated) or --small")
        how = ("measured on " + torch.cuda.get_device_name() + " at true rows and lengths, 1 and 2 layers; depth "
               "extrapolated" if args.device == "cuda" else
               "CPU: every cell extrapolated from 1 and 2 layers and 1-2 short rows") + \
            f"; GiB, max over the phase's parts; torch {torch.__version__}, transformers {transformers.__version__}; " \
            f"{time.strftime('%Y-%m-%d')}; `python tools/gpu_check.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
        table = memory_table(args)
        text = markdown(table, args.budget_gb, how, args.device)
        # a few real 4-bit steps of the 7B config at 8 × 256 with TRL beside them, the decode floor and the CUDA levers
        folder, flags = random_model(os.path.join(ROOT, "configs", "qwen2.5-7b.json"), 28, args.cache), GPU_BENCH
        title = "Qwen2.5-7B-shaped QLoRA, random weights"
    print(text, flush=True)
    if args.memory:
        return 0
    argv = ["--model", os.path.relpath(folder, ROOT) if folder.startswith(ROOT) else folder, *flags, "--device",
            args.device]
    steps, failed, results = io.StringIO(), None, os.path.join(args.cache, "gpu-check-bench.json")
    try:                                                     # bench.py runs each arm in a process of its own
        with contextlib.redirect_stdout(steps):
            bench.main(argv + ["--json", results])
    except SystemExit as e:                                  # bench.py: one line naming the arm that failed
        failed = str(e)
    row = None if args.small or failed else \
        next((r for r in table if r["model"] == "qwen2.5-7b" and r["shape"] == "8 × 256"), None)
    if row:                                                  # the one shape bench.py runs at true depth
        model_peak = max(row[k] for k in ("static", "generate", "nograd", "grad", "diagnostics")) / GiB
        measured_peak = json.load(open(results))["summary"]["ours"]["peak_mem_gb"]
        steps.write(f"\n\nMemory model vs measured at 28 layers: qwen2.5-7b 8 × 256 peak {model_peak:.1f} GiB "
                    f"(200-token prompts) vs bench.py's `ours` {measured_peak:.1f} GiB (max_memory_reserved; arith "
                    "prompts of ~16 tokens)")
    report = (f"# gpu_check.py ({time.time() - start:.0f} s)\n\n## Memory of a train.py step (budget "
              f"{args.budget_gb:g} GiB)\n\n{text}\n\n## Step time, {title}: `python tools/bench.py {' '.join(argv)}`\n\n"
              f"{steps.getvalue().strip() if failed is None else 'bench.py failed: ' + failed}\n")
    run_folder.write_atomic(args.out, report)
    print(f"gpu_check.py: wrote {args.out}", file=sys.stderr)
    return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
