"""gpu_probe.py -- the measuring worker of gpu_check.py: a random model of a config at some depth, and each phase of
a train.py step run on it in a fresh process, its peak memory read on the device it runs on (issue 16).

gpu_check.py decides what to measure (configs, depths, probes: rows, lengths, phase) and turns the readings into the
table; this file only measures. A phase's peak is read on the device it runs on: CUDA max_memory_reserved (what the
card must hold), the cache emptied and the peak reset before each phase; a CPU process's peak RSS (VmHWM, reset
through /proc/self/clear_refs) with glibc's mmap threshold at 64 KiB, so a freed tensor leaves RSS (by default glibc
keeps freed blocks: RSS would measure the allocator, not the step). Peaks are totals above the process before the
model was loaded (static included). Each phase is split where its peak can move (decoder vs LM head, forward vs
backward, prefill vs decoding): a reading per part, the table takes the largest.

    run_worker(spec, ...)                           # from gpu_check.py: [measure(spec), ...] in a fresh process
    python tools/gpu_probe.py --worker SPECS_JSON   # that process (internal)
"""
import argparse
import gc
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repo root: the worker runs as a script,
if ROOT not in sys.path:                                             # and the core modules (policy, run_folder)
    sys.path.insert(0, ROOT)                                         # sit one folder up

from tools import bench
import run_folder

PHASES = ("generate", "no-grad", "grad", "diagnostics")
WARM_UP = [dict(phase=phase, rows=1, prompt=4, new=4) for phase in PHASES]   # measure()'s first call in a worker


def mem(device, what):
    """Bytes: "now" (reserved / RSS), "peak" since the last "reset" (which also empties the CUDA cache and hands
    glibc's free heap pages back, so that a phase's peak holds its own tensors and the live ones before it)."""
    import torch
    from policy import release_freed_memory
    if device.type == "cuda":
        torch.cuda.synchronize()
        if what == "reset":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_reserved() if what == "now" else torch.cuda.max_memory_reserved()
    if what == "reset":
        gc.collect()
        release_freed_memory()                               # glibc: free heap pages (small blocks) back to the OS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                    # peak RSS := current RSS
    status = open("/proc/self/status").read()
    return int(re.search(r"VmRSS:\s+(\d+)" if what == "now" else r"VmHWM:\s+(\d+)", status).group(1)) * 1024


