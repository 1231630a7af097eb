"""audit.py: every KL configuration of ours is classified as estimators.py's table says, seeded mistakes are
classified as what they are, and bad input exits 2 with one line.

The audited code is written the way a user would write it, in files under tmp_path (not inside the repository), and
loaded with audit.load, so the tests go through the same import path as the command line. Most tests call audit's
functions in-process (one audit: ~0.3 s); two subprocess tests check the exit codes and the JSON line.
"""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

import audit
import estimators

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USER_ESTIMATORS = '''
import torch

def k1(logp, ref_logp):                      # verl's kl_penalty "kl" / OpenRLHF's k1
    return logp - ref_logp

def k2(logp, ref_logp):
    return 0.5 * (logp - ref_logp) ** 2

def k3(logp, ref_logp):                      # r = π_ref/π_θ: E_π[r] = 1, so E[r − 1 − log r] = KL
    log_ratio = ref_logp - logp
    return log_ratio.exp() - 1 - log_ratio

def k3_inverted(logp, ref_logp):             # the slip: r = π_θ/π_ref, whose mean is a χ²-type divergence
    log_ratio = logp - ref_logp
    return log_ratio.exp() - 1 - log_ratio

def k1_negated(logp, ref_logp):              # the slip: log π_ref − log π_θ
    return ref_logp - logp

def one_argument(logp):
    return logp

def summed(logp, ref_logp):                  # (N,) instead of (N, T)
    return (logp - ref_logp).sum(-1)

def blows_up(logp, ref_logp):
    return (logp - ref_logp) / 0.0
'''

