"""Memory (issues 16 and 19): vocabulary-sized tensors stay within their budget at a real vocabulary, measured as the
peak RSS of a fresh process (Linux only: /proc/self/status VmHWM, reset through /proc/self/clear_refs)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from policy import VOCAB_CHUNK_BYTES, vocab_chunks

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = os.path.exists("/proc/self/clear_refs")

# A Llama with Qwen2.5-7B's vocabulary (152,064) on an 8-wide decoder: the LM head is the only big thing in it.
VOCAB_PEAKS = r"""
import json, re, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
import policy
def hwm():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
def reset():
    open("/proc/self/clear_refs", "w").write("5")
    return hwm()
torch.manual_seed(0)
torch.set_num_threads(1)
model = LlamaForCausalLM(LlamaConfig(vocab_size=152064, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
h = torch.randn(256, 8)                                               # 3 chunks of <= 88 rows
base = reset()
policy.kl_stats_from_hidden(model, h, h + 0.1 * torch.randn_like(h))
diag = hwm() - base
ids = torch.randint(0, 152064, (12, 40))             # 12 rows x (8 prompt + 32 completion) tokens: 147 + 147 + 90
base = reset()
policy.token_logprobs(model, ids, torch.ones_like(ids), 8).sum().backward()
grad = hwm() - base
with torch.no_grad():                                # the same values as one 384-row chunk (~0.2 GiB a tensor)
    chunked = policy.token_logprobs(model, ids, torch.ones_like(ids), 8)
    policy.VOCAB_CHUNK_BYTES = 2**40
    same = torch.equal(chunked, policy.token_logprobs(model, ids, torch.ones_like(ids), 8))
print(json.dumps({"diagnostics": diag, "grad": grad, "same": same}))
"""


def test_vocab_chunks_cover_the_rows_within_the_byte_budget():
    for vocab, tensors in [(152064, 10), (152064, 6), (128256, 10), (49152, 6), (300, 6)]:
        for n in (1, 5, 64, 1000, 1024, 4097):
            sl = vocab_chunks(n, vocab, tensors)
            assert [i for s in sl for i in range(s.start, s.stop)] == list(range(n))
            rows = max(s.stop - s.start for s in sl)
            assert rows <= 512 and (rows <= 64 or rows * tensors * 4 * vocab <= VOCAB_CHUNK_BYTES)
            assert n < 4 or min(s.stop - s.start for s in sl) >= 4   # every chunk row-invariant (>= 4 rows)
    assert vocab_chunks(1024, 300, 6) == [slice(0, 512), slice(512, 1024)]    # small vocabularies: 512 rows as before
    assert vocab_chunks(960, 300, 6) == [slice(0, 512), slice(512, 960)]
    assert vocab_chunks(514, 300, 6) == [slice(0, 257), slice(257, 514)]      # a 2-row tail is merged
    assert vocab_chunks(1024, 152064, 10)[:2] == [slice(0, 88), slice(88, 176)]    # 88 rows fit in 0.5 GiB


def test_kl_diagnostics_do_not_depend_on_the_chunk(model_dir):
    from policy import kl_stats_from_hidden, load_policy
    torch.manual_seed(0)
    model, _ = load_policy(model_dir, lora_r=4, lora_alpha=8)
    h = torch.randn(700, 64)
    h_ref = h + 0.3 * torch.randn_like(h)
    got = {c: kl_stats_from_hidden(model, h, h_ref, chunk=c) for c in (None, 64, 100, 512)}
    assert got[None]["token_rkl"] > 0 and all(v == got[None] for v in got.values())      # bit-identical


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/status")
def test_vocabulary_tensors_stay_within_half_a_gib_at_a_152k_vocabulary():
    """Measured here before the byte budget (512-row chunks at any vocabulary): diagnostics 1.16 GiB, log-prob
    backward 0.88 GiB; with it: 0.40 and 0.35 GiB."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": HERE}   # freed tensors leave RSS
    out = subprocess.run([sys.executable, "-c", VOCAB_PEAKS], capture_output=True, text=True, env=env, cwd=HERE)
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.1 * 2**30 < peaks["diagnostics"] < 0.6 * 2**30, peaks
    assert 0.1 * 2**30 < peaks["grad"] < 0.6 * 2**30, peaks
    assert peaks["same"], "chunked log-probs differ from one chunk at a 152k vocabulary"


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/status")
def test_gpu_check_small_extrapolates_to_the_direct_measurement_and_writes_the_report(tmp_path):
    """`gpu_check.py --small`, the GPU check's code path at CPU size: the memory model (1 and 2 layers, 1 and 2 short
    rows -> full depth and shape) against the same phases measured directly at full depth (4 layers) and shape, then
    bench.py, into one markdown report."""
    from tools import gpu_check
    report = tmp_path / "gpu-check.md"
    assert gpu_check.main(["--small", "--device", "cpu", "--cache", str(tmp_path), "--out", str(report)]) == 0
    text = report.read_text()
    errors = dict(re.findall(r"^\| (\S+) \| \d+ MiB \| \d+ MiB \| ([-+]\d+)% \|$", text, re.M))
    assert set(errors) == {"static", "generate", "no-grad", "grad", "diagnostics"}, text
    assert all(abs(int(e)) <= 15 for e in errors.values()), text       # measured here: within 5%
    assert re.search(r"^\| ours \| [0-9.]+ \|", text, re.M) and "bench.py --model" in text, text


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/status")
def test_gpu_check_4bit_static_grows_by_a_layers_nf4_weights_lora_and_adamw(tmp_path):
    """A 4-bit layer's static memory, read as gpu_check reads it (one worker: warm-up, then 1 and 2 layers), against
    arithmetic from the config: NF4 packs two weights a byte, LoRA r = 16 on every linear keeps its fp32 weights and
    AdamW's two moments. Before measure() released the freed pages of the previous pass, a base that held them made
    the growth ~30% of this (3.4 of 11.5 MiB a layer at this size)."""
    from tools import gpu_check
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=1024, intermediate_size=4096,
               num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2, vocab_size=8192,
               max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-6)
    json.dump(cfg, open(tmp_path / "mid.json", "w"))
    h, i, kv = 1024, 4096, 2 * 1024 // 8
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]             # q k v o gate up down
    layer = sum(a * b / 2 + 3 * 4 * 16 * (a + b) for a, b in linears)            # NF4 + LoRA weights, exp_avg(_sq)
    spec = dict(four_bit=True, dtype="bf16", device="cpu", threads=1, probes=[])
    one, two = gpu_check.run_worker(*[{**spec, "folder": gpu_check.random_model(str(tmp_path / "mid.json"), layers,
                                                                                 str(tmp_path))} for layers in (1, 2)])
    for run in (one, two):                                  # what is live cannot read less than the live tensors
        assert run["static"] >= 0.98 * run["tensor_bytes"], run
    assert 0.97 * layer < two["tensor_bytes"] - one["tensor_bytes"] < 1.06 * layer   # + absmax, norms: ~2.5%
    assert 0.9 * layer < two["static"] - one["static"] < 1.15 * layer, (two["static"] - one["static"]) / layer


