"""Tasks shared by train.py and eval.py (the RLVR tasks of the paper, plus small synthetic ones): their problems, the
prompt a model sees, and which grader of graders.py scores its answer.

    load_task(name, split="train", n=None, seed=0, path=None) -> list of {"question": str, "answer": str, ...}
    reward(name, completion, example) -> 1.0 if the completion solves the example else 0.0 (graders.py: never runs it)
    build_prompt(tokenizer, question, fmt="auto") -> the prompt string given to the model (chat template or plain)

    exs = load_task("math500", "test", n=50)
    prompts = [build_prompt(tok, ex["question"]) for ex in exs]
    rewards = [reward("math500", text, ex) for text, ex in zip(completions, exs)]

Synthetic tasks (no data; deterministic given split and seed; "test" is a fixed held-out set of 500, "train" a stream of
10,000 (or n) that never contains a test problem; `seed` only changes the train stream):
  arith      question f"{a}+{b}=" with a, b uniform in [0, 99], answer str(a + b). The tiny model in assets/ is
             pretrained on exactly this, around these 500 held-out test pairs (so they must never change).
  arith_ood  the same with a, b in [100, 999] (the tiny model never saw these: it scores 0).
  arith_spaced  the same 500 held-out pairs as arith written "{a} + {b} =": a surface form that made up a quarter
             of the tiny model's pretraining rows but never appears in RL training (train.py trains on arith);
             the out-of-domain split of comedy.py.
  arith_q    arith's 500 held-out pairs (and a train stream without them) asked as an instruct model is asked:
             "What is {a} + {b}? Answer with just the number." The real model's task (real_model.py, --preset
             smollm2-cpu): SmolLM2-135M-Instruct answers 0.125 of them greedily (it talks), "a+b=" 0.05.
  mul_q      "What is {a} times {b}? Answer with just the number." for a, b in [0, 12]: all 169 are the test set
             (no train split). The real model's out-of-domain check: a skill it has (greedy 0.63) that RL on
             arith_q never trains, so a drop measures what the update broke elsewhere.
  countdown  3 or 4 numbers in [1, 30] and a target in [1, 200] built from a random expression over all of them,
             so every problem is solvable; answer = that reference expression (plus "numbers" and "target"). The
             model answers with an expression using each number once inside <answer></answer> (graders.py reads it).

Data-set tasks: `path` is a local .jsonl/.json/.parquet file (read here, with no cache copy: one JSON row per line, a
.json list of rows, or parquet via pyarrow; at most MAX_DATA_BYTES = 256 MiB, MAX_LINE_BYTES = 1 MiB per line; the
file is the data and `split` is ignored) or a Hugging Face Hub id (default below, read with datasets); offline
(HF_HUB_OFFLINE=1) a hub id not in the local cache is a TaskError at once: pass a local file. Rows have these fields:
  math       hub "DigitalLearningGmbH/MATH-lighteval" (splits train 7,500 / test 5,000):
             problem (str), solution (str, LaTeX with the final answer in \\boxed{...}), level (str), type (str).
             answer = the last \\boxed{} of solution, or the row's own "answer" field (str) when present.
  math500    hub "HuggingFaceH4/MATH-500" (split test, 500 rows):
             problem, solution, answer (str, LaTeX), subject (str), level (int), unique_id (str).
  mmlu_college_{physics,chemistry,biology}   hub "cais/mmlu", config "college_physics" etc. (split test; also
             validation, dev): question (str), subject (str), choices (list of 4 str), answer (int 0-3).
Question for math/math500: problem + "\\n\\nPut your final answer within \\boxed{}."; graded by math-verify on the
completion's last \\boxed{}. For mmlu: question, choices as "A. ..." lines, and a request to end with "Answer: X".
For the train split of a data set the rows are shuffled with `seed`; test keeps file order. `n` keeps the first n.
A malformed row (missing field, wrong type, no answer, a gold answer that is NaN, infinite or a float beyond 2**53)
raises TaskError naming the file and its 0-based row index (a line that is not JSON: its 1-based line number).
"""
import json
import math
import os
import random
import threading
from fractions import Fraction

from graders import countdown_expr, countdown_value, last_boxed, last_integer, math_reward, mmlu_letter


class TaskError(ValueError):
    """Bad task input (unknown task or split, missing file, malformed row, empty data set). str(e) is one line."""


