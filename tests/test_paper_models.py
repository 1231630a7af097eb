"""The paper's three models, as tiny random replicas: prompts, stop tokens and masks right for each, through train.py.

Each replica keeps its model's config class and every quirk that decides where a completion ends (shared/docs:
paper-models.md), built like tiny_model.py builds the shipped model (a locally trained byte-level BPE, a random
model) with only the sizes shrunk:
  qwen2.5-base    Qwen2ForCausalLM, q/k/v biases, untied; eos = pad = <|endoftext|> only, yet a ChatML template
                  (with a default system line) whose turns end with <|im_end|>: the model that never stopped.
  llama3.1-inst   LlamaForCausalLM, llama3 rope scaling, untied; three eos ids (<|end_of_text|>, <|eom_id|>,
                  <|eot_id|>) in config and generation_config; no pad token; the template writes BOS itself and the
                  tokenizer would add a second; generation_config samples at T = 0.6, top-p 0.9.
  qwen3-inst      Qwen3ForCausalLM, q/k norms, head_dim ≠ hidden / heads, tied; eos <|im_end|> (+ <|endoftext|> in
                  generation_config), pad <|endoftext|>; top-k 20 in generation_config. The hybrid Qwen3's template
                  takes enable_thinking (tested on the tokenizer alone).
To see a completion stop at the end-of-turn token, the LM-head row of that token is scaled up so a random model emits
it at random positions; on the old code (stop ids = eos only) qwen2.5-base's completions ran on past it.
"""
import json
import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

import policy
import tasks
import train

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are Qwen, "
          "created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
          "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN3 = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN3_HYBRID = QWEN3 + ("{% if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}"
                        "<think>\n\n</think>\n\n{% endif %}")
LLAMA3 = ("{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
          "Today Date: 26 Jul 2024\n\n<|eot_id|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
          "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
TEXTS = ["What is 12 + 7? Answer with just the number. 19", "The answer is 42.", "Let us think step by step."]


def bpe(specials, **kw):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if "bos_token" in kw:                            # Llama 3's tokenizer adds BOS to every encoding
        bos = kw["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **kw)


def build(kind, out):
    """Save a tiny random replica of one of the paper's models into `out`; -> out."""
    if kind == "qwen2.5-base":
        tok = bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        tok.chat_template = CHATML
        eos = tok.convert_tokens_to_ids("<|endoftext|>")
        cfg = Qwen2Config(vocab_size=len(tok), tie_word_embeddings=False, rope_theta=1e6, eos_token_id=eos,
                          bos_token_id=eos, pad_token_id=None, **SIZE)
        gen = dict(eos_token_id=eos, bos_token_id=eos)
    elif kind == "llama3.1-inst":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                    "<|eom_id|>"]
        tok = bpe(specials, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")      # no pad token
        tok.chat_template = LLAMA3
        eos = tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
        cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, eos_token_id=eos, bos_token_id=0,
                          rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=64), **SIZE)
        gen = dict(eos_token_id=eos, bos_token_id=0, do_sample=True, temperature=0.6, top_p=0.9)
    else:
        tok = bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tok.chat_template = QWEN3
        im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        cfg = Qwen3Config(vocab_size=len(tok), tie_word_embeddings=True, head_dim=32, eos_token_id=im_end,
                          pad_token_id=eot, **SIZE)                      # 4 heads × 32 = 128 ≠ hidden 64
        gen = dict(eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=True, temperature=0.7, top_p=0.8, top_k=20)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():                            # emit the end-of-turn token at random positions (see docstring)
        turn_end = tasks.end_of_turn_ids(tok)[0]
        model.get_output_embeddings().weight[turn_end] *= 40
    for k, v in gen.items():
        setattr(model.generation_config, k, v)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


KINDS = ("qwen2.5-base", "llama3.1-inst", "qwen3-inst")
TURN_END = {"qwen2.5-base": "<|im_end|>", "llama3.1-inst": "<|eot_id|>", "qwen3-inst": "<|im_end|>"}
STOPS = {"qwen2.5-base": {"<|endoftext|>", "<|im_end|>"}, "llama3.1-inst": {"<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"},
         "qwen3-inst": {"<|im_end|>", "<|endoftext|>"}}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-models")
    return {k: build(k, str(root / k)) for k in KINDS}


