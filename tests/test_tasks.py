"""Tests of tasks.py: synthetic generators, loaders on the fixtures, errors, prompts (the graders: test_graders.py)."""
import json
import os
import re
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import pytest

import tasks
from tasks import TaskError, load_task, reward

FIX = Path(__file__).parent / "fixtures"


# ----------------------------------------------------------------------------------------------------------- arith
def test_task_names():
    assert set(tasks.TASKS) == {"arith", "arith_ood", "arith_spaced", "arith_q", "mul_q", "countdown", "math", "math500",
                                "mmlu_college_physics",
                                "mmlu_college_chemistry", "mmlu_college_biology"}


def pairs(examples):
    out = []
    for ex in examples:
        m = re.fullmatch(r"(\d+)\+(\d+)=", ex["question"])
        assert m, ex["question"]
        a, b = int(m.group(1)), int(m.group(2))
        assert ex["answer"] == str(a + b)
        out.append((a, b))
    return out


def test_arith_format_determinism_and_disjoint_splits():
    train, test = load_task("arith", "train"), load_task("arith", "test")
    assert len(train) == tasks.N_TRAIN and len(test) == tasks.N_TEST == 500
    tr, te = pairs(train), pairs(test)
    assert all(0 <= x <= 99 for p in tr + te for x in p)
    assert len(set(te)) == 500 and not set(tr) & set(te) and len(set(tr)) > 5000
    assert load_task("arith", "train", seed=0) == train
    assert load_task("arith", "train", seed=1) != train
    assert load_task("arith", "test", seed=7) == test  # the held-out set does not move with the seed
    # the assets/tiny-arith model was trained around exactly these held-out pairs: they must never change
    assert [ex["question"] for ex in test[:3]] == ["56+51=", "71+50=", "73+93="]
    other = pairs(load_task("arith", "train", n=20000, seed=3))
    assert len(other) == 20000 and not set(other) & set(te) and len(set(other)) > 8000
    assert len(load_task("arith", "test", n=10)) == 10


def test_arith_spaced_is_arith_test_set_in_another_surface_form():
    # the OOD split must differ from the in-domain one by the surface form only, on the same held-out pairs
    arith, spaced = load_task("arith", "test"), load_task("arith_spaced", "test")
    assert [ex["answer"] for ex in arith] == [ex["answer"] for ex in spaced]
    assert [ex["question"].replace("+", " + ").replace("=", " =") for ex in arith] == [ex["question"] for ex in spaced]
    train = {ex["question"] for ex in load_task("arith_spaced", "train", n=3000)}
    assert len(train) > 1000 and not train & {ex["question"] for ex in spaced}
    assert all(re.fullmatch(r"[0-9]+ \+ [0-9]+ =", q) for q in train)
    assert reward("arith_spaced", "107", spaced[0] | {"answer": "107"}) == 1.0


def test_arith_ood_range_and_disjoint():
    train, test = pairs(load_task("arith_ood", "train", n=3000)), pairs(load_task("arith_ood", "test"))
    assert len(test) == len(set(test)) == 500
    assert all(100 <= x <= 999 for p in train + test for x in p)
    assert not set(train) & set(test)
    assert pairs(load_task("arith_ood", "train", n=3000)) == train


# ----------------------------------------------------------------------------------------------------------- countdown
def test_countdown_generated_problems_are_solvable_and_splits_disjoint():
    test, train = load_task("countdown", "test"), load_task("countdown", "train", n=2000, seed=1)
    key = lambda ex: (tuple(sorted(ex["numbers"])), ex["target"])  # noqa: E731
    assert len(test) == 500 and not {key(e) for e in train} & {key(e) for e in test}
    for ex in test + train:
        assert len(ex["numbers"]) in (3, 4) and all(1 <= x <= tasks.CD_MAX_NUMBER for x in ex["numbers"])
        assert 1 <= ex["target"] <= tasks.CD_MAX_TARGET
        assert str(ex["numbers"]) in ex["question"] and str(ex["target"]) in ex["question"]
        assert reward("countdown", f"<answer>{ex['answer']}</answer>", ex) == 1.0, ex
    assert load_task("countdown", "train", n=50, seed=1) == train[:50]
    assert load_task("countdown", "train", n=50, seed=2) != train[:50]


# ----------------------------------------------------------------------------------------------------------- loaders
def test_mmlu_loader_and_reward():
    exs = load_task("mmlu_college_physics", "test", path=str(FIX / "mmlu_college_physics.jsonl"))
    assert [ex["answer"] for ex in exs] == ["B", "B", "A", "D"]
    assert "\nA. 1 s\nB. 2 s\nC. 4 s\nD. 20 s\n" in exs[0]["question"] and "Answer: X" in exs[0]["question"]
    assert reward("mmlu_college_physics", "t = sqrt(2h/g) = 2 s.\nAnswer: B", exs[0]) == 1.0
    assert reward("mmlu_college_physics", "Answer: C", exs[0]) == 0.0