TASKS = {
    "arith": "a+b= with a, b in [0, 99] (synthetic; the tiny model's pretraining task)",
    "arith_ood": "a+b= with a, b in [100, 999] (synthetic; out of domain for a model trained on arith)",
    "arith_spaced": "a + b = with a, b in [0, 99] (synthetic; arith's test pairs in a rarer surface form)",
    "arith_q": "What is a + b? with a, b in [0, 99] (synthetic; arith's test pairs, asked in words: real models)",
    "mul_q": "What is a times b? with a, b in [0, 12] (synthetic, test only; out of domain for arith_q)",
    "countdown": "reach a target from 3-4 numbers with + - * / (synthetic; expression in <answer></answer>)",
    "math": "MATH (Hendrycks) competition problems, answer in \\boxed{} (hub or local file)",
    "math500": "MATH-500 test problems, answer in \\boxed{} (hub or local file)",
    "mmlu_college_physics": "MMLU college physics, 4-choice letter answer (hub or local file)",
    "mmlu_college_chemistry": "MMLU college chemistry, 4-choice letter answer (hub or local file)",
    "mmlu_college_biology": "MMLU college biology, 4-choice letter answer (hub or local file)",
}
# name -> (default hub id, config, hub splits)
HUB = {"math": ("DigitalLearningGmbH/MATH-lighteval", None, ("train", "test")),
       "math500": ("HuggingFaceH4/MATH-500", None, ("test",))}
HUB.update({f"mmlu_{s}": ("cais/mmlu", s, ("test", "validation", "dev"))
            for s in ("college_physics", "college_chemistry", "college_biology")})
FILE_TYPES = (".jsonl", ".json", ".parquet")
MATH_INSTRUCTION = "\n\nPut your final answer within \\boxed{}."
MMLU_INSTRUCTION = ("\n\nChoose the correct option. End your response with a line of the form "
                    "\"Answer: X\", where X is A, B, C or D.")
N_TEST, N_TRAIN = 500, 10_000
CD_MAX_NUMBER, CD_MAX_TARGET = 30, 200
GRADE_TIMEOUT = 10.0  # seconds math-verify may take on one answer: then the child is killed and it scores 0


def reward(name, completion, example):
    """0/1 correctness of `completion` (decoded text, special tokens skipped) for `example` from load_task(name): the
    task's grader from graders.py, which only parses the text (linear time) and never runs it."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose from: {', '.join(TASKS)}")
    if not isinstance(completion, str):
        return 0.0
    if name in ("arith", "arith_ood", "arith_spaced", "arith_q", "mul_q"):
        got = last_integer(completion)
        return float(got is not None and got == int(example["answer"]))
    if name == "countdown":
        return float(countdown_value(countdown_expr(completion), example["numbers"]) == example["target"])
    if name in ("math", "math500"):
        return math_reward(completion, example["answer"], GRADE_TIMEOUT)
    return float(mmlu_letter(completion) == example["answer"])


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------
def load_task(name, split="train", n=None, seed=0, path=None):
    """Examples of task `name`: dicts with "question" (the full user message) and "answer" (str), at most n."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose from: {', '.join(TASKS)}")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise TaskError(f"{name}: n must be a positive integer or None, got {n!r}")
    if name not in HUB:
        if path is not None:
            raise TaskError(f"{name} is synthetic and reads no file; drop path={path!r}")
        if split not in ("train", "test"):
            raise TaskError(f"{name}: unknown split {split!r}; choose train or test")
        return _synthetic(name, split, n, seed)
    rows, src = _read_rows(name, split, path)
    examples = [_example(name, row, i, src) for i, row in enumerate(rows)]
    if not examples:
        raise TaskError(f"{name}: {src} has no rows")
    if split == "train":
        random.Random(seed).shuffle(examples)
    return examples[:n]


