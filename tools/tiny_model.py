"""Build the tiny "base model" shipped in assets/tiny-arith/ (offline, CPU, a few minutes).

What: a 0.48M-parameter Llama-architecture causal LM (hidden 128, 3 layers) with a byte-level BPE tokenizer (vocab 300,
digits always single tokens, specials <pad> <eos> <unk> <|im_start|> <|im_end|>, left padding, a ChatML-like chat
template). It is trained with plain supervised next-token loss on the completion tokens of the synthetic `arith` task
of tasks.py (prompt = chat template of "{a}+{b}=", completion = "{a+b}<eos>", a, b in [0, 99]).

Why: the project's default `python train.py` must show KL-regularised RL *working* on a 2-core CPU in minutes. That
needs a starting policy that, like a base LLM on MATH, solves some but not all problems, with the right answer at
moderate probability so that T=1 sampling finds it often enough for RL to reinforce it. Two knobs give that:
  * noisy answers: in 25% of training rows one answer digit is random, so the model's answer distribution is spread
    out (T=1 sampling is clearly worse than greedy) while its mode stays the right sum;
  * early stopping: training stops as soon as the T=1 accuracy on a 500-problem slice of the train split (checked
    every 10 steps, mean of the last 3 checks) reaches --target (0.33), i.e. mid-way through learning the carries.
  * a second surface form: every 4th training row (25%) is written "{a} + {b} =" (tasks.py `arith_spaced`). RL then
    trains on "{a}+{b}=" only, so the spaced form is an out-of-domain split that starts neither at 0 nor saturated
    (greedy 0.648 vs 0.676 in domain) and that in-domain RL moves (one default run: greedy 0.648 -> 0.536, T=1
    0.306 -> 0.394), which is what comedy.py measures per KL arm. With 5% or 12.5% of rows the model barely learned
    the form (greedy 0.012, 0.084). The 500 held-out test pairs are never trained on, in either form.
It is poor on arith_ood (3-digit operands): it never saw them. Shipped model: 900 pretraining steps; test accuracy on
500 problems: arith greedy 0.676, T=1 0.368; arith_spaced greedy 0.648, T=1 0.322; arith_ood 0.

Command (regenerates the committed folder; ~2-4 min on 2 CPU cores, deterministic given --seed and the thread count):
    python tools/tiny_model.py --out assets/tiny-arith       # the shipped folder (one torch thread: ~10 min on a busy CPU)
"""
import argparse
import os
import sys
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repo root: `python tools/tiny_model.py` runs from here,
if ROOT not in sys.path:                                             # and the core modules (train, run_folder, ...) sit one
    sys.path.insert(0, ROOT)                                         # folder up

import tasks
from tasks import build_prompt

SPECIALS = ["<pad>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ENGLISH = (
    "The quick brown fox jumps over the lazy dog. What is the answer? The answer is 42. Let us think step by step. "
    "Use the numbers to reach the target. Solve the problem and put the final answer in a box."
)
DEFAULT_SIZE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2)


# ---------------------------------------------------------------- data: the arith task of tasks.py
def arith_examples(split, n=None, ood=False):
    return tasks.load_task("arith_ood" if ood else "arith", split, n=n)


def spaced(ex):
    """The same problem in arith_spaced's surface form: "12+34=" -> "12 + 34 =" (tasks.py)."""
    a, b = ex["question"][:-1].split("+")
    return {**ex, "question": f"{a} + {b} ="}


def is_correct(text, answer):
    return tasks.reward("arith", text, {"answer": answer}) == 1.0