def random_model(config, layers, cache):
    """cache/NAME-L{layers}: the config at that depth, random bf16 weights (N(0, 0.02)), the tiny tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights
    name = os.path.basename(config)[:-5] if config.endswith(".json") else os.path.basename(config)
    out = os.path.join(cache, f"{name}-L{layers}")
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    cfg = json.load(open(config))
    cfg.update(num_hidden_layers=layers)
    for key in ("max_window_layers",):
        if key in cfg:
            cfg[key] = min(cfg[key], layers)
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][:layers]
    with no_init_weights():                                  # HF's init is slow at this size; any weights will do
        net = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02, generator=gen)
    net.save_pretrained(out)
    AutoTokenizer.from_pretrained(os.path.join(ROOT, "assets", "tiny-arith")).save_pretrained(out)
    return out



def tensor_bytes(model, opt):
    """Bytes of every tensor a step keeps between steps: parameters (NF4-packed weights included), buffers, bnb's
    quantisation states (absmax, code, the nested state of double quantisation), gradients still held and AdamW's
    states; storage shared by two names counted once. Exact on any device, unlike a reading of the allocator."""
    import torch
    storages = {}

    def add(t):
        if torch.is_tensor(t) and t.device.type != "meta":
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        add(t.grad)
        state = getattr(t, "quant_state", None)
        while state is not None:                             # QuantState, then its state2 (double quantisation)
            for v in vars(state).values():
                add(v)
            state = getattr(state, "state2", None)
    for state in opt.state.values():
        for v in state.values():
            add(v)
    return sum(storages.values())


def measure(spec):
    """spec["folder"] (one config at one depth) in this process -> {"static": bytes, "probes": [{...probe, "parts":
    {part: bytes}}]}. Bytes are above the process's memory before the model was loaded."""
    import torch
    import policy
    from transformers import LogitsProcessor, LogitsProcessorList
    from transformers.generation.utils import GenerationMixin
    torch.set_num_threads(spec["threads"])
    policy.VOCAB_CHUNK_BYTES = spec.get("chunk_bytes", policy.VOCAB_CHUNK_BYTES)
    device = torch.device(spec["device"])
    mem(device, "reset")                                     # the last model's freed pages back first: a base that
    base = mem(device, "now")                                # holds them is too high by what the next load reuses
    model, tok = policy.load_policy(spec["folder"], load_in_4bit=spec["four_bit"], gradient_checkpointing=True,
                                    dtype=spec["dtype"], device=str(device))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    parts = {}                                               # part -> peak bytes of the current probe

    def close(part):                                         # the peak since the last close belongs to `part`
        parts[part] = max(parts.get(part, 0), mem(device, "peak") - base)
        mem(device, "reset")

    decoder = policy._completion_hidden

    def timed_decoder(*args, **kwargs):                      # the decoder pass vs the LM head's chunks after it
        close("before")
        h = decoder(*args, **kwargs)
        close("decoder")
        if h.requires_grad:                                  # backward reaches h once the head's chunks are done
            h.register_hook(lambda g: close("head"))
        return h
    policy._completion_hidden = timed_decoder

    class Steps(LogitsProcessor):                            # generate: the first call ends the prefill
        def __call__(self, input_ids, scores):
            close("decode" if "prefill" in parts else "prefill")
            return scores

    def batch(rows, prompt, new):
        ids = torch.randint(3, 290, (rows, prompt + new), generator=torch.Generator().manual_seed(rows), device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": prompt}

    # one backward and optimizer step first, so that LoRA's gradients and AdamW's states have been allocated
    ro = batch(1, 4, 4)
    policy.token_logprobs(model, ro["input_ids"], ro["attention_mask"], 4).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    gc.freeze()                                              # each reset's collect skips the model's ~10^5 objects
    mem(device, "reset")
    result = {"static": mem(device, "now") - base, "tensor_bytes": tensor_bytes(model, opt), "probes": []}
    generate = GenerationMixin.generate                      # a meter at every decode step
    GenerationMixin.generate = lambda self, *a, **k: generate(self, *a, logits_processor=LogitsProcessorList([Steps()]),
                                                             **k)
    for probe in spec["probes"]:
        parts.clear()
        mem(device, "reset")
        rows, prompt, new, phase = probe["rows"], probe["prompt"], probe["new"], probe["phase"]
        if phase == "generate":
            model.eval()
            policy.rollout(model, tok, ["+" * prompt] * rows, 1, new, 1.0, seed=0)
        elif phase == "no-grad":
            model.eval()
            with model.disable_adapter():
                policy.logprobs_in_chunks(model, batch(rows, prompt, new), [slice(0, rows)], 1.0, keep_hidden=rows)
        elif phase == "grad":
            model.train()
            ro = batch(rows, prompt, new)
            logp = policy.token_logprobs(model, ro["input_ids"], ro["attention_mask"], prompt)
            logp.sum().backward()
            opt.zero_grad(set_to_none=True)
        else:                                                # diagnostics: LM head only, over rows × new states
            h = torch.randn(rows * new, model.config.hidden_size, device=device)
            policy.kl_stats_from_hidden(model, h, h + 0.01)
        close({"generate": "decode", "no-grad": "head", "grad": "decoder backward"}.get(phase, phase))
        parts.pop("before", None)
        result["probes"].append({**probe, "parts": dict(parts)})
    policy._completion_hidden = decoder
    GenerationMixin.generate = generate
    del model, opt, params
    gc.unfreeze()
    gc.collect()
    return result


def run_worker(*specs):
    """[measure(spec) for spec in specs] in a fresh process with glibc's mmap threshold at 64 KiB, so that a freed
    tensor leaves RSS and each model's peaks start from where the last one's memory was returned."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(specs[0]["threads"]),
           "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(specs)], capture_output=True,
                       text=True, env=env, cwd=ROOT,
                       preexec_fn=run_folder.die_with_parent)
    lines = [line for line in p.stdout.splitlines() if line.startswith("MEMORY ")]
    if p.returncode or not lines:
        raise SystemExit(f"gpu_check.py: measuring {specs[0]['folder']} failed:\n" + (p.stdout + p.stderr)[-3000:])
    return json.loads(lines[-1][7:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", required=True, help="a JSON list of measure() specs")
    specs = json.loads(ap.parse_args(argv).worker)           # a list of specs: one import, freed between models
    if not any(spec["four_bit"] for spec in specs):
        sys.modules.setdefault("bitsandbytes", None)         # peft imports it if installed: ~1.2 s, never used here
    bench.force_length()                                     # exactly C new tokens (stop tokens masked)
    measure({**specs[0], "probes": WARM_UP})                # first-call costs (kernels, pools) are nobody's static
    print("MEMORY " + json.dumps([measure(spec) for spec in specs]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
