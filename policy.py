"""policy.py -- the policy π_θ and the reference π_ref as one Hugging Face model: load, sample, score.

What it implements, top to bottom (train.py calls these; eval.py reuses the first two):
  load_policy      base model by hub id or local folder, optionally 4-bit NF4 (QLoRA), LoRA on every linear layer.
                   The reference π_ref is the SAME model with the adapters switched off (`disable_adapter()`),
                   so a run holds one copy of the base weights and KL is exactly 0 at step 0.
  rollout          P prompts × G completions in one batched HF `generate` call, left padding, true sampling
                   (top_k=0, top_p=1: the KL estimates and ratios are for π itself, not a truncated sampler);
                   completion mask up to and including the first EOS.
  token_logprobs   log π(y_t|s_t) of the sampled tokens under logits / temperature, computing logits only at
                   completion positions, chunk by chunk (never the (N, C, V) float32 tensor); optionally one
                   prompt pass per group (--share-prompt).
  kl_stats_from_hidden  exact per-token reverse / forward KL and entropy from full logits (a diagnostic, no
                   estimator), from hidden states the reference and grad passes already computed.
  adapter_snapshot, swapped_adapter    the behaviour policy of --async-level N: the adapters of N steps ago.
  rollout_copy, sync_rollout_copy      (--rollout-bf16-copy) a bf16 copy of the base that only samples, with the
                   current LoRA merged into it each step; the 4-bit base stays the training copy.

The loss these tensors feed is in kl_rl.py (torch only). Simplifications: HF generate instead of vLLM; one device.
"""

import contextlib
import ctypes
import inspect
import logging
import os
import resource
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)   # harmless "no kernels" notice on CPU
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils.integrations import dequantize_module_weight  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, CompileConfig,  # noqa: E402
                          DynamicCache)

from estimators import full_kl  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Model: policy π_θ = base + LoRA; reference π_ref = the SAME weights with the adapters switched off
# ---------------------------------------------------------------------------------------------------------
# A checkpoint's generation_config.json may set any of these; explicit neutral values make generate() draw from π
# itself (KL estimates and importance ratios are computed for π, so a truncated sampler would bias both).
TRUE_SAMPLING = dict(top_k=0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
NO_LOGITS_PROCESSING = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0, min_new_tokens=None,
                            bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None, sequence_bias=None,
                            forced_bos_token_id=None, forced_eos_token_id=None)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_model_source(model):
    """-> what from_pretrained should load. A short name of real_model.MODELS (smollm2-135m) becomes its converted
    folder (converted on first use). A local path that does not exist fails fast (a hub id such as
    "Qwen/Qwen2.5-7B" is left to from_pretrained): "mymodels/tiny" looks like a hub id, but if ./mymodels exists it
    is a mistyped folder: say so now rather than after the hub's ~50 s of retries."""
    from tools.real_model import resolve
    model = resolve(model)
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or os.path.isdir(model.split("/")[0])
    if looks_local and not os.path.isdir(os.path.expanduser(model)):
        raise FileNotFoundError(f"model folder not found: {model}")
    return model


def load_policy(model, *, load_in_4bit=False, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                gradient_checkpointing=False, device=None, adapter=None, dtype=None):
    """-> (peft_model, tokenizer). LoRA on every linear layer (or a saved `adapter`, trainable); the reference
    policy is `with peft_model.disable_adapter():`, so a QLoRA run holds one 4-bit copy of the base weights.
    dtype: "fp32" / "bf16" compute dtype of the base (default: bf16 on CUDA, fp32 on CPU); LoRA stays fp32 (peft)."""
    model = check_model_source(model)
    if adapter is not None and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise FileNotFoundError(f"no peft adapter (adapter_config.json) in {adapter}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")        # left padding for batched generate
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token    # base checkpoints often ship none; masks never rely on != pad
    dtype = DTYPES[dtype] if dtype in DTYPES else torch.bfloat16 if device.type == "cuda" else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype) if load_in_4bit else None
    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, quantization_config=quant,
                                                device_map={"": str(device)})
    for m in base.modules():   # bnb on CPU repacks 4-bit weights at the first eval forward; that layout has no backward
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    if load_in_4bit:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
        fp32_head_only(base, dtype)
    elif gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter is not None:
        return PeftModel.from_pretrained(base, adapter, is_trainable=True), tokenizer
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    return get_peft_model(base, lora), tokenizer


