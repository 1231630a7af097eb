"""tools/ -- everything a learner does not need to read to follow one RL step; each file is still a flat script.

The top level holds the algorithm (estimators.py, kl_rl.py), the loop (train.py), the evaluation (eval.py), what
they cannot run without (policy.py, tasks.py, graders.py, guards.py, run_folder.py) and audit.py, a user entry
point. Here, run as `python tools/<name>.py` (each adds the repo root to sys.path; the core imports them as
`tools.<name>`):

    toy.py         the exact-gradient oracle (tabular policies, every expectation a sum): tests, notebooks, audit.py
    comedy.py      the multi-seed studies of the paper's claims (results/comedy*/): runs, summary.md, curves
    stats.py       exact-t intervals, the verdict rule, Holm, seeds-to-settle: what summary.md's verdicts rest on
    report.py      the summary table and metrics.png that train.py prints and draws when a run ends
    provenance.py  which code, base model (a hash of every byte) and machine a run came from (config.json)
    bench.py       speed table of train.py against a pinned TRL on the same model and flags
    gpu_check.py   the GPU memory model of the paper's presets: what to measure, extrapolation, the report
    gpu_probe.py   gpu_check's measuring worker: a random model per config and depth, each phase's peak memory
    export.py      a run's configuration as a verl / OpenRLHF / TRL command
    tiny_model.py  builds the shipped 0.48M-parameter model in assets/tiny-arith/
    real_model.py  converts SmolLM2-135M-Instruct from its pip package (no model hub) and verifies it
"""