def test_math_loader_on_fixtures(tmp_path):
    path = str(FIX / "math_train.jsonl")
    test = load_task("math", "test", path=path)
    assert [ex["answer"] for ex in test] == ["\\frac{7}{8}", "6", "9", "4\\sqrt{2}", "2, 3"]
    assert all(ex["question"].endswith("Put your final answer within \\boxed{}.") for ex in test)
    train = load_task("math", "train", path=path, seed=0)
    assert sorted(e["answer"] for e in train) == sorted(e["answer"] for e in test)
    assert train == load_task("math", "train", path=path, seed=0)
    assert len({tuple(e["answer"] for e in load_task("math", "train", path=path, seed=s)) for s in range(5)}) > 1
    assert len(load_task("math", "test", path=path, n=2)) == 2
    m500 = load_task("math500", "test", path=str(FIX / "math500.jsonl"))
    assert [ex["answer"] for ex in m500][:3] == ["56", "\\frac{1}{3}", "5\\sqrt{2}"]
    assert m500[0]["id"] == "test/counting_and_probability/101.json"
    odd = tmp_path / "odd-ids.jsonl"                         # ids eval.py can pair by: a float or a list becomes a string
    odd.write_text("".join(json.dumps({"problem": "1+1?", "answer": "2", "unique_id": u}) + "\n" for u in (1.5, [1], 7)))
    assert [ex["id"] for ex in load_task("math500", "test", path=str(odd))] == ["1.5", "[1]", 7]
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"problem": "Compute $1+1$.", "solution": "$1+1=\\boxed{2}$."}]),
                   tmp_path / "m.parquet")
    assert load_task("math", "test", path=str(tmp_path / "m.parquet"))[0]["answer"] == "2"


def one_line_error(*args, **kwargs):
    with pytest.raises(TaskError) as e:
        load_task(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_loader_errors(tmp_path):
    assert "unknown task 'gsm8k'" in one_line_error("gsm8k")
    assert "split" in one_line_error("arith", "validation")
    assert "synthetic" in one_line_error("arith", path="x.jsonl")
    assert "n must be" in one_line_error("arith", n=0)
    assert "not found" in one_line_error("math", path=str(tmp_path / "missing.jsonl"))
    assert "row 1" in one_line_error("math", path=str(FIX / "math_malformed.jsonl"))
    assert "row 1" in one_line_error("mmlu_college_physics", "test", path=str(FIX / "mmlu_malformed.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in one_line_error("math", path=str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"problem": "x", "solution": "\\\\boxed{1}"}\n{"problem": 3\n')
    assert "cannot read" in one_line_error("math", path=str(tmp_path / "bad.jsonl"))
    (tmp_path / "types.jsonl").write_text('{"problem": "x", "solution": "\\\\boxed{1}"}\n'
                                          '{"problem": 3, "solution": "y"}\n')
    assert str(tmp_path / "types.jsonl") in one_line_error("math", path=str(tmp_path / "types.jsonl"))
    (tmp_path / "data.csv").write_text("problem,solution\n")
    assert "unsupported" in one_line_error("math", path=str(tmp_path / "data.csv"))
    assert "no split 'train'" in one_line_error("math500", "train")
    with pytest.raises(TaskError):
        reward("gsm8k", "1", {"answer": "1"})


def test_offline_hub_id_fails_fast_with_a_hint(monkeypatch):
    import datasets.config
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    for name in ("math", "math500", "mmlu_college_biology"):
        t = time.time()
        msg = one_line_error(name, "test")
        assert "offline" in msg and "path" in msg and time.time() - t < 10


# ----------------------------------------------------------------------------------------------------------- prompt
class FakeTokenizer:
    def __init__(self, template):
        self.chat_template, self.calls = template, []

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append((messages, kwargs))
        return "<|user|>" + messages[0]["content"] + "<|assistant|>"


def test_real_model_tasks_reuse_the_held_out_pairs_and_never_train_on_them():
    arith, q = tasks.load_task("arith", "test"), tasks.load_task("arith_q", "test")
    as_pairs = lambda exs: [tuple(map(int, re.findall(r"[0-9]+", ex["question"]))) for ex in exs]   # noqa: E731
    assert as_pairs(q) == as_pairs(arith) and [ex["answer"] for ex in q] == [ex["answer"] for ex in arith]
    assert q[0]["question"] == "What is 56 + 51? Answer with just the number."
    train = tasks.load_task("arith_q", "train", seed=3)
    assert len(train) == 10_000 and not set(as_pairs(train)) & set(as_pairs(q))
    mul = tasks.load_task("mul_q", "test")
    assert len(mul) == 169 and all(int(ex["answer"]) == a * b for ex, (a, b) in zip(mul, as_pairs(mul)))
    assert tasks.reward("mul_q", "7 times 8 is 56.", {"answer": "56"}) == 1.0
    assert tasks.reward("arith_q", "56 + 51 = 107", q[0]) == 1.0 and tasks.reward("arith_q", "56 + 51", q[0]) == 0
    with pytest.raises(tasks.TaskError, match="evaluation task"):
        tasks.load_task("mul_q", "train")


def test_build_prompt():
    tok = FakeTokenizer("{{ messages }}")
    assert tasks.build_prompt(tok, "1+2=") == "<|user|>1+2=<|assistant|>"
    assert tok.calls == [([{"role": "user", "content": "1+2="}], {"tokenize": False, "add_generation_prompt": True})]
    plain = FakeTokenizer(None)
    assert tasks.build_prompt(plain, "1+2=") == "1+2=" and plain.calls == []
