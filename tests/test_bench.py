"""bench.py and the speed levers (offline, CPU): the bench table and JSON, the bf16 compute path, exact KL diagnostics
from the passes' own hidden states, --diag-every, and the bf16 rollout copy's merge (its CUDA-only flag refuses here)."""
import json
import math
import os
import zlib

import pytest
import torch

from tools import bench
import policy
import train
from policy import (adapter_snapshot, kl_stats_from_hidden, load_policy, logprobs_in_chunks, rollout, rollout_copy,
                    swapped_adapter, sync_rollout_copy, token_kl_stats, token_logprobs)

SMALL = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "3", "--micro-batch-size", "4",
         "--max-new-tokens", "4", "--eval-n", "4", "--lr", "0.05"]


@pytest.fixture
def varied_reward(monkeypatch):
    monkeypatch.setattr(train, "reward", lambda name, text, ex: float(zlib.crc32(text.encode()) % 2))


def train_records(out):
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["type"] == "train"]


def perturbed_policy(model_dir, **kw):
    """A policy whose LoRA is not zero, so π_θ != π_ref."""
    torch.manual_seed(0)
    model, tok = load_policy(model_dir, lora_r=4, lora_alpha=8, **kw)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------------------
# bench.py
# ---------------------------------------------------------------------------------------------------------
def test_bench_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--no-trl", "--levers", "none", "--repeats", "1", "--steps", "2", "--warmup", "0", "--prompts",
                       "1", "--group-size", "2", "--length", "5", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("| arm"))
    for col in ("s/step min", "median", "max", "generate", "no-grad", "fwd+bwd", "optimizer", "gen tok/s", "peak GB",
                "TRL / arm"):
        assert f" {col} |" in header, col
    assert "| ours |" in text
    ours = json.load(open(out))["summary"]["ours"]
    assert ours["n_steps"] == 2 and ours["completion_len"] == 5                      # exactly L tokens, EOS masked
    assert ours["step_min"] <= ours["step_median"] <= ours["step_max"]
    parts = sum(ours[k] for k in ("generate", "no_grad", "policy", "optimizer"))
    assert parts == pytest.approx(ours["step_median"], rel=0.5) and ours["gen_tokens_per_s"] > 0
    assert ours["peak_mem_gb"] > 0


def test_bench_refuses_cuda_levers_on_a_cpu():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench.main(["--device", "cpu", "--levers", "bf16-copy", "--no-trl"])


# ---------------------------------------------------------------------------------------------------------
# The levers in train.py / policy.py
# ---------------------------------------------------------------------------------------------------------
def test_bf16_training_steps_on_cpu(model_dir, tmp_path, monkeypatch, varied_reward):
    seen, load = {}, policy.load_policy

    def capture(*args, **kwargs):
        model, tok = load(*args, **kwargs)
        seen["model"], seen["before"] = model, {n: p.detach().clone() for n, p in model.named_parameters()}
        return model, tok
    monkeypatch.setattr(policy, "load_policy", capture)
    assert train.main(["--model", model_dir, "--out", str(tmp_path), *SMALL, "--dtype", "bf16", "--kl", "k3-in-both"]) == 0
    recs = train_records(tmp_path)
    assert len(recs) == 2 and all(isinstance(v, str) or math.isfinite(v) for r in recs for v in r.values())
    assert "token_rkl" in recs[0] and recs[1]["grad_norm"] > 0
    model = seen["model"]
    assert model.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(not torch.equal(p.detach(), seen["before"][n]) for n, p in lora.items())


def test_diag_every_n_logs_the_exact_kls_on_every_nth_step(model_dir, tmp_path, varied_reward):
    assert train.main(["--model", model_dir, "--out", str(tmp_path), *SMALL, "--steps", "3", "--diag-every", "2"]) == 0
    recs = train_records(tmp_path)
    assert ["token_rkl" in r for r in recs] == [True, False, True] and recs[0]["token_rkl"] == 0
    assert all(r["time_step"] == pytest.approx(r["time_generate"] + r["time_no_grad"] + r["time_policy"]
                                               + r["time_optimizer"]) for r in recs)