USER_LOSSES = '''
import torch

def k1_in_reward_rloo_loss(logp, ref_logp, mask, rewards, group_size, beta, beta_loss=0.0, beta_reward=None):
    N, G = logp.shape[0], group_size
    beta_reward = beta if beta_reward is None else beta_reward
    kl = ((logp - ref_logp).detach() * mask).sum(-1)
    r = (rewards - beta_reward * kl).view(-1, G)
    baseline = (r.sum(1, keepdim=True) - r) / (G - 1)
    adv = (r - baseline).reshape(N, 1) * mask
    ratio = (logp - logp.detach()).exp()
    return (-(ratio * adv).sum() + beta_loss * ((logp - ref_logp) * mask).sum()) / N

def k1_half_in_both(logp, ref_logp, mask, rewards, group_size, beta):          # β/2 in the reward and β/2 in the loss
    return k1_in_reward_rloo_loss(logp, ref_logp, mask, rewards, group_size, beta, beta / 2, beta / 2)

def k1_ignores_beta(logp, ref_logp, mask, rewards, group_size, beta):          # a hard-coded coefficient
    return k1_in_reward_rloo_loss(logp, ref_logp, mask, rewards, group_size, 0.05)

def k1_in_reward_grpo(logp, ref_logp, mask, rewards, group_size, beta):        # group std: β cancels at zero reward
    N, G = logp.shape[0], group_size
    r = (rewards - beta * ((logp - ref_logp).detach() * mask).sum(-1)).view(-1, G)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(N, 1) * mask
    return -((logp - logp.detach()).exp() * adv).sum() / N

def rho_k3(logp, ref_logp, mask, rewards, group_size, beta, behav_logp, detach=False):
    rho = (logp - behav_logp).exp()
    rho = rho.detach() if detach else rho
    delta = logp - ref_logp
    return beta * (rho * (torch.expm1(-delta) + delta) * mask).sum() / logp.shape[0]

def rho_k3_detached(logp, ref_logp, mask, rewards, group_size, beta, behav_logp):
    return rho_k3(logp, ref_logp, mask, rewards, group_size, beta, behav_logp, detach=True)

def k1_in_reward_and_k3_in_loss(logp, ref_logp, mask, rewards, group_size, beta):   # both coefficients set
    delta = logp - ref_logp
    return k1_in_reward_rloo_loss(logp, ref_logp, mask, rewards, group_size, beta) + \
        beta * ((torch.expm1(-delta) + delta) * mask).sum() / logp.shape[0]

def scalar_per_sequence(logp, ref_logp, mask, rewards, group_size, beta):
    return (logp - ref_logp).sum(-1)
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's files, outside the repository: {name: callable} loaded through audit.load."""
    folder = tmp_path_factory.mktemp("user_code")
    (folder / "my_kl.py").write_text(textwrap.dedent(USER_ESTIMATORS))
    (folder / "my_loss.py").write_text(textwrap.dedent(USER_LOSSES))
    names = [line[4:line.index("(")] for text in (USER_ESTIMATORS, USER_LOSSES) for line in text.splitlines()
             if line.startswith("def ")]
    return {n: audit.load(f"{folder}/{'my_kl' if n in USER_ESTIMATORS else 'my_loss'}.py:{n}") for n in names} | \
        {"folder": folder}


def ours(name):
    """Our k1/k2/k3 (functions of δ) in the audited signature NAME(logp, ref_logp)."""
    def estimate(logp, ref_logp):
        return estimators.ESTIMATOR_FNS[name](logp - ref_logp)
    estimate.__name__ = name
    return estimate


# ---------------------------------------------------------------------------------------------------------
# Every configuration of ours, as estimators.py's table says (on- and off-policy)
# ---------------------------------------------------------------------------------------------------------
ON_POLICY = [  # (estimator, placement, level, kl_is) -> gradient
    ("k1", "reward", "sequence", "none", "reverse-kl"), ("k1", "reward", "token", "none", "reverse-kl"),
    ("k1", "loss", "sequence", "none", "zero"), ("k1", "both", "sequence", "none", "reverse-kl"),
    ("k1", "both", "token", "none", "reverse-kl"),
    ("k2", "reward", "sequence", "none", "other"), ("k2", "loss", "sequence", "none", "token-reverse-kl"),
    ("k2", "both", "sequence", "none", "other"),
    ("k3", "reward", "sequence", "none", "other"), ("k3", "reward", "token", "none", "other"),
    ("k3", "loss", "sequence", "none", "token-forward-kl"), ("k3", "both", "sequence", "none", "reverse-kl"),
    ("k3", "both", "token", "none", "reverse-kl"),
    ("k3", "loss", "sequence", "rho", "token-reverse-kl"),          # ρ ≡ 1 but in the graph: ∇(ρ·k3) = ∇k2
    ("k1", "loss", "sequence", "prefix", "reverse-kl"), ("k3", "loss", "sequence", "prefix", "reverse-kl"),
]
OFF_POLICY = [
    ("k3", "loss", "sequence", "rho", "token-reverse-kl"), ("k2", "loss", "sequence", "sg_rho", "token-reverse-kl"),
    ("k3", "loss", "sequence", "none", "other"),                    # plain k3 from μ: neither (estimators.py)
    ("k1", "loss", "sequence", "prefix", "reverse-kl"), ("k3", "loss", "sequence", "prefix", "reverse-kl"),
]


@pytest.mark.parametrize("off_policy,case", [(False, c) for c in ON_POLICY] + [(True, c) for c in OFF_POLICY],
                         ids=lambda x: "-".join(x) if isinstance(x, tuple) else ("off" if x else "on"))
def test_our_configurations_are_classified_as_the_table_says(off_policy, case):
    est, placement, level, kl_is, expected = case
    r = audit.audit_estimator(ours(est), placement, level, kl_is, off_policy=off_policy, beta=0.3)
    assert r["gradient"] == expected, r
    if expected in audit.NAMED:
        assert r["cosine"] > 1 - 1e-9 and r["scale"] == pytest.approx(1.0, abs=1e-9)   # β × that gradient, exactly
    elif expected == "other":
        assert abs(r["cosine"]) < audit.COS_MIN - 0.01                  # not a near miss of the threshold
    assert r["beta_responsive"] is (expected != "zero")
    # the value: k1 and k3 are unbiased for the sequence KL, k2 is not
    assert (abs(r["value_bias"]) < 1e-10) is (est != "k2"), r["value_bias"]


def test_k3_in_the_reward_points_against_the_forward_kl_part():
    # ∇RKL − ∇tokFKL: on these instances its nearest named gradient is the token forward KL, anti-aligned
    r = audit.audit_estimator(ours("k3"), "reward")
    assert r["gradient"] == "other" and r["nearest"] == "token-forward-kl" and r["cosine"] < -0.3


def test_clipped_prefix_weights_are_exact_on_policy_and_biased_off_policy():
    on = audit.audit_estimator(ours("k3"), "loss", kl_is="prefix", is_clip=2.0)
    off = audit.audit_estimator(ours("k3"), "loss", kl_is="prefix", is_clip=2.0, off_policy=True)
    assert on["gradient"] == "reverse-kl"                               # W ≡ 1 ≤ c on-policy
    assert off["gradient"] == "other" and off["nearest"] == "reverse-kl"


def test_toy_instances_are_far_from_the_reference_and_tell_the_named_gradients_apart():
    for off_policy in (False, True):
        insts = audit.instances(off_policy)
        assert len(insts) >= 3 and audit.T >= 3
        assert min(i["kl"] for i in insts) > 0.1
        for i in insts:
            g = i["named"]
            assert max(audit.cos(g[a], g[b]) for a in audit.NAMED for b in audit.NAMED if a < b) < 0.99


# ---------------------------------------------------------------------------------------------------------
# Seeded mistakes, as a user would write them (files under tmp_path)
# ---------------------------------------------------------------------------------------------------------
def test_user_estimators_match_ours(user):
    for name in ("k1", "k2", "k3"):
        mine, theirs = audit.audit_estimator(user[name], "both"), audit.audit_estimator(ours(name), "both")
        assert mine["gradient"] == theirs["gradient"] and mine["scale"] == pytest.approx(theirs["scale"], rel=1e-9)


def test_k3_with_the_ratio_inverted_is_biased_in_value_and_gradient(user):
    right = audit.audit_estimator(user["k3"], "loss")
    for placement in ("reward", "loss", "both"):
        wrong = audit.audit_estimator(user["k3_inverted"], placement)
        assert wrong["gradient"] == "other", (placement, wrong)
        assert min(abs(b) / kl for b, kl in zip(wrong["value_biases"], wrong["kl"])) > 0.1   # its mean is not the KL
    assert right["gradient"] == "token-forward-kl" and abs(right["value_bias"]) < 1e-10


def test_k1_differentiated_in_the_loss_has_zero_expected_gradient(user):
    r = audit.audit_estimator(user["k1"], "loss")
    assert r["gradient"] == "zero" and r["scale"] == 0 and max(r["size"]) < 1e-10
    assert audit.audit_estimator(user["k1"], "reward")["gradient"] == "reverse-kl"


def test_negated_k1_pushes_away_from_the_reference(user):
    r = audit.audit_estimator(user["k1_negated"], "reward")
    assert r["gradient"] == "other" and r["nearest"] == "reverse-kl"
    assert r["cosine"] == pytest.approx(-1, abs=1e-9) and r["scale"] == pytest.approx(-1, abs=1e-9)
    assert r["value_bias_rel"] == pytest.approx(-2, abs=1e-9)           # E[−δ] − KL = −2 KL


def test_losses_beta_half_in_both_ignored_beta_and_grpo_std(user):
    full = audit.audit_loss(user["k1_in_reward_rloo_loss"])
    assert full["gradient"] == "reverse-kl" and full["scale"] == pytest.approx(1, abs=1e-9) and full["beta_responsive"]
    assert full["value_bias"] is None
    half = audit.audit_loss(user["k1_half_in_both"])
    assert half["gradient"] == "reverse-kl" and half["scale"] == pytest.approx(0.5, abs=1e-9)
    fixed = audit.audit_loss(user["k1_ignores_beta"], beta=0.2)
    assert fixed["gradient"] == "reverse-kl" and not fixed["beta_responsive"] and fixed["scale"] == pytest.approx(0.25)
    grpo = audit.audit_loss(user["k1_in_reward_grpo"])
    assert not grpo["beta_responsive"] and abs(grpo["beta_exponent"]) < 0.05      # the std division cancels β


def test_kl_in_reward_and_in_loss_with_different_estimators_adds_two_gradients(user):
    # k1 in the reward and k3 in the loss, each at β: ∇RKL + ∇tokFKL, neither named, about twice as large
    r = audit.audit_loss(user["k1_in_reward_and_k3_in_loss"])
    assert r["gradient"] == "other" and min(r["size"]) > 1.5


def test_rho_detached_off_policy_is_the_forward_kl_not_the_reverse(user):
    right = audit.audit_loss(user["rho_k3"], off_policy=True)
    wrong = audit.audit_loss(user["rho_k3_detached"], off_policy=True)
    assert right["gradient"] == "token-reverse-kl" and right["scale"] == pytest.approx(1, abs=1e-9)
    assert wrong["gradient"] == "token-forward-kl"                      # E_μ[sg(ρ)(1 − r) g]: forward KL at μ's states


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing left behind
# ---------------------------------------------------------------------------------------------------------
def test_bad_user_code_raises_one_clear_error(user):
    cases = [(lambda: audit.audit_estimator(user["one_argument"], "loss"), "wrong signature"),
             (lambda: audit.audit_estimator(user["summed"], "reward"), "expected a tensor of shape"),
             (lambda: audit.audit_estimator(user["blows_up"], "loss"), "non-finite"),
             (lambda: audit.audit_loss(user["scalar_per_sequence"]), "expected a tensor of shape ()"),
             (lambda: audit.audit_loss(user["rho_k3"]), "--off-policy only"),
             (lambda: audit.load(f"{user['folder']}/my_kl.py:missing"), "no function 'missing'"),
             (lambda: audit.load(f"{user['folder']}/nope.py:k1"), "no such file"),
             (lambda: audit.audit_estimator(user["k1"], "reward", kl_is="rho"), "applies to the loss placement")]
    for fn, message in cases:
        with pytest.raises(audit.AuditError, match=message.replace("(", r"\(").replace(")", r"\)")):
            fn()
    assert audit.USER not in estimators.ESTIMATOR_FNS                   # the lent estimator is always given back


def test_help_names_the_five_gradients_and_warns_that_the_file_runs(capsys):
    with pytest.raises(SystemExit):
        audit.main(["--help"])
    out = capsys.readouterr().out
    for name in audit.GRADIENTS:
        assert f"\n  {name} " in out
    assert "imported" in out and str(audit.COS_MIN) in out


def test_cli_json_and_expect_exit_codes(user):
    cmd = [sys.executable, "audit.py", "--estimator", f"{user['folder']}/my_kl.py:k3", "--placement", "loss",
           "--json", "--expect"]
    ok = subprocess.run(cmd + ["token-forward-kl"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout.strip().splitlines()[-1])
    assert result["gradient"] == "token-forward-kl" and math.isclose(result["scale"], 1, abs_tol=1e-9)
    assert {"cosine", "value_bias", "beta_responsive"} <= set(result)
    bad = subprocess.run(cmd + ["reverse-kl"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "expected reverse-kl, got token-forward-kl" in bad.stderr


def test_cli_wrong_signature_exits_2_with_one_line(user):
    r = subprocess.run([sys.executable, "audit.py", "--loss", f"{user['folder']}/my_kl.py:k1"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "wrong signature" in r.stderr


def test_user_code_that_exits_or_hides_a_nan_gradient_is_an_error_not_a_verdict(tmp_path):
    """Review findings: sys.exit() in the user's code ended the audit with exit 0 and no output (CI's --expect
    bypassed); a finite estimate whose gradient is NaN (torch.where over a sqrt) got the verdict 'other'; a file
    with future annotations and a dataclass failed to import; a gradient that vanishes at 2β crashed (log2 of 0)."""
    (tmp_path / "odd.py").write_text(textwrap.dedent('''
        from __future__ import annotations
        import dataclasses
        import sys
        import torch

        @dataclasses.dataclass
        class Cfg:
            beta: float = 0.1

        def exits(logp, ref_logp):
            sys.exit(0)

        def nan_grad(logp, ref_logp):
            d = logp - ref_logp
            return torch.where(d > 1e9, (d - 1e10).sqrt(), d)

        def k3(logp, ref_logp):
            d = logp - ref_logp
            return torch.expm1(-d) + d

        def vanishes_at_2beta(logp, ref_logp, mask, rewards, group_size, beta):
            d = logp - ref_logp
            return (0.2 - beta) * ((torch.expm1(-d) + d) * mask).sum() / len(logp)
    '''))
    assert audit.audit_estimator(audit.load(f"{tmp_path}/odd.py:k3"), "loss")["gradient"] == "token-forward-kl"
    with pytest.raises(audit.AuditError, match="raised SystemExit"):
        audit.audit_estimator(audit.load(f"{tmp_path}/odd.py:exits"), "loss")
    with pytest.raises(audit.AuditError, match="not finite"):
        audit.audit_estimator(audit.load(f"{tmp_path}/odd.py:nan_grad"), "loss")
    r = audit.audit_loss(audit.load(f"{tmp_path}/odd.py:vanishes_at_2beta"), beta=0.1)
    assert r["beta_exponent"] is None and r["beta_responsive"] is True
    assert str(tmp_path) not in sys.path                               # the user's folder is not left on sys.path
    p = subprocess.run([sys.executable, "audit.py", "--estimator", f"{tmp_path}/odd.py:exits", "--placement", "loss",
                        "--expect", "reverse-kl"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "SystemExit" in p.stderr


def test_flags_of_the_other_mode_are_refused(capsys):
    """A flag that the chosen mode would ignore is a usage error (exit 2), not silently dropped."""
    for argv, message in ((["--loss", "x.py:f", "--kl-is-clip", "2"], "describe an --estimator"),
                          (["--estimator", "x.py:f", "--placement", "loss", "--group-size", "2"], "is for a --loss")):
        with pytest.raises(SystemExit) as e:
            audit.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