def fp32_head_only(base, dtype):
    """Undo prepare_model_for_kbit_training's fp32 upcast of every weight it does not quantise, except the LM head's.
    The head needs fp32: log π and δ = log π − log π_ref come from its logits, and bf16 logits carry up to ±0.06 of
    rounding at |logit| ≈ 16, more than a typical token's δ. The rest follows the compute dtype: the embedding is a
    lookup, the RMS norms normalise in fp32 internally, and an fp32 embedding made the residual stream and the KV cache
    fp32 under bf16 compute (twice their memory; 7B: +1.1 GB of embedding). A tied head keeps the shared weight in
    fp32 and the embedding's output is cast down. With fp32 compute nothing changes."""
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    for p in base.parameters():
        if p.dtype == torch.float32 and p is not head.weight:
            p.data = p.data.to(dtype)
    if embedding.weight is head.weight:
        embedding.register_forward_hook(lambda module, args, out: out.to(dtype))
    head.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))


def device_memory(device, what):
    """Bytes: "total" (the GPU's memory, or RAM) or "used" (live CUDA tensors, or this process's RSS on Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory if what == "total" else \
            torch.cuda.memory_allocated(device)
    if what == "total":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        return 0


def reset_peak_memory():
    """On CUDA, start a new peak for peak_memory_gb (train.py: every step)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def release_freed_memory():
    """Hand the heap memory glibc keeps after a free back to the OS (train.py: after the grad pass). glibc serves
    tensors under its mmap threshold (up to 32 MiB) from a heap it seldom shrinks, so the grad pass's freed
    activations stayed in RSS and the exact-KL chunks came on top of them (SmolLM2-135M, smollm2-cpu preset: RSS
    3.8-4.3 GiB after the pass, 1.0 GiB of it live; README: Memory). A no-op elsewhere; no value changes."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):                       # not glibc
        pass


def peak_memory_gb():
    """CUDA: the caching allocator's peak reserve since reset_peak_memory (what the card had to hold: tensors plus
    the allocator's cache); CPU: the process's peak RSS so far."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_reserved() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # Linux reports KiB


def clock():
    if torch.cuda.is_available():
        torch.cuda.synchronize()                             # GPU work is asynchronous: time what has finished
    return time.perf_counter()


def stop_token_ids(model, tokenizer):
    """Every id that ends a completion: the config's and generation_config's EOS ids (Llama 3.1 lists three), the
    tokenizer's EOS, and the end-of-turn tokens its chat template writes after an assistant message (tasks.
    end_of_turn_ids: a base model prompted with its ChatML template ends its turn with <|im_end|>, not its EOS)."""
    from tasks import end_of_turn_ids
    ids = set(end_of_turn_ids(tokenizer)) | {tokenizer.eos_token_id}
    for cfg in (model.config, model.generation_config):
        eos = getattr(cfg, "eos_token_id", None)
        ids |= {eos} if isinstance(eos, int) else set(eos or ())
    return sorted(ids - {None})