# ---------------------------------------------------------------- tokenizer and model
def build_tokenizer(texts=None, vocab_size=300):
    """Byte-level BPE (any text encodes), digits always single tokens, left padding, chat template."""
    if texts is None:
        texts = [ENGLISH] + [f"<|im_start|>user\n{a}+{b}=<|im_end|>\n<|im_start|>assistant\n{a + b}"
                             for a in range(0, 100, 7) for b in range(0, 100, 11)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                 padding_side="left", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_model(tokenizer, seed=0, **size):
    cfg = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
                      **{**DEFAULT_SIZE, **size})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def save(model, tokenizer, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_random_model(out_dir, seed=0, **size):
    """Save a randomly initialised tiny Llama + tokenizer to out_dir (for tests); returns out_dir."""
    tokenizer = build_tokenizer()
    save(make_model(tokenizer, seed, **size), tokenizer, out_dir)
    return out_dir


# ---------------------------------------------------------------- supervised pretraining
def encode(tokenizer, examples):
    """Left-padded prompt+completion batch; labels are -100 except on the completion tokens (answer digits + EOS)."""
    rows = []
    for ex in examples:
        p = tokenizer(build_prompt(tokenizer, ex["question"]), add_special_tokens=False)["input_ids"]
        c = tokenizer(ex["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + c, [-100] * len(p) + c))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, width - len(x):] = torch.tensor(x)
        labels[i, width - len(y):] = torch.tensor(y)
        mask[i, width - len(x):] = 1
    return ids, mask, labels


@torch.no_grad()
def accuracy(model, tokenizer, examples, temperature=0.0, batch_size=250, seed=0):
    """Fraction of examples whose generated completion's last integer equals the answer (greedy if temperature 0)."""
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        enc = tokenizer([build_prompt(tokenizer, ex["question"]) for ex in chunk], return_tensors="pt",
                        padding=True, add_special_tokens=False)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        out = model.generate(**enc, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(is_correct(t, ex["answer"]) for t, ex in zip(texts, chunk))
    model.train(was_training)
    return correct / len(examples)


def corrupt(ids, labels, digit_ids, noise, gen):
    """Noisy 'web' answers: in a random `noise` fraction of rows, one answer digit is replaced by a random digit
    (input and label alike). The model then learns a spread-out answer distribution whose mode is still the right
    sum, so T=1 sampling is clearly worse than greedy, as for a base LLM, and RL has something to sharpen."""
    ids, labels = ids.clone(), labels.clone()
    score = torch.rand(ids.shape, generator=gen) * torch.isin(labels, digit_ids)
    rows = (torch.rand(len(ids), generator=gen) < noise).nonzero().squeeze(1)
    pos = score.argmax(1)[rows]  # one uniformly chosen answer-digit position per noisy row
    new = digit_ids[torch.randint(10, (len(rows),), generator=gen)]
    ids[rows, pos], labels[rows, pos] = new, new
    return ids, labels


def pretrain(out_dir, target=0.33, noise=0.25, spaced_every=4, max_steps=4000, batch_size=128, lr=3e-3, eval_every=10,
             n_val=500, seed=0, **size):
    """Supervised training on arith train examples, stopped once T=1 validation accuracy >= target."""
    random.seed(seed)
    torch.manual_seed(seed)
    t0 = time.time()
    tokenizer = build_tokenizer()
    model = make_model(tokenizer, seed, **size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} params, vocab {len(tokenizer)}, {model.config.hidden_size=}, "
          f"{model.config.num_hidden_layers=}; answer noise {noise}, stop at T=1 val acc >= {target}")
    train = arith_examples("train")
    train = [spaced(ex) if spaced_every and i >= n_val and i % spaced_every == 0 else ex for i, ex in enumerate(train)]
    val, train = train[:n_val], train[n_val:]  # early-stopping slice of the train split, never trained on
    ids, mask, labels = encode(tokenizer, train)
    digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list("0123456789")))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    accs = []
    model.train()
    for step in range(1, max_steps + 1):
        idx = torch.randint(len(train), (batch_size,), generator=gen)
        x, y = corrupt(ids[idx], labels[idx], digit_ids, noise, gen)
        loss = model(input_ids=x, attention_mask=mask[idx], labels=y).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % eval_every == 0:  # stop on the mean of the last 3 checks: one T=1 estimate is noisy (+-2 points)
            accs.append(accuracy(model, tokenizer, val, temperature=1.0, seed=seed + step))
            smoothed = sum(accs[-3:]) / len(accs[-3:])
            print(f"step {step:5d}  loss {loss.item():.4f}  val acc T=1 {accs[-1]:.3f} (last 3: {smoothed:.3f})  "
                  f"({time.time() - t0:.0f}s)", flush=True)
            if smoothed >= target:
                break
    save(model, tokenizer, out_dir)
    train_s = time.time() - t0
    test, ood = arith_examples("test"), arith_examples("test", ood=True)
    splits = (("arith", test), ("arith_spaced", [spaced(ex) for ex in test]), ("arith_ood", ood))
    report = {f"{name} {'greedy' if t == 0 else 'T=1'}": accuracy(model, tokenizer, ex, temperature=t, seed=seed)
              for name, ex in splits for t in (0.0, 1.0)}
    mb = os.path.getsize(os.path.join(out_dir, "model.safetensors")) / 2**20
    print(f"saved {out_dir}: {n_params:,} params, {mb:.2f} MB; {step} steps, {train_s:.0f}s")
    for k, v in report.items():
        print(f"  test accuracy {k:18s} {v:.3f}  (500 problems)")
    return report


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="assets/tiny-arith", help="output folder (model + tokenizer)")
    ap.add_argument("--target", type=float, default=0.33, help="stop when T=1 validation accuracy reaches this")
    ap.add_argument("--noise", type=float, default=0.25, help="fraction of training answers with one random digit")
    ap.add_argument("--spaced-every", type=int, default=4, help="every Nth training row in the 'a + b =' form (0: none)")
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=DEFAULT_SIZE["hidden_size"])
    ap.add_argument("--layers", type=int, default=DEFAULT_SIZE["num_hidden_layers"])
    args = ap.parse_args()
    torch.set_num_threads(1)   # the shipped model was built with one thread (results depend on the thread count)
    pretrain(args.out, target=args.target, noise=args.noise, spaced_every=args.spaced_every, max_steps=args.max_steps,
             batch_size=args.batch_size, lr=args.lr, seed=args.seed, hidden_size=args.hidden,
             intermediate_size=2 * args.hidden, num_hidden_layers=args.layers)
