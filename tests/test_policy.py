"""policy.py on a tiny random Llama (offline, CPU): loading, rollouts, log-probs, reference, snapshots."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from policy import (adapter_snapshot, load_policy, merge_rollouts, rollout, swapped_adapter, token_kl_stats,
                   token_logprobs)


@pytest.fixture
def policy(model_dir):
    torch.manual_seed(0)
    return load_policy(model_dir, lora_r=4, lora_alpha=8)


def chat(tok, questions):
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions]


def naive_logprobs(model, ro, temperature=1.0):
    """Oracle: full (N, T, V) logits from the model's own forward, log_softmax, gather."""
    attn = ro["attention_mask"]
    logits = model(input_ids=ro["input_ids"], attention_mask=attn,
                   position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits.float()
    P = ro["prompt_len"]
    return torch.log_softmax(logits[:, P - 1:-1] / temperature, -1).gather(-1, ro["completion_ids"][..., None])[..., 0]


def train_step(model, ro, lr=0.05):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    lp = token_logprobs(model, ro["input_ids"], ro["attention_mask"], ro["prompt_len"])
    loss = -(lp * ro["completion_mask"]).sum()
    loss.backward()
    opt.step()


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def test_load_policy_lora_everywhere_and_left_padding(policy):
    model, tok = policy
    assert tok.padding_side == "left" and tok.pad_token is not None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_load_policy_missing_folder_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found") as e:
        load_policy(str(tmp_path / "no" / "such" / "model"))
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="adapter"):
        load_policy(str(tmp_path), adapter=str(tmp_path / "nothing"))


def test_4bit_policy_trains_on_cpu(model_dir):
    """QLoRA on CPU: gradients reach every LoRA tensor and do not change after an eval-mode generate (bitsandbytes
    would otherwise repack the weights into a layout whose matmul has no backward)."""
    def lora_grads(generate_first):
        torch.manual_seed(0)
        model, tok = load_policy(model_dir, load_in_4bit=True, lora_r=4, gradient_checkpointing=True)
        assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
        model.eval()
        ro = rollout(model, tok, chat(tok, ["1+2=", "33+4="]), 2, 4, 1.0, seed=0)
        if not generate_first:   # same batch, fresh model (same LoRA init) that never ran an eval forward
            torch.manual_seed(0)
            model, tok = load_policy(model_dir, load_in_4bit=True, lora_r=4, gradient_checkpointing=True)
        model.train()
        lp = token_logprobs(model, ro["input_ids"], ro["attention_mask"], ro["prompt_len"])
        (lp * ro["completion_mask"]).sum().backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    after_eval, fresh = lora_grads(True), lora_grads(False)
    assert all(g is not None and torch.isfinite(g).all() for g in after_eval)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(after_eval, fresh))