# ---------------------------------------------------------------------------------------------------------
# Rollouts: G samples per prompt, one batched generate call
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def rollout(model, tokenizer, prompts, group_size, max_new_tokens, temperature, seed=None, batch_size=None,
            compile=False):
    """prompts × group_size completions; rows i*G .. i*G+G-1 belong to prompt i. Greedy if temperature == 0.
    batch_size (optional): at most this many sequences per generate call, since the KV cache grows with it.
    compile: a static KV cache and torch.compile of the decode step (--compile-decode; see decode_options)."""
    if seed is not None:
        torch.manual_seed(seed)                      # also seeds every CUDA device
    per_call = max(1, batch_size // group_size) if batch_size else len(prompts)
    if per_call < len(prompts):
        return merge_rollouts([rollout(model, tokenizer, prompts[i:i + per_call], group_size, max_new_tokens,
                                       temperature, compile=compile) for i in range(0, len(prompts), per_call)],
                              tokenizer.pad_token_id)
    device = model.get_input_embeddings().weight.device
    # a chat template that already starts with the BOS text must not get a second BOS from the tokenizer
    add_bos = not (tokenizer.bos_token and prompts[0].startswith(tokenizer.bos_token))
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_bos).to(device)
    stop = stop_token_ids(model, tokenizer)
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, num_return_sequences=group_size, **TRUE_SAMPLING)
    else:   # greedy refuses num_return_sequences > 1: repeat the prompts instead (same row order)
        enc = {k: v.repeat_interleave(group_size, 0) for k, v in enc.items()}
        sampling = dict(do_sample=False, temperature=None, **{k: None for k in TRUE_SAMPLING})
    out = model.generate(**enc, max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=stop, **NO_LOGITS_PROCESSING, **sampling,
                         **(decode_options(device) if compile else {}))                     # (N, P+C)
    P = enc["input_ids"].shape[1]
    completion_ids = out[:, P:]                                                    # (N, C)
    is_stop = torch.isin(completion_ids, torch.tensor(stop, device=device)).long() # (N, C)
    # 1 up to and including the first EOS; pad may equal EOS, so `!= pad` would also drop the EOS itself
    completion_mask = (is_stop.cumsum(1) - is_stop == 0).float()                   # (N, C)
    prompt_mask = enc["attention_mask"].repeat_interleave(len(out) // len(enc["attention_mask"]), 0)   # (N, P)
    texts = tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(completion_ids, completion_mask)],
                                   skip_special_tokens=True)
    return {"input_ids": out, "attention_mask": torch.cat([prompt_mask, completion_mask.long()], 1),
            "prompt_len": P, "completion_ids": completion_ids, "completion_mask": completion_mask,
            "truncated": is_stop.sum(1) == 0, "texts": texts}


def decode_options(device):
    """generate() kwargs for --compile-decode. A static KV cache has fixed shapes, so torch.compile captures the
    decode step once ("reduce-overhead": CUDA graphs, no per-kernel launch cost) and transformers keeps the cache
    at the largest size seen, so later steps reuse the graph. transformers compiles only models it knows to be
    compilable: a bnb 4-bit model gets the static cache alone (pair it with --rollout-bf16-copy)."""
    config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
    config._compile_all_devices = device.type != "cuda"      # transformers' own switch for compiling off-GPU
    return dict(cache_implementation="static", compile_config=config)


def merge_rollouts(parts, pad_id):
    """Concatenate rollouts of different widths: prompts stay left-padded, completions are right-padded."""
    P, C = max(r["prompt_len"] for r in parts), max(r["completion_ids"].shape[1] for r in parts)
    out = {"prompt_len": P, "texts": [t for r in parts for t in r["texts"]],
           "truncated": torch.cat([r["truncated"] for r in parts])}
    for key, left, value in [("input_ids", True, pad_id), ("attention_mask", True, 0),
                             ("completion_ids", False, pad_id), ("completion_mask", False, 0)]:
        out[key] = torch.cat([F.pad(r[key], (P - r["prompt_len"] if left else 0, C - r["completion_ids"].shape[1]),
                                    value=value) for r in parts])
    return out


