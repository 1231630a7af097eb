"""Run-folder hardening, part 2 (issue 26): the inputs a run trusts. A model identity over every byte of the weights,
a converted real model verified before use, caps that bound the cost of data files and prompts while reading, and
one-line refusals for hostile inputs (a pickle payload, a chat template that loops, a corrupt cache). Each test fails
on the code before the issue (checked). Part 1, what a run writes: test_hardening_links.py."""
import json
import os
import shutil
import struct
import subprocess
import time

import pytest

import run_folder
import train
from test_hardening_links import run  # noqa: F401 (a fixture used here)
from test_run_folder import SMALL, fails_with_one_line, finished  # noqa: F401 (finished: a fixture used here)
from tools import provenance, real_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------------------
# 4. The model identity covers every byte of the weights
# ---------------------------------------------------------------------------------------------------------
def unsampled_offset(path):
    """A byte of a safetensors file's data that the old identity (16 evenly spaced 4 KiB samples) never read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]
    step = max(0, size - start - 4096) // 15
    read = set()
    for k in range(16):
        read.update(range(start + k * step, start + k * step + 4096))
    return next(o for o in range(start, size) if o not in read)


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x80]))


def test_model_identity_sees_a_byte_outside_any_sample_and_a_resume_refuses_it(finished, run, tmp_path, capsys):
    model = shutil.copytree(finished[1], tmp_path / "model")
    weights = model / "model.safetensors"
    before = provenance.model_identity(str(model))
    flip(weights, unsampled_offset(weights))
    assert provenance.model_identity(str(model)) != before
    saved = json.loads((run / "config.json").read_text())
    saved["model"] = str(model)
    (run / "config.json").write_text(json.dumps(saved))
    line = fails_with_one_line(capsys, ["--resume", str(run), "--steps", "4"])
    assert "model_id" in line


def test_file_digest_is_cached_by_size_mtime_and_inode(tmp_path, monkeypatch):
    monkeypatch.setattr(real_model, "CACHE", str(tmp_path / "cache" / "models"))
    calls = []
    sha = real_model.sha256
    monkeypatch.setattr(real_model, "sha256", lambda p: calls.append(p) or sha(p))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 10000)
    d = real_model.file_digest(str(f))
    assert real_model.file_digest(str(f)) == d and len(calls) == 1             # read once
    f.write_bytes(b"b" * 10000)                                               # same size, new mtime
    assert real_model.file_digest(str(f)) != d and len(calls) == 2


# ---------------------------------------------------------------------------------------------------------
# 7. A converted real model is verified before use; interrupted conversions are cleaned up
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """real_model.folder with a stand-in convert() that writes a small safetensors folder as convert() does."""
    import torch
    from safetensors.torch import save_file
    monkeypatch.setattr(real_model, "CACHE", str(tmp_path / "cache" / "models"))
    calls = []

    def convert(name, out, quiet=False):
        calls.append(out)
        tmp = f"{out}.tmp-{os.getpid()}"
        os.makedirs(tmp)
        save_file({"w": torch.arange(4096, dtype=torch.float32)}, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, real_model.MARKER), "w") as fh:
            json.dump({"sha256": real_model.MODELS[name]["sha256"],
                       "weights_sha256": real_model.file_digest(os.path.join(tmp, "model.safetensors"))}, fh)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    monkeypatch.setattr(real_model, "convert", convert)
    return calls


def test_a_corrupted_converted_model_is_converted_again(fake_conversion):
    out = real_model.folder("smollm2-135m", quiet=True)
    assert real_model.folder("smollm2-135m", quiet=True) == out and len(fake_conversion) == 1
    weights = os.path.join(out, "model.safetensors")
    with open(weights, "r+b") as f:                  # zero a block of the weights, size unchanged
        f.seek(os.path.getsize(weights) - 4096)
        f.write(bytes(4096))
    real_model.folder("smollm2-135m", quiet=True)
    assert len(fake_conversion) == 2
    os.truncate(weights, os.path.getsize(weights) // 2)                       # a truncated one too
    real_model.folder("smollm2-135m", quiet=True)
    assert len(fake_conversion) == 3 and os.path.getsize(weights) > 8


def test_a_conversion_killed_mid_way_is_cleaned_up_on_the_next_start(fake_conversion):
    out = real_model.folder("smollm2-135m", quiet=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{out}.tmp-{dead.pid}"
    os.makedirs(stale)
    with open(os.path.join(stale, "model.safetensors"), "wb") as f:
        f.write(bytes(1 << 20))
    assert real_model.folder("smollm2-135m", quiet=True) == out
    assert not os.path.exists(stale) and len(fake_conversion) == 1


def test_a_marker_from_before_weight_digests_is_converted_again(fake_conversion):
    """A folder converted before weight digests were recorded is converted again, once: a same-size corruption of
    its weights would pass any structural check (the review flipped 4,900 bytes and it was trusted)."""
    out = real_model.folder("smollm2-135m", quiet=True)
    marker = os.path.join(out, real_model.MARKER)
    weights = os.path.join(out, "model.safetensors")
    with open(weights, "r+b") as f:                  # corrupted, size unchanged, under a legacy marker
        f.seek(os.path.getsize(weights) - 4096)
        f.write(bytes(4096))
    with open(marker, "w") as f:
        json.dump({"sha256": real_model.MODELS["smollm2-135m"]["sha256"]}, f)
    real_model.folder("smollm2-135m", quiet=True)
    assert len(fake_conversion) == 2 and "weights_sha256" in json.load(open(marker))
    real_model.folder("smollm2-135m", quiet=True)                # and then trusted: no third conversion
    assert len(fake_conversion) == 2



# ---------------------------------------------------------------------------------------------------------
# 8. Caps that bound cost: rows and question lengths checked while reading, before anything is tokenised
# ---------------------------------------------------------------------------------------------------------
def test_a_data_file_over_the_row_cap_is_refused_while_streaming(tmp_path):
    import tasks
    path = tmp_path / "many.jsonl"
    path.write_text('{"problem": "1+1?", "answer": "2"}\n' * (tasks.MAX_ROWS + 1))
    with pytest.raises(tasks.TaskError, match="rows, over the limit"):
        tasks.load_task("math", "train", path=str(path))


def test_a_large_json_list_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    """A .json list is parsed whole before the row cap can count it (issue 26.8: 500k rows cost 3.3 GB): over
    MAX_JSON_LIST_BYTES it is refused unparsed, with the way out (JSONL); a small list still loads."""
    import tasks
    monkeypatch.setattr(tasks, "MAX_JSON_LIST_BYTES", 4096)
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed"))   # refused before any parsing
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"problem": "1+1?", "answer": "2"}] * 200))
    with pytest.raises(tasks.TaskError, match="one JSON list of .* write it as JSONL"):
        tasks.load_task("math", "train", path=str(path))
    monkeypatch.undo()
    path.write_text(json.dumps([{"problem": "1+1?", "answer": "2"}] * 3))
    assert len(tasks.load_task("math", "train", path=str(path))) == 3


def test_a_question_over_the_length_cap_is_refused_before_tokenising(tmp_path):
    import tasks
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"problem": "x" * (70 << 10), "answer": "2"}) + "\n")
    with pytest.raises(tasks.TaskError, match="MAX_QUESTION_CHARS"):
        tasks.load_task("math", "train", path=str(path))


def test_a_config_json_linked_to_dev_zero_is_read_bounded(tmp_path):
    (tmp_path / "config.json").symlink_to("/dev/zero")
    assert run_folder.read_json(str(tmp_path / "config.json")) is None         # not read until memory runs out
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(run_folder.JSON_LIMIT + 1)
    assert run_folder.read_json(str(big)) is None


@pytest.mark.parametrize("template,says", [
    ("{{ ''.__class__.__mro__ }}", "fails to render"),                                   # the sandbox refuses it
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took over"),   # hours
])
def test_a_hostile_chat_template_is_one_line_and_bounded_in_time(model_dir, monkeypatch, template, says):
    import tasks
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = template
    monkeypatch.setattr(tasks, "TEMPLATE_SECONDS", 1)
    t0 = time.time()
    with pytest.raises(tasks.TaskError, match=says):
        tasks.build_prompt(tok, "1+1=", "chat")
    assert time.time() - t0 < 30


def test_a_pickle_payload_model_is_one_line(model_dir, tmp_path, capsys):
    """A model folder whose weights are a pickle that would run code: transformers refuses it (weights_only), and
    train.py says so in one line instead of a 33-line traceback."""
    import pickle as pk
    model = shutil.copytree(model_dir, tmp_path / "model")
    for f in os.listdir(model):
        if f.endswith(".safetensors"):
            os.remove(model / f)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    with open(model / "pytorch_model.bin", "wb") as f:
        pk.dump(Payload(), f)
    line = fails_with_one_line(capsys, ["--model", str(model), "--out", str(tmp_path / "run"), *SMALL])
    assert "cannot load model" in line and not (tmp_path / "pwned").exists() and not (tmp_path / "run").exists()


def test_a_hub_id_without_network_names_the_offline_ways_out(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = fails_with_one_line(capsys, ["--model", "no-such-org/no-such-model", "--out", str(tmp_path / "run"),
                                        *SMALL])
    assert "--model smollm2-135m" in line and "HF_HUB_OFFLINE=1" in line and not (tmp_path / "run").exists()


def test_steps_0_lists_no_checkpoint_and_names_the_next_command(model_dir, tmp_path, capsys):
    assert train.main(["--model", model_dir, "--out", str(tmp_path / "r0"), *SMALL, "--steps", "0"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint/" not in out and not (tmp_path / "r0" / "checkpoint").exists()
    assert train.main(["--model", model_dir, "--out", str(tmp_path / "r1"), *SMALL]) == 0
    assert f"next: python eval.py --adapter {tmp_path / 'r1'} --tasks arith" in capsys.readouterr().out


def test_eval_help_shows_defaults_and_task_names(capsys):
    import eval as ev
    with pytest.raises(SystemExit):
        ev.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: 1000)" in text and "arith_spaced" in text and "math500" in text


def test_eval_prints_progress_to_a_log_and_says_what_it_did(model_dir, tmp_path, capsys):
    import eval as ev
    ev.main(["--model", model_dir, "--tasks", "arith", "--samples", "1", "--limit", "40", "--batch-size", "2",
             "--max-new-tokens", "2", "--bootstrap", "10", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.splitlines()
    progress = [x for x in err if x.startswith("eval.py: arith ") and "problems" in x]
    assert len(progress) >= 10                                    # every ~5% of 40 problems
    assert any(x.startswith("eval.py: evaluated 40 problems of arith") and str(tmp_path / "r.json") in x for x in err)


def test_a_corrupt_gpu_check_cache_entry_is_measured_again(tmp_path, monkeypatch):
    """A half-written or hand-edited cache file gave a 30-line traceback at every run until deleted."""
    import argparse
    import hashlib as hl

    from tools import gpu_check
    args = argparse.Namespace(cache=str(tmp_path), device="cpu", threads=1)
    key = json.dumps(["m.json", 1, [], "cpu", 1], sort_keys=True)
    path = tmp_path / ("memory-" + hl.sha1(key.encode()).hexdigest()[:12] + ".json")
    fresh = {"static": 2.0, "tensor_bytes": 1.0, "probes": []}
    monkeypatch.setattr(gpu_check, "random_model", lambda *a: str(tmp_path))
    monkeypatch.setattr(gpu_check, "run_worker", lambda spec: [fresh])
    for corrupt in ('{"key": ', "[1, 2]", json.dumps({"key": key, "result": "x"})):
        path.write_text(corrupt)
        assert gpu_check.measured("m.json", 1, [], args) == fresh
        assert json.loads(path.read_text()) == {"key": key, "result": fresh}