def _synthetic(name, split, n, seed):
    """A fixed held-out test set and a seeded train stream that never contains a test problem."""
    lo, hi = (100, 999) if name == "arith_ood" else (0, 99)
    form = {"arith_spaced": "{} + {} =", "arith_q": "What is {} + {}? Answer with just the number."}.get(name, "{}+{}=")
    if name == "mul_q":                                     # the whole times table up to 12 is the test set
        if split != "test":
            raise TaskError("mul_q is an evaluation task (its 169 problems are all held out): use it in --eval-tasks")
        return [{"question": f"What is {a} times {b}? Answer with just the number.", "answer": str(a * b)}
                for a in range(13) for b in range(13)][:n]

    def make(rng):
        if name == "countdown":
            return _countdown_problem(rng)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return {"question": form.format(a, b), "answer": str(a + b)}

    def key(ex):  # countdown: the same numbers in another order with the same target are the same problem
        return (tuple(sorted(ex["numbers"])), ex["target"]) if "numbers" in ex else ex["question"]

    if name in ("arith", "arith_spaced", "arith_q"):  # one fixed shuffle of all pairs: the shipped model never saw these 500
        pairs = [(a, b) for a in range(100) for b in range(100)]
        random.Random("arith-False-0").shuffle(pairs)
        test = [{"question": form.format(a, b), "answer": str(a + b)} for a, b in pairs[:N_TEST]]
    else:
        rng, test = random.Random(f"{name}-test"), {}
        while len(test) < N_TEST:
            ex = make(rng)
            test.setdefault(key(ex), ex)
        test = list(test.values())
    if split == "test":
        return test[:n]
    rng, held, train = random.Random(f"{name}-train-{seed}"), {key(ex) for ex in test}, []
    while len(train) < (n or N_TRAIN):
        ex = make(rng)
        if key(ex) not in held:
            train.append(ex)
    return train