# ---------------------------------------------------------------------------------------------------------
# Log-probabilities of the sampled tokens, logits only where they are needed
# ---------------------------------------------------------------------------------------------------------
def _completion_hidden(model, input_ids, attention_mask, prompt_len, group_size=1):
    """Last-layer hidden states at the positions that predict the completion tokens: (N, C, H).

    group_size G > 1 (--share-prompt): where every G consecutive rows hold one prompt (rollout's order), the prompt
    runs once per group and its KV cache is repeated G times, so the pass reads P + G·C tokens per group, not
    G·(P + C); under grad the repeat sums the G rows' gradients into the shared prompt pass. Same values up to float
    rounding. Not under gradient checkpointing (a recomputed layer would append to the cache twice)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    decoder, P, G, N = base.get_decoder(), prompt_len, group_size, len(input_ids)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)    # (N, P+C) what generate() used under left padding
    head = input_ids[:, :P], attention_mask[:, :P]
    if G < 2 or N % G or input_ids.shape[1] - P < 2 or (torch.is_grad_enabled() and base.is_gradient_checkpointing) \
            or not all((x.view(-1, G, P) == x[::G, None]).all() for x in head):
        h = decoder(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                    position_ids=position_ids[:, :-1], use_cache=False).last_hidden_state   # (N, P+C-1, H)
        return h[:, P - 1:]                                       # (N, C, H) position t predicts token t+1
    cache = DynamicCache(config=base.config)                      # filled in place by the prompt pass
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"  # older HF
    h_prompt = decoder(input_ids=head[0][::G], attention_mask=head[1][::G], position_ids=position_ids[::G, :P],
                       use_cache=True, **{name: cache}).last_hidden_state[:, -1:]              # (N/G, 1, H)
    cache.batch_repeat_interleave(G)
    h = decoder(input_ids=input_ids[:, P:-1], attention_mask=attention_mask[:, :-1],
                position_ids=position_ids[:, P:-1], use_cache=True, **{name: cache}).last_hidden_state   # (N, C-1, H)
    return torch.cat([h_prompt.repeat_interleave(G, 0), h], 1)    # (N, C, H)


def _logits(model, h, temperature=1.0):
    """LM head on a chunk of hidden states, in float32: (n, H) -> (n, V)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    logits = base.get_output_embeddings()(h).float()
    cap = getattr(base.config, "final_logit_softcapping", None)  # Gemma-2 style heads; None for Llama/Qwen
    return (cap * torch.tanh(logits / cap) if cap else logits) / temperature


VOCAB_CHUNK_BYTES = 2**29     # 0.5 GiB: what the (rows, V) float32 tensors of one log-prob or exact-KL chunk may hold