def test_saved_adapter_loads_trainable_and_identical(policy, model_dir, tmp_path):
    model, tok = policy
    train_step(model, rollout(model, tok, chat(tok, ["1+2="]), 2, 4, 1.0, seed=0))
    model.save_pretrained(str(tmp_path / "a"))
    again, _ = load_policy(model_dir, adapter=str(tmp_path / "a"))
    a, b = adapter_snapshot(model), adapter_snapshot(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------------------
def fake_generate(model, monkeypatch, completions, seen=None):
    """Make model.generate append fixed completion tokens (to test the masks); records its kwargs in `seen`."""
    def generate(input_ids, attention_mask, **kw):
        if seen is not None:
            seen.update(kw)
        G = kw.get("num_return_sequences", 1)
        return torch.cat([input_ids.repeat_interleave(G, 0), torch.tensor(completions)], 1)
    monkeypatch.setattr(model, "generate", generate)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_completion_mask_stops_after_first_eos(policy, monkeypatch, pad_is_eos):
    model, tok = policy
    if pad_is_eos:
        tok.pad_token = tok.eos_token                       # SmolLM2 / many base models: pad == eos
    e, p, x = tok.eos_token_id, tok.pad_token_id, 7
    fake_generate(model, monkeypatch, [[x, e, p, p], [e, p, p, p], [x, x, x, x], [x, x, x, e]])
    ro = rollout(model, tok, chat(tok, ["1+2=", "3+4="]), 2, 4, 1.0)
    assert ro["completion_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert ro["truncated"].tolist() == [False, False, True, False]
    assert ro["attention_mask"][:, ro["prompt_len"]:].tolist() == ro["completion_mask"].long().tolist()


def test_rows_are_grouped_by_prompt(policy):
    model, tok = policy
    prompts = chat(tok, ["1+2=", "30+40=", "5+66="])
    ro = rollout(model, tok, prompts, 4, 6, 1.0, seed=0)
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert ro["input_ids"].shape[0] == 12
    for i in range(12):
        assert torch.equal(ro["input_ids"][i, :ro["prompt_len"]], enc["input_ids"][i // 4])
    assert len(ro["texts"]) == 12 and ro["completion_ids"].shape == ro["completion_mask"].shape


def test_rollout_in_chunks_merges_like_one_call(policy):
    """batch_size: separate generate calls, re-padded to one batch, give the same per-row log-probs and masks."""
    model, tok = policy
    prompts = chat(tok, ["1+2=", "10+20= and a much longer question"])
    parts = [rollout(model, tok, [p], 2, 5, 1.0, seed=i) for i, p in enumerate(prompts)]
    merged = merge_rollouts(parts, tok.pad_token_id)
    assert merged["texts"] == parts[0]["texts"] + parts[1]["texts"]
    with torch.no_grad():
        lp = token_logprobs(model, merged["input_ids"], merged["attention_mask"], merged["prompt_len"])
        for i, r in enumerate(parts):
            own, C, m = token_logprobs(model, r["input_ids"], r["attention_mask"], r["prompt_len"]), \
                r["completion_ids"].shape[1], r["completion_mask"]
            assert torch.allclose(lp[2 * i:2 * i + 2, :C] * m, own * m, atol=1e-5)
            assert torch.equal(merged["completion_mask"][2 * i:2 * i + 2, :C], m)
            assert merged["completion_mask"][2 * i:2 * i + 2, C:].sum() == 0
    chunked = rollout(model, tok, prompts * 2, 3, 5, 1.0, seed=0, batch_size=4)    # 3 rows per call: 4 calls
    assert chunked["input_ids"].shape[0] == 12 and len(chunked["texts"]) == 12
    enc = tok(prompts * 2, return_tensors="pt", padding=True)["input_ids"]
    assert all(torch.equal(chunked["input_ids"][i, -chunked["completion_ids"].shape[1] - enc.shape[1]:
                                                -chunked["completion_ids"].shape[1]], enc[i // 3]) for i in range(12))


def test_rollout_is_seeded_and_greedy_at_temperature_zero(policy):
    model, tok = policy
    prompts = chat(tok, ["1+2=", "30+40="])
    a, b = (rollout(model, tok, prompts, 3, 6, 1.0, seed=1) for _ in range(2))
    assert torch.equal(a["input_ids"], b["input_ids"])
    g = rollout(model, tok, prompts, 3, 6, 0.0)
    assert all(torch.equal(g["completion_ids"][i], g["completion_ids"][i - i % 3]) for i in range(6))


def test_true_sampling_ignores_a_truncating_generation_config(policy, monkeypatch):
    model, tok = policy
    base = model.get_base_model()
    with torch.no_grad():
        base.model.norm.weight.zero_()                        # hidden state 0 -> logits 0: uniform over V = 300
    base.generation_config.update(do_sample=True, top_k=1, top_p=0.05, min_p=0.5)   # a checkpoint's defaults
    ro = rollout(model, tok, chat(tok, ["1+2="]), 64, 4, 1.0, seed=0)
    drawn = ro["completion_ids"][:, 0]                        # first token: before any EOS
    assert drawn.unique().numel() > 50                        # top_k=50 (generate's default) could give at most 50
    seen = {}
    fake_generate(model, monkeypatch, [[1, 1]] * 2, seen)
    rollout(model, tok, chat(tok, ["1+2="]), 2, 2, 0.7)
    assert seen["do_sample"] and seen["temperature"] == 0.7 and seen["num_return_sequences"] == 2
    assert (seen["top_k"], seen["top_p"], seen["min_p"], seen["repetition_penalty"]) == (0, 1.0, None, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Log-probabilities, reference policy, exact KL
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_match_full_log_softmax(policy, temperature):
    model, tok = policy
    train_step(model, rollout(model, tok, chat(tok, ["9+9="]), 2, 5, 1.0, seed=3))   # non-zero LoRA B
    ro = rollout(model, tok, chat(tok, ["1+2=", "30+40="]), 3, 6, 1.0, seed=0)
    args = (model, ro["input_ids"], ro["attention_mask"], ro["prompt_len"], temperature)
    lp = token_logprobs(*args, chunk=5)                       # chunks that cut rows in the middle
    assert torch.allclose(lp, naive_logprobs(model, ro, temperature), atol=1e-5)
    assert torch.allclose(lp, token_logprobs(*args, chunk=10_000), atol=1e-6)
    assert not torch.allclose(lp, token_logprobs(model, *args[1:4], 2 * temperature), atol=1e-3)   # T is used
    g1 = torch.autograd.grad(lp.sum(), [p for p in model.parameters() if p.requires_grad])
    g2 = torch.autograd.grad(naive_logprobs(model, ro, temperature).sum(),
                             [p for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))   # checkpointed chunks: same gradient


def test_reference_is_the_base_model_exactly(policy, model_dir):
    model, tok = policy
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    ro = rollout(model, tok, chat(tok, ["1+2=", "30+40="]), 3, 6, 1.0, seed=0)
    args = (ro["input_ids"], ro["attention_mask"], ro["prompt_len"])
    with torch.no_grad():
        base_lp = token_logprobs(base, *args)
        with model.disable_adapter():
            ref_lp = token_logprobs(model, *args)
        pol_lp = token_logprobs(model, *args)
    assert torch.equal(ref_lp, base_lp) and torch.equal(pol_lp, base_lp)        # fresh LoRA: B = 0
    stats = token_kl_stats(model, *args, ro["completion_mask"])
    assert stats["token_rkl"] == 0.0 and stats["token_fkl"] == 0.0 and stats["entropy"] > 0   # KL is 0 at step 0

    train_step(model, ro)
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(token_logprobs(model, *args), base_lp)         # base weights untouched
        assert not torch.allclose(token_logprobs(model, *args), base_lp)
    stats = token_kl_stats(model, *args, ro["completion_mask"])
    assert stats["token_rkl"] > 0 and stats["token_fkl"] > 0


def test_snapshot_swap_restores_the_live_adapter_exactly(policy):
    model, tok = policy
    ro = rollout(model, tok, chat(tok, ["1+2=", "30+40="]), 2, 6, 1.0, seed=0)
    args = (ro["input_ids"], ro["attention_mask"], ro["prompt_len"])
    train_step(model, ro)
    old = adapter_snapshot(model)
    with torch.no_grad():
        old_lp = token_logprobs(model, *args)
    train_step(model, ro)
    live = adapter_snapshot(model)
    with torch.no_grad():
        live_lp = token_logprobs(model, *args)
        with swapped_adapter(model, old):
            assert torch.equal(token_logprobs(model, *args), old_lp)
        assert torch.equal(token_logprobs(model, *args), live_lp)
    now = adapter_snapshot(model)
    assert all(torch.equal(now[k], live[k]) for k in live) and not all(torch.equal(old[k], live[k]) for k in live)
    assert all(t.device.type == "cpu" for t in old.values())