@pytest.mark.parametrize("dropout", [False, True])
def test_kl_stats_from_the_passes_hidden_states_equal_their_own_passes(model_dir, dropout):
    model, tok = perturbed_policy(model_dir)
    ro = rollout(model, tok, ["1+2=", "30+4="], 3, 5, 1.0, seed=0)
    ids, attn, P, mask = ro["input_ids"], ro["attention_mask"], ro["prompt_len"], ro["completion_mask"]
    expected = token_kl_stats(model, ids[:4], attn[:4], P, mask[:4])
    with model.disable_adapter():                           # as train.py: chunks of 3 rows, the first 4 kept
        _, h_ref = logprobs_in_chunks(model, ro, [slice(0, 3), slice(3, 6)], 1.0, keep_hidden=4)
    if dropout:                                             # the no-grad policy pass
        _, h = logprobs_in_chunks(model, ro, [slice(0, 6)], 1.0, keep_hidden=4)
    else:                                                   # the grad passes
        model.train()
        h = torch.cat([token_logprobs(model, ids[sl], attn[sl], P, keep_hidden=max(0, 4 - sl.start))[1]
                       for sl in (slice(0, 3), slice(3, 6))])
    got = kl_stats_from_hidden(model, h, h_ref)
    assert expected["token_rkl"] > 0 and got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("four_bit", [False, True])
def test_rollout_copy_is_the_policy_with_the_lora_merged_in(model_dir, four_bit):
    """The merge that --rollout-bf16-copy does on CUDA, checked here in fp32: the copy's logits are π_θ's, and inside
    swapped_adapter (--async-level) a sync gives the behaviour policy's."""
    model, tok = perturbed_policy(model_dir, load_in_4bit=four_bit)
    copy = rollout_copy(model, dtype=torch.float32)
    ids = torch.randint(3, 200, (2, 9))
    logits = lambda m: m(input_ids=ids).logits.float()
    with torch.no_grad():
        assert torch.allclose(logits(copy), logits(model), atol=1e-4)
        old = adapter_snapshot(model)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
        assert not torch.allclose(logits(copy), logits(model), atol=1e-2)
        with swapped_adapter(model, old):
            assert torch.allclose(logits(sync_rollout_copy(copy, model)), logits(model), atol=1e-4)
        assert torch.allclose(logits(sync_rollout_copy(copy, model)), logits(model), atol=1e-4)
        bf16 = rollout_copy(model)
        assert bf16.dtype == torch.bfloat16 and torch.allclose(logits(bf16), logits(model), atol=0.1)
    assert not any(p.requires_grad for p in copy.parameters())


def test_rollout_bf16_copy_refuses_a_cpu(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--model", model_dir, "--out", str(tmp_path), *SMALL, "--rollout-bf16-copy", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "needs a CUDA device" in err[0]


@pytest.mark.parametrize("four_bit", [False, True])
def test_share_prompt_gives_the_same_logprobs_and_gradients(model_dir, four_bit):
    model, tok = perturbed_policy(model_dir, load_in_4bit=four_bit)
    model.train()
    ro = rollout(model, tok, ["1+2=", "30+4=", "5+55="], 3, 5, 1.0, seed=0)
    args = ro["input_ids"], ro["attention_mask"], ro["prompt_len"]
    lora = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for g in (1, 3):
        lp = token_logprobs(model, *args, group_size=g)
        grads = torch.autograd.grad((lp * ro["completion_mask"]).sum(), lora)
        out[g] = lp.detach(), grads
    assert torch.allclose(out[1][0], out[3][0], atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(out[1][1], out[3][1]))
    with torch.no_grad():                                   # rows that do not start a group: the plain pass
        assert torch.equal(token_logprobs(model, *(a[1:7] if i < 2 else a for i, a in enumerate(args)), group_size=3),
                           token_logprobs(model, *(a[1:7] if i < 2 else a for i, a in enumerate(args))))