def vocab_chunks(n, vocab_size, tensors, cap=512):
    """Row slices covering range(n), each small enough that `tensors` float32 tensors of shape (rows, vocab_size) fit
    VOCAB_CHUNK_BYTES: 512 rows (the cap) up to V ≈ 43k for log-probs, 64 rows at the least. A row's log-prob or KL
    does not depend on its chunk as long as the chunk has 4 rows or more (MKL and cuBLAS matmuls are row-invariant
    from there): a tail of 1-3 rows is merged into the chunk before it, split in two halves."""
    rows = min(cap, max(64, VOCAB_CHUNK_BYTES // (tensors * 4 * vocab_size)))
    cuts = list(range(0, n, rows)) + [n]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] < 4:            # [.., a, b, n] with n - b < 4 -> [.., a, (a + n) // 2, n]
        cuts[-2] = (cuts[-3] + n) // 2
    return [slice(a, b) for a, b in zip(cuts, cuts[1:])]


def token_logprobs(model, input_ids, attention_mask, prompt_len, temperature=1.0, chunk=None, keep_hidden=None,
                   group_size=1):
    """log π(y_t | s_t) of the completion tokens under logits/temperature: (N, C).

    Logits are built a chunk of token rows at a time (`chunk` rows, default vocab_chunks: ~6 (rows, V) float32 tensors
    within 0.5 GiB, i.e. 512 rows at V = 49k, 147 at V = 152k); under grad each chunk is checkpointed, so backward
    recomputes its logits instead of keeping all N·C·V of them alive (7B: V = 152k, 4 B/logit).
    keep_hidden=k: return (log-probs, hidden) where hidden (M, H) holds the detached last-layer states of the real
    completion tokens of the first k rows, so the exact KL diagnostics need no decoder pass of their own.
    group_size: share each group's prompt pass (see _completion_hidden)."""
    h = _completion_hidden(model, input_ids, attention_mask, prompt_len, group_size)   # (N, C, H)
    targets = input_ids[:, prompt_len:]                                     # (N, C)

    def chunk_logp(h_c, y_c):                                               # (n, H), (n,) -> (n,)
        logits = _logits(model, h_c, temperature)                           # (n, V)
        return logits.gather(1, y_c[:, None]).squeeze(1) - logits.logsumexp(1)

    flat_h, flat_y = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    out = []                                  # 6 (n, V) tensors: logits, /T, 2 in logsumexp, 2 more in backward
    for sl in vocab_chunks(flat_y.numel(), model.get_output_embeddings().out_features, 6, cap=chunk or 512):
        args = (flat_h[sl], flat_y[sl])
        out.append(checkpoint(chunk_logp, *args, use_reentrant=False) if torch.is_grad_enabled()
                   else chunk_logp(*args))
    logp = torch.cat(out).view_as(targets)
    if keep_hidden is None:
        return logp
    real = attention_mask[:keep_hidden, prompt_len:].bool()               # (k, C) the completion mask of rollout()
    return logp, h[:keep_hidden].detach()[real]                           # (M, H) a copy: the pass's h can go


def nograd_bytes_per_token(config, dtype_bytes):
    """Bytes per token of a no-grad decoder pass at its peak (layers run one at a time, so depth does not count):
    the MLP's intermediate activations in the compute dtype (gate, up, act·up) and the float32 LoRA branch of its
    projections, plus a few hidden-size tensors. An upper bound on gpu_check.py's measurements (README: Memory)."""
    c = config.get_text_config()
    return c.intermediate_size * (3 * dtype_bytes + 12) + c.hidden_size * (8 * dtype_bytes + 16)


def nograd_chunk_rows(n, group_size, seq_len, bytes_per_token, free_bytes):
    """Rows per no-grad pass (whole groups, at least one; at most n) whose decoder working set and one
    vocabulary chunk fit free_bytes. The rows do not change any value (each row's log-probs are its own)."""
    fit = int((free_bytes - VOCAB_CHUNK_BYTES) // max(seq_len * bytes_per_token, 1)) // group_size * group_size
    return max(group_size, min(n, fit))


def nograd_passes(model, n, group_size, seq_len, budget_gb=0):
    """Row slices of train.py's no-grad passes over n rows of seq_len tokens: nograd_chunk_rows within the memory
    budget (GiB; 0: the device's memory, or RAM on a CPU) less what the process holds now."""
    device = model.get_input_embeddings().weight.device
    budget = budget_gb * 2**30 if budget_gb else device_memory(device, "total")
    per_token = nograd_bytes_per_token(model.config, 4 if model.config.dtype == torch.float32 else 2)
    rows = nograd_chunk_rows(n, group_size, seq_len, per_token, budget - device_memory(device, "used"))
    return [slice(i, i + rows) for i in range(0, n, rows)]


@torch.no_grad()
def logprobs_in_chunks(model, ro, rows, temperature, keep_hidden=0, group_size=1):
    """token_logprobs of a rollout, one no-grad pass per slice in `rows` (no activations kept, so big slices):
    -> (N, C) log-probs and the hidden states of the first keep_hidden rows' completion tokens (see token_logprobs)."""
    parts = [token_logprobs(model, ro["input_ids"][sl], ro["attention_mask"][sl], ro["prompt_len"], temperature,
                            keep_hidden=max(0, keep_hidden - sl.start), group_size=group_size) for sl in rows]
    return torch.cat([lp for lp, _ in parts]), torch.cat([h for _, h in parts])


@torch.no_grad()
def kl_stats_from_hidden(model, h, h_ref, temperature=1.0, chunk=None):
    """Exact token-level KL(π‖π_ref), KL(π_ref‖π) and H(π) over the whole vocabulary (no estimator), averaged
    over the (M, H) hidden states of real completion tokens under π and π_ref. Only the LM head runs here: the
    decoder states come from passes the step makes anyway (train.py: the reference pass and the grad pass).
    Chunks of vocab_chunks rows (~10 (rows, V) float32 tensors within 0.5 GiB: 273 rows at V = 49k, 88 -> 64 at 152k;
    `chunk` caps them); the sums do not depend on the chunk size."""
    # only an adapter on the LM head itself changes it ("all-linear" leaves it out); a toggle costs ~6 ms per chunk
    head_adapted = isinstance(model.get_output_embeddings(), LoraLayer)
    reference = model.disable_adapter if head_adapted else contextlib.nullcontext
    per_row = []
    for sl in vocab_chunks(len(h), model.get_output_embeddings().out_features, 10, cap=chunk or 512):
        logits = _logits(model, h[sl])                                     # (n, V)
        with reference():
            ref_logits = _logits(model, h_ref[sl])                         # (n, V)
        per_row.append(torch.stack(full_kl(logits, ref_logits, temperature)))   # (3, n) reverse, forward, entropy
    per_row = torch.cat(per_row, 1) if per_row else torch.zeros(3, 0)   # (3, M)
    # summed 512 rows at a time in float32, then in float64: the order these metrics have always been summed in
    sums = torch.zeros(3, dtype=torch.float64)
    for blk in per_row.split(512, 1):
        sums += torch.stack([row.sum() for row in blk]).double().cpu()
    reverse, forward, entropy = (sums / max(len(h), 1)).tolist()
    return {"token_rkl": reverse, "token_fkl": forward, "entropy": entropy}


@torch.no_grad()
def token_kl_stats(model, input_ids, attention_mask, prompt_len, completion_mask, temperature=1.0, chunk=None):
    """kl_stats_from_hidden with its own two decoder passes (policy and reference) over the given rows."""
    keep = completion_mask.bool()
    h = _completion_hidden(model, input_ids, attention_mask, prompt_len)[keep]             # (M, H) real tokens
    with model.disable_adapter():
        h_ref = _completion_hidden(model, input_ids, attention_mask, prompt_len)[keep]
    return kl_stats_from_hidden(model, h, h_ref, temperature, chunk)


# ---------------------------------------------------------------------------------------------------------
# Off-policy snapshots (--async-level N): the behaviour policy is the LoRA state of N optimizer steps ago
# ---------------------------------------------------------------------------------------------------------
def adapter_snapshot(model):
    """CPU copy of the trainable (LoRA) tensors: ~40M floats for a 7B at r=16, so keeping N of them is cheap."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def swapped_adapter(model, snapshot, live=None):
    """Temporarily load `snapshot` into the live LoRA tensors; the live values are restored bit-exactly on exit.
    `live`: a snapshot of the current adapters if the caller already has one (saves a device-to-CPU copy)."""
    params = dict(model.named_parameters())
    live = adapter_snapshot(model) if live is None else live
    with torch.no_grad():
        for n, t in snapshot.items():
            params[n].copy_(t)
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, t in live.items():
                params[n].copy_(t)


# ---------------------------------------------------------------------------------------------------------
# --rollout-bf16-copy: sample from a plain bf16 copy of the base weights with the LoRA merged in
# ---------------------------------------------------------------------------------------------------------
# Batched decoding with bnb 4-bit weights dequantises every matrix at every token (peer-notes §6.5: ~2× slower than
# 16-bit) and LoRA adds two matmuls per layer. The copy costs 2 B/parameter (7B: ~15 GB) and a dequantise + B·A per
# layer per step; it samples from bf16(W_4bit + s·B·A), π_θ up to bf16 rounding. The loss's log-probs are unchanged.
def rollout_copy(model, dtype=torch.bfloat16):
    """A plain HF model (no quantisation, no adapters) with the base weights of `model` dequantised to `dtype`;
    sync_rollout_copy writes the current LoRA into it. It never trains (requires_grad off)."""
    base = model.get_base_model()
    device = base.get_input_embeddings().weight.device
    with torch.device(device):
        copy = AutoModelForCausalLM.from_config(base.config, dtype=dtype)
    copy.generation_config = base.generation_config
    src = dict(base.named_modules())
    with torch.no_grad():
        for name, mod in copy.named_modules():
            s = src[name].get_base_layer() if isinstance(src[name], LoraLayer) else src[name]
            for n, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
                t.copy_(dequantize_module_weight(s) if n == "weight" else getattr(s, n))
    return sync_rollout_copy(copy.eval().requires_grad_(False), model)


@torch.no_grad()
def sync_rollout_copy(copy, model):
    """Every LoRA'd linear of the copy <- dequant(W_base) + the active adapters' delta (so inside swapped_adapter it
    is the behaviour policy's). In-place copies: a compiled decode step keeps pointing at the same tensors."""
    weights = dict(copy.named_parameters())
    for name, mod in model.get_base_model().named_modules():
        if isinstance(mod, LoraLayer):
            w = dequantize_module_weight(mod.get_base_layer()).to(torch.float32, copy=True)   # never the base itself
            for adapter in [] if mod.disable_adapters else mod.active_adapters:
                w += mod.get_delta_weight(adapter).float()
            weights[name + ".weight"].copy_(w)
    return copy