def test_gpu_check_lifts_a_static_read_below_its_tensors_and_every_phase_with_it():
    """A cached run whose base held reused pages: static below its tensors' bytes. The table lifts static to them and
    every part by the same amount (they were read against the same base); a run at or above them is left as is."""
    from tools import gpu_check
    low = {"static": 10, "tensor_bytes": 25, "probes": [{"phase": "grad", "rows": 1, "parts": {"decoder": 40,
                                                                                             "head": 30}}]}
    lifted = gpu_check.at_least_tensor_bytes(low)
    assert lifted["static"] == 25 and lifted["probes"][0]["parts"] == {"decoder": 55, "head": 45}
    assert low["static"] == 10 and low["probes"][0]["parts"]["decoder"] == 40          # the cached run untouched
    ok = {**low, "static": 30}
    assert gpu_check.at_least_tensor_bytes(ok) is ok


# ---------------------------------------------------------------------------------------------------------
# Only the LM head stays fp32 under 4-bit; the no-grad rows come from a budget; the presets' learning rate
# ---------------------------------------------------------------------------------------------------------
def untied_copy(model_dir, out):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_4bit_bf16_keeps_the_lm_head_fp32_and_the_residual_stream_and_kv_cache_bf16(model_dir, tmp_path, tied):
    """prepare_model_for_kbit_training alone upcasts embedding, norms and head: the stream and KV cache were fp32."""
    from policy import load_policy
    model, _ = load_policy(model_dir if tied else untied_copy(model_dir, str(tmp_path / "m")), load_in_4bit=True,
                           dtype="bf16")
    base = model.get_base_model()
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    assert head.weight.dtype == torch.float32 and (embedding.weight is head.weight) == tied
    assert embedding.weight.dtype == (torch.float32 if tied else torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for n, p in base.named_parameters() if "norm" in n)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)     # LoRA
    with torch.no_grad():
        out = model(input_ids=torch.randint(3, 290, (2, 7)), use_cache=True, output_hidden_states=True)
    assert all(h.dtype == torch.bfloat16 for h in out.hidden_states)
    assert out.past_key_values.layers[0].keys.dtype == torch.bfloat16 and out.logits.dtype == torch.float32