# ---------------------------------------------------------------------------------------------------------
# Prompts and stop ids
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_replica_keeps_the_quirks(replicas, kind):
    cfg = json.load(open(os.path.join(replicas[kind], "config.json")))
    assert cfg["architectures"][0] == {"qwen2.5-base": "Qwen2ForCausalLM", "llama3.1-inst": "LlamaForCausalLM",
                                       "qwen3-inst": "Qwen3ForCausalLM"}[kind]
    assert cfg["tie_word_embeddings"] == (kind == "qwen3-inst")
    if kind == "qwen3-inst":
        assert cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]
    if kind == "llama3.1-inst":
        assert cfg["rope_parameters"]["rope_type"] == "llama3" and len(cfg["eos_token_id"]) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_stop_ids_are_the_eos_ids_and_the_templates_end_of_turn(replicas, kind):
    model, tok = policy.load_policy(replicas[kind])
    assert tok.convert_ids_to_tokens(tasks.end_of_turn_ids(tok)) == [TURN_END[kind]]
    assert set(tok.convert_ids_to_tokens(policy.stop_token_ids(model, tok))) == STOPS[kind]


def test_prompt_formats_and_single_bos(replicas):
    _, tok = policy.load_policy(replicas["qwen2.5-base"])
    q = "What is 12 + 7?"
    assert tasks.build_prompt(tok, q, "plain") == q                            # a base model's plain prompt
    chat = tasks.build_prompt(tok, q)                                           # auto: the template exists
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    _, llama = policy.load_policy(replicas["llama3.1-inst"])
    ro = policy.rollout(*policy.load_policy(replicas["llama3.1-inst"]), [tasks.build_prompt(llama, q)], 1, 2, 0.0)
    bos = llama.convert_tokens_to_ids("<|begin_of_text|>")
    assert (ro["input_ids"][0] == bos).sum() == 1                                # the template's BOS, not two
    hybrid = policy.load_policy(replicas["qwen3-inst"])[1]
    hybrid.chat_template = QWEN3_HYBRID
    assert tasks.build_prompt(hybrid, q).endswith("<think>\n\n</think>\n\n")      # enable_thinking=False by default
    assert tasks.build_prompt(hybrid, q, thinking=True).endswith("assistant\n")
    with pytest.raises(tasks.TaskError):
        tasks.build_prompt(hybrid, q, "chatml")


# ---------------------------------------------------------------------------------------------------------
# A completion that ends its turn stops there, and its mask ends there
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_completion_stops_at_the_end_of_turn_and_the_mask_ends_there(replicas, kind):
    model, tok = policy.load_policy(replicas[kind])
    prompts = [tasks.build_prompt(tok, f"What is {a} + 7?") for a in range(6)]
    ro = policy.rollout(model, tok, prompts, 4, 12, 1.0, seed=0)
    comp, mask = ro["completion_ids"], ro["completion_mask"]                   # (N, C)
    turn_end = tok.convert_tokens_to_ids(TURN_END[kind])
    stopped = 0
    for ids, m, trunc in zip(comp, mask, ro["truncated"]):
        hits = (ids == turn_end).nonzero()
        if len(hits) and hits[0].item() < comp.shape[1] - 1:                   # ended its turn before the limit
            t = hits[0].item()
            stopped += 1
            assert m[:t + 1].tolist() == [1.0] * (t + 1) and m[t + 1:].sum() == 0   # the stop token counts, no more
            assert not trunc
    assert stopped >= 4                                                        # the check above really ran
    assert mask.sum(1).float().mean() < 10                                      # nothing runs on to the limit


@pytest.mark.parametrize("kind,fourbit", [(k, False) for k in KINDS] + [("qwen2.5-base", True), ("qwen3-inst", True),
                                                                        ("llama3.1-inst", True)])
def test_train_py_runs_each_architecture_and_stops_at_the_turn(replicas, tmp_path, kind, fourbit, monkeypatch):
    monkeypatch.setattr(train, "reward", lambda name, text, ex: float(len(text) % 2))
    argv = ["--model", replicas[kind], "--out", str(tmp_path / "run"), "--steps", "2", "--prompts-per-step", "2",
            "--group-size", "4", "--max-new-tokens", "12", "--eval-n", "4", "--eval-every", "0", "--lr", "0.001",
            "--kl", "k3-in-loss", *(["--load-in-4bit"] if fourbit else [])]
    assert train.main(argv) == 0
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in steps] == [0, 1] and all(r["grad_norm"] > 0 for r in steps)
    assert steps[0]["completion_len"] < 10 and steps[0]["truncated_frac"] < 0.5    # the base stops at its turn's end