def _countdown_problem(rng):
    """Random numbers and a target built from a random expression over all of them, with whole-number steps."""
    while True:
        nums = [rng.randint(1, CD_MAX_NUMBER) for _ in range(rng.choice((3, 4)))]
        items = [(Fraction(x), str(x)) for x in nums]
        while len(items) > 1:
            (a, ea), (b, eb) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
            op = rng.choice("+-*/")
            if a < b and op in "-/":
                (a, ea), (b, eb) = (b, eb), (a, ea)
            if (op == "-" and a == b) or (op == "/" and a % b):  # keep intermediate results positive whole numbers
                op = rng.choice("+*")
            items.append(({"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op], f"({ea} {op} {eb})"))
        target, expr = items[0]
        if 1 <= target <= CD_MAX_TARGET:
            break
    question = (f"Using the numbers {nums}, create an equation that equals {target}. You can use +, -, *, / and "
                "parentheses, and must use each number exactly once. Give your final expression, without '=' and the "
                "result, inside <answer></answer> tags, for example <answer>(1 + 2) * 3</answer>.")
    return {"question": question, "answer": expr[1:-1], "numbers": nums, "target": int(target)}


def _read_rows(name, split, path):
    hub_id, config, splits = HUB[name]
    src = path or hub_id
    if os.path.exists(src) or src.lower().endswith(FILE_TYPES):
        if not os.path.isfile(src):
            raise TaskError(f"{name}: file not found: {src}")
        if not src.lower().endswith(FILE_TYPES):
            raise TaskError(f"{name}: {src}: unsupported file type; use one of {', '.join(FILE_TYPES)}")
        if os.path.getsize(src) == 0:
            raise TaskError(f"{name}: {src} is empty")
        return _read_file(name, src), src
    try:
        import datasets
    except ImportError:
        raise TaskError(f"{name}: reading {src} needs the 'datasets' package (pip install datasets)") from None
    if src == hub_id and split not in splits:
        raise TaskError(f"{name}: {hub_id} has no split {split!r}; choose from: {', '.join(splits)}")
    try:
        return datasets.load_dataset(src, config, split=split).to_list(), src
    except Exception as e:
        if datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
            raise TaskError(f"{name}: {src!r} is not in the local Hugging Face cache and the Hub is offline (HF_HUB_"
                            "OFFLINE=1); pass a local .jsonl/.parquet file via path (schemas: tasks.py)") from None
        raise TaskError(f"{name}: cannot load {src!r} (config {config}, split {split}) from the Hugging Face Hub: "
                        f"{_one_line(e)}") from None


MAX_DATA_BYTES = 256 << 20  # a local data file is held in memory: 256 MiB (MATH's train split is 10 MB as JSONL)
MAX_LINE_BYTES = 1 << 20    # one JSONL row (a MATH row is ~2 KB)
MAX_ROWS = 100_000          # rows of a data file: 500k rows of 42 B cost 3.3 GB and 35 s as Python dicts (MATH: 7.5k)
MAX_QUESTION_CHARS = 64 << 10   # one question (a MATH problem is ~0.2-2 KB; 1 MiB prompts cost 3 GB to tokenise)
MAX_JSON_LIST_BYTES = 32 << 20  # a .json list is parsed whole before its rows can be counted: ~150 B of Python objects
                                # per byte of small rows, so 32 MiB (MATH as one list: ~10 MB); larger: write JSONL


def _read_file(name, src):
    """Rows of a local .jsonl / .json / .parquet file, read by us (no cache copy) within MAX_DATA_BYTES and, line by
    line, MAX_LINE_BYTES: a 1 GB one-line file is refused after reading 1 MiB of it, not loaded."""
    size = os.path.getsize(src)
    too_big = (f"{name}: {src} holds {{:,}} bytes, over the limit of {MAX_DATA_BYTES:,} for a data file "
               f"(tasks.MAX_DATA_BYTES); keep the rows you train on in a smaller file")
    too_many = (f"{name}: {src} holds {{:,}} rows, over the limit of {MAX_ROWS:,} (tasks.MAX_ROWS); keep the rows you "
                f"train on in a smaller file")
    if size > MAX_DATA_BYTES:
        raise TaskError(too_big.format(size))
    try:
        if src.lower().endswith(".parquet"):
            import pyarrow.parquet as pq
            f = pq.ParquetFile(src)
            unpacked = sum(f.metadata.row_group(i).total_byte_size for i in range(f.metadata.num_row_groups))
            if unpacked > MAX_DATA_BYTES:                  # compressed on disk: its size in memory is what counts
                raise TaskError(too_big.format(unpacked))
            if f.metadata.num_rows > MAX_ROWS:
                raise TaskError(too_many.format(f.metadata.num_rows))
            return f.read().to_pylist()
        with open(src, "rb") as f:
            if src.lower().endswith(".json") and f.read(1 << 16).lstrip().startswith(b"["):
                if size > MAX_JSON_LIST_BYTES:             # the row cap cannot act before the whole list is parsed
                    raise TaskError(f"{name}: {src} is one JSON list of {size:,} bytes, over the limit of "
                                    f"{MAX_JSON_LIST_BYTES:,} for a list (tasks.MAX_JSON_LIST_BYTES); write it as "
                                    f"JSONL (one row per line), which is read row by row")
                f.seek(0)
                rows = json.loads(f.read())                # one JSON list of rows
                if isinstance(rows, list) and len(rows) > MAX_ROWS:
                    raise TaskError(too_many.format(len(rows)))
                return rows
            f.seek(0)
            rows = []
            for number in range(1, size + 2):              # else one row per line
                line = f.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return rows
                if len(line) > MAX_LINE_BYTES:
                    raise TaskError(f"{name}: {src} line {number} is longer than {MAX_LINE_BYTES:,} bytes, the limit "
                                    f"for one row (tasks.MAX_LINE_BYTES)")
                if not line.strip():
                    continue
                if len(rows) == MAX_ROWS:                  # streamed: refused at row MAX_ROWS + 1, not after all
                    raise TaskError(too_many.format(MAX_ROWS).replace("holds", "holds more than", 1))
                try:
                    rows.append(json.loads(line))
                except ValueError as e:                    # also a 5000-digit int: json's 4300-digit int limit
                    raise TaskError(f"{name}: cannot read {src}: line {number}: {_one_line(e)}") from None
    except TaskError:
        raise
    except Exception as e:                                 # not parquet, not JSON, unreadable
        raise TaskError(f"{name}: cannot read {src}: {_one_line(e)}") from None


def _one_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _example(name, row, i, src):
    """One data-set row -> example; a malformed row is a TaskError naming it (no silent skipping)."""
    def bad(what):
        return TaskError(f"{name}: {src} row {i}: {what}")

    if not isinstance(row, dict):
        raise bad(f"not a JSON object but {type(row).__name__}")

    def text(key):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise bad(f"field {key!r} is missing or not a non-empty string")
        if len(row[key]) > MAX_QUESTION_CHARS:             # before anything is tokenised
            raise bad(f"field {key!r} holds {len(row[key]):,} characters, over tasks.MAX_QUESTION_CHARS = "
                      f"{MAX_QUESTION_CHARS:,}")
        return row[key]

    if name.startswith("mmlu_"):
        question, choices, answer = text("question"), row.get("choices"), row.get("answer")
        if not (isinstance(choices, list) and len(choices) == 4 and all(isinstance(c, str) for c in choices)):
            raise bad("field 'choices' must be a list of 4 strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer <= 3:
            raise bad(f"field 'answer' must be an int 0-3, got {answer!r}")
        lines = "\n".join(f"{letter}. {c}" for letter, c in zip("ABCD", choices))
        return {"question": f"{question.strip()}\n\n{lines}{MMLU_INSTRUCTION}", "answer": "ABCD"[answer],
                "subject": row.get("subject") or name[5:]}
    problem, answer = text("problem"), row.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        answer = last_boxed(text("solution"))
        if answer is None:
            raise bad("no 'answer' field and no \\boxed{...} in 'solution'")
    elif not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise bad(f"field 'answer' must be a string, got {type(answer).__name__}")
    elif isinstance(answer, float) and not (math.isfinite(answer) and abs(answer) < 2**53):
        raise bad(f"field 'answer' is {answer!r}: a gold answer must be a string or a finite number (a float beyond "
                  f"2**53 has lost digits: write it as a string)")
    ex = {"question": problem.strip() + MATH_INSTRUCTION, "answer": str(answer).strip()}
    if row.get("unique_id"):                                 # a string, as MATH-500's: eval.py pairs problems by it
        ex["id"] = row["unique_id"] if isinstance(row["unique_id"], (str, int)) else str(row["unique_id"])
    return ex


# ---------------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------------
PROMPT_FORMATS = ("auto", "chat", "plain")


def build_prompt(tokenizer, question, fmt="auto", thinking=False):
    """The model's prompt for one question (a string; tokenize=False always: with tokenize=True transformers 5
    returns a dict, not ids).
    fmt "chat": the tokenizer's chat template with a generation prompt (an instruct model's own format);
    "plain": the question as it is (a base model: Qwen2.5-7B base ships a ChatML template it was never tuned on);
    "auto": chat if the tokenizer has a template, else plain.
    thinking=False passes enable_thinking=False to a template that takes it (a Qwen3 hybrid thinks by default and
    would spend --max-new-tokens inside <think>)."""
    template = getattr(tokenizer, "chat_template", None)
    if fmt not in PROMPT_FORMATS:
        raise TaskError(f"unknown prompt format {fmt!r}; choose from: {', '.join(PROMPT_FORMATS)}")
    if fmt == "plain" or (fmt == "auto" and not template):
        return question
    if not template:
        raise TaskError("--prompt-format chat: this tokenizer has no chat template (use plain)")
    extra = {"enable_thinking": thinking} if "enable_thinking" in str(template) else {}
    import jinja2
    try:
        with _time_limit(TEMPLATE_SECONDS):
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True, **extra)
    except jinja2.TemplateError as e:                       # incl. the sandbox's SecurityError: one line, not 40
        raise TaskError(f"the tokenizer's chat template fails to render a prompt: {_one_line(e)[:200]}") from None
    if len(text) > len(question) + MAX_QUESTION_CHARS:
        raise TaskError(f"the tokenizer's chat template adds {len(text) - len(question):,} characters to a prompt "
                        f"(over tasks.MAX_QUESTION_CHARS = {MAX_QUESTION_CHARS:,})")
    return text


TEMPLATE_SECONDS = 10       # one prompt's chat-template rendering (a real one takes < 1 ms; a 1e5 x 1e5 loop: hours)


class _Timeout(Exception):
    pass


def _time_limit(seconds):
    """A context that raises TaskError when its body runs longer than `seconds` (SIGALRM: the main thread only; a
    worker thread renders unbounded). jinja renders in Python, so the signal interrupts a template's loops."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def limit():
        def stop(signum, frame):
            raise _Timeout
        old = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        except _Timeout:
            raise TaskError(f"the tokenizer's chat template took over {seconds} s to render one prompt "
                            f"(tasks.TEMPLATE_SECONDS); refusing a template that loops") from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    return limit() if threading.current_thread() is threading.main_thread() else contextlib.nullcontext()


def end_of_turn_ids(tokenizer):
    """The special tokens the chat template writes right after an assistant message (<|im_end|> for ChatML,
    <|eot_id|> for Llama 3): a completion ends there even when the model's config lists only another EOS (Qwen2.5
    base: <|endoftext|>). Found by rendering a one-turn conversation, so no model needs a hand-written list."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    mark = "kl-rl-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "1+1="},
                                              {"role": "assistant", "content": mark}], tokenize=False)
    except Exception:                                       # a template that refuses this conversation shape
        return []
    after = text[text.rfind(mark) + len(mark):] if mark in text else ""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = []
    for i in tokenizer(after, add_special_tokens=False)["input_ids"]:   # the leading run of special tokens
        if i not in special:
            break
        ids.append(i)
    return ids
