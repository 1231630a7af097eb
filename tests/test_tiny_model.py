"""The shipped tiny model (assets/tiny-arith) loads offline and is a "solves some, not all" arith base model."""
import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tools import tiny_model as tm

ASSET = pathlib.Path(__file__).resolve().parent.parent / "assets" / "tiny-arith"


@pytest.fixture(scope="module")
def shipped():
    return AutoTokenizer.from_pretrained(ASSET), AutoModelForCausalLM.from_pretrained(ASSET)


def test_shipped_folder_is_small():
    names = {p.name for p in ASSET.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in ASSET.iterdir()) < 5 * 2**20


def test_tokenizer_round_trip_specials_and_left_padding(shipped):
    tok, model = shipped
    assert tok.padding_side == "left"
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>" and tok.pad_token_id != tok.eos_token_id
    assert len(tok) <= model.config.vocab_size
    for text in ["12+34=46", "What is 7 + 8?\nThe answer is 15.", "héllo wörld, ünïcode 😀  tabs\tand spaces"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.convert_ids_to_tokens(tok("1234", add_special_tokens=False)["input_ids"]) == ["1", "2", "3", "4"]
    batch = tok(["1+2=", "12+34=56"], padding=True, add_special_tokens=False, return_tensors="pt")
    assert batch["input_ids"][0, 0] == tok.pad_token_id and batch["attention_mask"][0, 0] == 0
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]


def test_chat_template_renders(shipped):
    tok, _ = shipped
    prompt = tok.apply_chat_template([{"role": "user", "content": "3+4="}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"
    assert tm.build_prompt(tok, "3+4=") == prompt
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.unk_token_id not in ids


def test_shipped_model_solves_some_but_not_all(shipped):
    tok, model = shipped
    test = tm.arith_examples("test", n=60)
    greedy = tm.accuracy(model, tok, test, temperature=0.0)
    assert 0.10 < greedy < 0.95, greedy
    ood = tm.accuracy(model, tok, tm.arith_examples("test", n=30, ood=True), temperature=0.0)
    assert ood < greedy


def test_build_random_model_loads(tmp_path):
    out = tm.build_random_model(tmp_path / "rand", seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    assert tok.padding_side == "left" and model.config.num_hidden_layers == 1
    enc = tok([tm.build_prompt(tok, "1+1="), tm.build_prompt(tok, "10+20=")], return_tensors="pt", padding=True,
              add_special_tokens=False)
    out_ids = model.generate(**enc, do_sample=False, max_new_tokens=3, pad_token_id=tok.pad_token_id)
    assert out_ids.shape[0] == 2 and enc["input_ids"].shape[1] < out_ids.shape[1] <= enc["input_ids"].shape[1] + 3
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()