def test_4bit_fp32_values_are_those_of_prepare_model_for_kbit_training_alone(model_dir, monkeypatch):
    import policy
    ids = torch.randint(3, 290, (3, 12))
    got = {}
    for name in ("ours", "peft"):
        if name == "peft":
            monkeypatch.setattr(policy, "fp32_head_only", lambda base, dtype: None)
        torch.manual_seed(0)
        model, _ = policy.load_policy(model_dir, load_in_4bit=True, dtype="fp32")
        with torch.no_grad():
            got[name] = policy.token_logprobs(model, ids, torch.ones_like(ids), 4)
    assert torch.equal(got["ours"], got["peft"])


def test_nograd_chunk_rows_are_whole_groups_within_the_budget():
    from policy import VOCAB_CHUNK_BYTES, nograd_chunk_rows
    per_token, seq = 1000, 100                                    # 0.1 MB per row
    for free_mb, want in [(-1, 5), (0.7, 5), (1, 10), (2.4, 20), (10_000, 255)]:   # at least one group, at most n
        rows = nograd_chunk_rows(255, 5, seq, per_token, VOCAB_CHUNK_BYTES + free_mb * 1e6)
        assert rows == want and rows % 5 == 0


def test_memory_budget_sets_the_no_grad_rows_and_changes_no_value(model_dir, tmp_path, monkeypatch):
    """Also: train.py resets the peak-memory counter once per step (so peak_mem_gb is each step's own peak)."""
    import policy
    import train
    seen, chunks, resets = [], policy.logprobs_in_chunks, []

    def recording(model, ro, rows, *args, **kwargs):
        seen.append(rows)
        return chunks(model, ro, rows, *args, **kwargs)
    monkeypatch.setattr(policy, "logprobs_in_chunks", recording)
    monkeypatch.setattr(policy, "reset_peak_memory", lambda: resets.append(1))
    small = ["--model", model_dir, "--steps", "2", "--prompts-per-step", "3", "--group-size", "2",
             "--max-new-tokens", "4", "--eval-n", "4", "--eval-every", "0", "--lr", "0.05", "--kl", "k1-in-reward"]
    recs = {}
    for budget in (None, "0.000001"):
        out = tmp_path / str(budget)
        assert train.main(small + ["--out", str(out)] + (["--memory-budget-gb", budget] if budget else [])) == 0
        recs[budget] = [{k: v for k, v in json.loads(line).items() if not k.startswith("time_") and
                         k not in ("tokens_per_s", "peak_mem_gb")} for line in open(out / "metrics.jsonl")]
    assert [len(rows) for rows in seen] == [1, 1, 3, 3]                  # all 6 rows at once, then one group (2 rows)
    assert recs[None] == recs["0.000001"]
    assert len(resets) == 4                                              # 2 runs x 2 steps


def test_peak_memory_reads_the_cuda_reserve_not_the_allocated_bytes(monkeypatch):
    import policy
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2**30)
    assert policy.peak_memory_gb() == 3.0


def test_presets_train_lora_at_ten_times_the_papers_full_fine_tuning_lr():
    import train
    for preset in ("paper-onpolicy", "paper-async"):
        assert train.parse_config(["--preset", preset]).lr == 1e-5
        assert train.parse_config(["--preset", preset, "--lr", "1e-6"]).lr == 1e-6       # the paper's, one flag
