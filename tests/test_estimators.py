"""Estimator values and every configuration's exact expected gradient, by enumeration (toy.py).

The identities asserted here are the paper's claims (paper §2-3; the table at the top of estimators.py): they hold for any
parameters, so each is checked on two toy instances; the "≠" checks guard against an identity that holds
by accident on one instance (e.g. a gradient that is zero everywhere would pass an "= 0" test alone).
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from tools import toy
from estimators import KL_CONFIGS, full_kl, k1, k2, k3, parse_kl

INSTANCES = [(3, 4, 0), (2, 5, 1)]   # (V, T, seed): 81 and 32 sequences


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=INSTANCES, ids=lambda p: f"V{p[0]}T{p[1]}")
def instance(request):
    V, T, seed = request.param
    theta, phi = toy.make_toy(V, T, seed)
    return theta, phi, V, toy.exact_reference_grads(theta, phi, V)


# ---------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------
def test_k1_and_k3_are_unbiased_for_the_sequence_reverse_kl_and_k2_is_not(instance):
    theta, phi, V, ref = instance
    kl = ref["kl_value"]
    assert kl > 0.05                                                   # a non-trivial instance
    assert toy.exact_value(theta, phi, V, "k1") == pytest.approx(kl, rel=1e-10)
    assert toy.exact_value(theta, phi, V, "k3") == pytest.approx(kl, rel=1e-10)
    assert abs(toy.exact_value(theta, phi, V, "k2") - kl) > 1e-3 * kl    # far above the 1e-10 precision


def test_k3_is_nonnegative_and_matches_its_formula_in_the_normal_range():
    delta = torch.linspace(-20, 50, 20001, dtype=torch.float64)
    assert (k3(delta) >= 0).all()
    assert torch.allclose(k3(delta), torch.exp(-delta) - 1 + delta, rtol=1e-10, atol=1e-12)  # no clamp
    assert torch.equal(k2(delta), 0.5 * delta * delta)
    assert torch.equal(k1(delta), delta)


def test_k3_keeps_precision_near_zero_in_float32():
    # exp(−δ) − 1 + δ in float32 loses everything at δ = 1e-4 (true value δ²/2 = 5e-9); expm1 does not
    delta = torch.tensor([1e-4, -1e-4, 1e-3], dtype=torch.float32)
    exact = (torch.exp(-delta.double()) - 1 + delta.double())
    assert torch.allclose(k3(delta).double(), exact, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_estimators_finite_at_extreme_log_ratios(dtype):
    delta = torch.tensor([-1e3, -100.0, -30.0, 0.0, 30.0, 100.0, 1e3], dtype=dtype, requires_grad=True)
    for fn in (k1, k2, k3):
        v = fn(delta)
        assert torch.isfinite(v).all(), fn.__name__
        (g,) = torch.autograd.grad(v.sum(), delta)
        assert torch.isfinite(g).all(), fn.__name__
    assert (k3(delta) >= 0).all()


def test_orientation_upweighted_token_has_positive_k1():
    # the policy puts more mass on the sampled token than the reference does: log π − log π_ref > 0
    logp, ref_logp = torch.log(torch.tensor([0.8])), torch.log(torch.tensor([0.2]))
    assert k1(logp - ref_logp).item() == pytest.approx(math.log(4))
    assert k3(logp - ref_logp).item() == pytest.approx(0.25 - 1 + math.log(4))


def test_full_kl_orientation_against_hand_computed_values():
    p, r = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    reverse, forward, entropy = full_kl(p.log(), r.log())
    assert reverse.item() == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5), rel=1e-5)
    assert forward.item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-5)
    assert entropy.item() == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), rel=1e-5)
    # temperature rescales the logits of both distributions before the softmax
    rt, _, _ = full_kl(p.log(), r.log(), temperature=2.0)
    q2 = torch.softmax(p.log() / 2, -1)
    assert rt.item() == pytest.approx((q2 * (q2.log() - r.log())).sum().item(), rel=1e-5)


def test_parse_kl_names_and_errors():
    def fields(c):
        return c.estimator, c.in_reward, c.in_loss
    assert fields(parse_kl("none")) == (None, False, False)
    assert fields(parse_kl("k1-in-reward")) == ("k1", True, False)
    assert fields(parse_kl("k3-in-loss")) == ("k3", False, True)
    assert fields(parse_kl("k2-in-both")) == ("k2", True, True)
    assert len(KL_CONFIGS) == 10
    for bad in ("k4-in-loss", "k1-in-rewards", "k1", "", "K1-in-reward"):
        with pytest.raises(ValueError, match="unknown KL configuration"):
            parse_kl(bad)
    with pytest.raises(ValueError, match="needs a reward placement"):
        parse_kl("k3-in-loss", level="token")
    with pytest.raises(ValueError, match="applies to the loss placement"):
        parse_kl("k1-in-reward", kl_is="rho")


# ---------------------------------------------------------------------------------------------------------
# Exact expected gradients of each configuration (paper Eq. 6 and the table in estimators.py)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kl,level", [("k1-in-reward", "sequence"), ("k1-in-both", "sequence"),
                                      ("k3-in-both", "sequence"), ("k1-in-reward", "token"),
                                      ("k1-in-both", "token"), ("k3-in-both", "token")])
def test_unbiased_configurations_give_the_reverse_kl_gradient(instance, kl, level):
    theta, phi, V, ref = instance
    assert rel(toy.exact_config_grad(theta, phi, V, kl, level), ref["rkl"]) < 1e-8


def test_k1_in_loss_has_exactly_zero_expected_gradient(instance):
    theta, phi, V, ref = instance
    g = toy.exact_config_grad(theta, phi, V, "k1-in-loss")
    assert g.norm() < 1e-12 * ref["rkl"].norm()
    # ...while its single samples are not zero: it is pure noise, not "no term"
    ys = toy.all_sequences(V, theta.shape[0])[:5]
    assert toy.per_sample_grads(theta, phi, ys, V, "k1-in-loss").norm(dim=-1).min() > 1e-3


@pytest.mark.parametrize("level", ["sequence"])
def test_k3_in_loss_is_the_token_forward_kl_gradient(instance, level):
    theta, phi, V, ref = instance
    g = toy.exact_config_grad(theta, phi, V, "k3-in-loss")
    assert rel(g, ref["tok_fkl"]) < 1e-8
    assert rel(g, ref["rkl"]) > 0.05                                   # and therefore biased


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_k3_in_reward_is_reverse_minus_token_forward(instance, level):
    theta, phi, V, ref = instance
    g = toy.exact_config_grad(theta, phi, V, "k3-in-reward", level)
    assert rel(g, ref["rkl"] - ref["tok_fkl"]) < 1e-8
    assert rel(g, ref["rkl"]) > 0.05


def test_k2_in_loss_is_the_token_local_partial_gradient(instance):
    theta, phi, V, ref = instance
    g = toy.exact_config_grad(theta, phi, V, "k2-in-loss")
    assert rel(g, ref["tok_rkl"]) < 1e-8
    assert rel(g, ref["rkl"]) > 0.05                                   # misses the future-KL terms


def test_beta_scales_every_configuration_linearly(instance):
    theta, phi, V, ref = instance
    for kl in ("k1-in-reward", "k3-in-loss", "k3-in-both"):
        g1 = toy.exact_config_grad(theta, phi, V, kl, beta=1.0)
        assert rel(toy.exact_config_grad(theta, phi, V, kl, beta=0.3), 0.3 * g1) < 1e-10


def test_none_has_no_kl_gradient(instance):
    theta, phi, V, _ = instance
    assert toy.exact_config_grad(theta, phi, V, "none").abs().max() == 0


# ---------------------------------------------------------------------------------------------------------
# Off-policy: samples from a behaviour policy μ ≠ π_θ (paper §2.4, RPG)
# ---------------------------------------------------------------------------------------------------------
def test_off_policy_importance_weighted_kl_in_loss_gives_the_token_reverse_kl_gradient(instance):
    theta, phi, V, _ = instance
    mu = (theta + 0.7 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(7),
                                    dtype=theta.dtype)).detach()
    target = toy.exact_reference_grads(theta, phi, V, weights_from=mu)["tok_rkl"]   # at μ's states
    rho_k3 = toy.exact_config_grad(theta, phi, V, "k3-in-loss", behav=mu, kl_is="rho")
    sg_rho_k2 = toy.exact_config_grad(theta, phi, V, "k2-in-loss", behav=mu, kl_is="sg_rho")
    plain_k3 = toy.exact_config_grad(theta, phi, V, "k3-in-loss", behav=mu)
    assert rel(rho_k3, target) < 1e-8
    assert rel(sg_rho_k2, target) < 1e-8
    assert rel(plain_k3, target) > 0.05
    # detaching ρ in ρ·k3 (the "constant 1" pitfall) falls back to a biased gradient
    assert rel(toy.exact_config_grad(theta, phi, V, "k3-in-loss", behav=mu, kl_is="sg_rho"), target) > 0.05


def test_on_policy_rho_k3_equals_k2_in_loss(instance):
    # ρ = π/sg(π) ≡ 1 on-policy, yet it carries the score function: ∇(ρ·k3) = δ·∇log π = ∇k2
    theta, phi, V, ref = instance
    assert rel(toy.exact_config_grad(theta, phi, V, "k3-in-loss", kl_is="rho"), ref["tok_rkl"]) < 1e-8


# ---------------------------------------------------------------------------------------------------------
# The Figure-2 command
# ---------------------------------------------------------------------------------------------------------
def test_figure2_rows_agree_with_the_exact_oracle():
    rows = {(T, name): (exact, b, sd, var) for T, name, exact, b, sd, var in toy.figure2(Ts=(3,), R=20, N=400)}
    assert len(rows) == 11                                              # 9 configurations + 2 token-level
    for name in ("k1-in-reward", "k1-in-both", "k3-in-both", "k1-in-reward (token)"):
        assert rows[(3, name)][0] < 1e-8
    assert rows[(3, "k1-in-loss")][0] == pytest.approx(1.0, abs=1e-9)   # E ĝ = 0: relative bias exactly 1
    for (_, name), (exact, b, sd, var) in rows.items():
        assert var > 0
        if exact > 0.05:                                                # biased rows: MC bias ≈ exact bias
            assert abs(b - exact) < 0.1 * exact + 3 * sd, name


def test_toy_cli_rejects_bad_sizes():
    r = subprocess.run([sys.executable, "tools/toy.py", "--V", "1"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and "V >= 2" in r.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k3_far_tail_keeps_growing_with_the_right_gradient_sign(dtype):
    # below the threshold (δ < −20) k3 follows its tangent: an in-loss k3 must still pull π_θ back toward π_ref,
    # i.e. dk3/dδ < 0 wherever π_θ puts less mass than π_ref, and > 0 where it puts more
    delta = torch.linspace(-1000, 1000, 4001, dtype=torch.float64).to(dtype).requires_grad_()
    v = k3(delta)
    (g,) = torch.autograd.grad(v.sum(), delta)
    assert torch.isfinite(v).all() and torch.isfinite(g).all() and (v >= 0).all()
    neg, pos = delta.detach() < -1e-2, delta.detach() > 1e-2
    assert (g[neg] < 0).all() and (g[pos] > 0).all()
    assert (v[neg][1:] <= v[neg][:-1]).all()                           # non-increasing as δ grows toward 0
    tail = delta.detach() < -20
    assert (g[tail] < -1e8).all()                                       # the slope at the threshold, 1 − e^{20}
