"""Off-policy, sequence level: the prefix-weighted in-loss KL (--kl-is prefix, estimators.prefix_weighted_kl) against
exact enumeration on the tabular toy (toy.py), with fixed and variable lengths (an EOS token), through the real loss.

The paper (§3) leaves open an unbiased *sequence-level* reverse-KL gradient off-policy: token-level IS (ρ_t·k3_t)
only gives the token-level gradient at μ's states. Weighting k_s by the prefix product W_{1:s} = Π_{u≤s} ρ_u gives
the sequence-level one; truncating W at c trades that exactness for variance.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_offpolicy.py
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from tools import toy
from estimators import KL_IS, parse_kl
from kl_rl import policy_loss

# (V, T, seed, eos): fixed lengths, and variable lengths ≤ T where token V−1 ends a completion
INSTANCES = [(3, 4, 0, None), (2, 5, 1, None), (3, 4, 2, 2), (3, 5, 3, 2)]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def stale(theta, scale, seed):
    """A behaviour policy μ ≠ π_θ: the logit table moved by scale·N(0, 1)."""
    noise = torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed), dtype=theta.dtype)
    return (theta + scale * noise).detach()


@pytest.fixture(params=INSTANCES, ids=lambda p: f"V{p[0]}T{p[1]}" + ("eos" if p[3] is not None else ""))
def instance(request):
    V, T, seed, eos = request.param
    theta, phi = toy.make_toy(V, T, seed)
    return theta, phi, V, eos, stale(theta, 0.7, seed + 7)


def max_prefix_weight(theta, mu, V, eos):
    """max over all completions y and prefixes s of W_{1:s}(y), by enumeration."""
    ys = toy.all_sequences(V, theta.shape[0], eos)
    with torch.no_grad():
        log_rho = toy.token_logprobs(theta, ys, V) - toy.token_logprobs(mu, ys, V)
    return ((log_rho * toy.completion_mask(ys, eos)).cumsum(-1)).exp().max().item()


# ---------------------------------------------------------------------------------------------------------
# The toy with variable lengths is a correct oracle
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V,T", [(3, 4), (2, 5), (4, 3)])
def test_eos_toy_enumerates_every_completion_once_and_probabilities_sum_to_one(V, T):
    eos = V - 1
    ys = toy.all_sequences(V, T, eos)
    # length L < T: L−1 non-EOS tokens then EOS; length T: T−1 non-EOS tokens then any token
    assert len(ys) == sum((V - 1) ** (L - 1) for L in range(1, T)) + (V - 1) ** (T - 1) * V
    lengths = toy.completion_mask(ys, eos).sum(-1)
    assert lengths.min() == 1 and lengths.max() == T and (lengths < T).any()
    theta, _ = toy.make_toy(V, T, seed=5)
    assert toy.sequence_probs(theta, ys, V, eos).sum().item() == pytest.approx(1.0, abs=1e-12)
    # without eos the enumeration and the mask are the old ones
    assert torch.equal(toy.all_sequences(V, T), toy.all_sequences(V, T, None))
    assert toy.completion_mask(toy.all_sequences(V, T)).min() == 1


def test_eos_sampling_matches_enumerated_probabilities():
    V, T, eos, M = 3, 4, 2, 40000
    theta, _ = toy.make_toy(V, T, seed=4)
    ys_all = toy.all_sequences(V, T, eos)
    p = toy.sequence_probs(theta, ys_all, V, eos)
    ys = toy.sample(theta.detach(), M, V, torch.Generator().manual_seed(1), eos)
    counts = (ys[:, None, :] == ys_all[None]).all(-1).double().sum(0)         # (M_all,) every sample matched once
    assert counts.sum() == M
    z = (counts / M - p) / (p * (1 - p) / M).sqrt()
    assert z.abs().max() < 4.5


def test_eos_toy_on_policy_identities_still_hold(instance):
    # the oracle's rkl (autograd of the enumerated KL) against the trainer's score-function estimator, with masks
    theta, phi, V, eos, _ = instance
    ref = toy.exact_reference_grads(theta, phi, V, eos=eos)
    assert toy.exact_value(theta, phi, V, "k1", eos) == pytest.approx(ref["kl_value"], rel=1e-10)
    assert toy.exact_value(theta, phi, V, "k3", eos) == pytest.approx(ref["kl_value"], rel=1e-10)
    assert rel(toy.exact_config_grad(theta, phi, V, "k1-in-reward", eos=eos), ref["rkl"]) < 1e-8
    assert rel(toy.exact_config_grad(theta, phi, V, "k3-in-loss", eos=eos), ref["tok_fkl"]) < 1e-8
    assert rel(toy.exact_config_grad(theta, phi, V, "k2-in-loss", eos=eos), ref["tok_rkl"]) < 1e-8


# ---------------------------------------------------------------------------------------------------------
# Exact expected gradients off-policy (μ ≠ π_θ): prefix weights give the sequence reverse KL, ρ does not
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kl", ["k1-in-loss", "k3-in-loss"])
def test_prefix_weights_give_the_sequence_reverse_kl_gradient_off_policy(instance, kl):
    theta, phi, V, eos, mu = instance
    rkl = toy.exact_reference_grads(theta, phi, V, eos=eos)["rkl"]
    assert max_prefix_weight(theta, mu, V, eos) > 2                            # μ is far from π_θ here
    assert rel(toy.exact_config_grad(theta, phi, V, kl, behav=mu, kl_is="prefix", eos=eos), rkl) < 1e-8


def test_token_level_rho_k3_is_not_the_sequence_gradient(instance):
    theta, phi, V, eos, mu = instance
    rkl = toy.exact_reference_grads(theta, phi, V, eos=eos)["rkl"]
    tok_rkl_at_mu = toy.exact_reference_grads(theta, phi, V, weights_from=mu, eos=eos)["tok_rkl"]
    rho_k3 = toy.exact_config_grad(theta, phi, V, "k3-in-loss", behav=mu, kl_is="rho", eos=eos)
    assert rel(rho_k3, tok_rkl_at_mu) < 1e-8                                   # what it is (paper §2.4) ...
    assert rel(rho_k3, rkl) > 0.05                                             # ... and what it is not


def test_on_policy_prefix_weights_are_k_in_both_at_token_level_sample_by_sample(instance):
    # W ≡ 1 in value, ∇W = G_{1:s}: Σ_s W_{1:s}·k_s has exactly the per-sample gradient of k-in-both with a
    # reward-to-go penalty, so on-policy it is the sequence reverse-KL gradient, like k1-in-reward
    theta, phi, V, eos, _ = instance
    ys = toy.all_sequences(V, theta.shape[0], eos)
    logp, ref_logp = toy.token_logprobs(theta, ys, V).detach(), toy.token_logprobs(phi, ys, V)
    mask = toy.completion_mask(ys, eos)
    for k in ("k1", "k3"):
        w_prefix = toy.kl_weights(logp, ref_logp, parse_kl(f"{k}-in-loss", "sequence", "prefix"), mask=mask)
        w_both = toy.kl_weights(logp, ref_logp, parse_kl(f"{k}-in-both", "token"), mask=mask)
        assert torch.allclose(w_prefix, w_both, rtol=1e-12, atol=1e-12), k
    rkl = toy.exact_reference_grads(theta, phi, V, eos=eos)["rkl"]
    assert rel(toy.exact_config_grad(theta, phi, V, "k3-in-loss", kl_is="prefix", eos=eos), rkl) < 1e-8


# ---------------------------------------------------------------------------------------------------------
# Truncated prefix weights: biased for small c, exact once c covers every weight
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kl", ["k1-in-loss", "k3-in-loss"])
def test_truncated_prefix_weights_bias_shrinks_to_zero_as_c_grows(instance, kl):
    theta, phi, V, eos, mu = instance
    rkl = toy.exact_reference_grads(theta, phi, V, eos=eos)["rkl"]
    w_max = max_prefix_weight(theta, mu, V, eos)
    cs = sorted([1.0, 1.5, 2.0, 3.0, 5.0, 10.0, w_max * 1.0001]) + [math.inf]
    bias = [rel(toy.exact_config_grad(theta, phi, V, kl, behav=mu, kl_is="prefix", is_clip=c, eos=eos), rkl)
            for c in cs]
    print(f"\n{kl} truncation bias (max W = {w_max:.3g}):", {c: round(b, 5) for c, b in zip(cs, bias)})
    assert bias[0] > 0.01                                                     # c = 1 really truncates
    # monotone in c on these instances (not a theorem: the bias is −E_μ[Σ_s (W_{1:s} − c)_+·(...)], a vector whose
    # norm need not shrink at every step; below c = 1 it does not on one instance here)
    assert all(b1 >= b2 - 1e-12 for b1, b2 in zip(bias, bias[1:])), bias
    assert bias[-2] < 1e-8 and bias[-1] < 1e-8                                # exact once c ≥ max W
    slightly_below = toy.exact_config_grad(theta, phi, V, kl, behav=mu, kl_is="prefix", is_clip=w_max * 0.95, eos=eos)
    assert rel(slightly_below, rkl) > 1e-6                                    # ...and only then


# ---------------------------------------------------------------------------------------------------------
# Monte Carlo through policy_loss on samples from μ
# ---------------------------------------------------------------------------------------------------------
def mc_grads(theta, phi, mu, ys, V, kl, eos=None):
    """(M, P) per-sample gradient estimates through kl_rl.policy_loss (zero task reward, β = 1)."""
    with torch.no_grad():
        ref_logp, behav = toy.token_logprobs(phi, ys, V), toy.token_logprobs(mu, ys, V)
    logp = toy.token_logprobs(theta, ys, V).detach().requires_grad_()
    mask = toy.completion_mask(ys, eos)
    loss, _ = policy_loss(logp, ref_logp, mask, torch.zeros_like(logp), 1.0, kl, behav, (0.0, 8.0), n_seqs=1)
    return toy.table_grads(theta, ys, V, torch.autograd.grad(loss, logp)[0])


def zmax(samples, expected):
    mean, se = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    diff = (mean - expected).abs()
    return torch.where(se > 0, diff / se.clamp(min=1e-300), torch.where(diff < 1e-12, 0.0, math.inf)).max().item()


@pytest.mark.parametrize("eos", [None, 2])
def test_monte_carlo_prefix_k3_from_mu_matches_the_sequence_gradient_and_rho_k3_does_not(eos):
    V, T, M = 3, 3, 80000
    theta, phi = toy.make_toy(V, T, seed=3)
    mu = stale(theta, 0.5, 5)
    ys = toy.sample(mu, M, V, torch.Generator().manual_seed(12), eos)
    rkl = toy.exact_reference_grads(theta, phi, V, eos=eos)["rkl"]
    assert zmax(mc_grads(theta, phi, mu, ys, V, parse_kl("k3-in-loss", "sequence", "prefix"), eos), rkl) < 4.5
    assert zmax(mc_grads(theta, phi, mu, ys, V, parse_kl("k3-in-loss", "sequence", "rho"), eos), rkl) > 10
    clipped = toy.exact_config_grad(theta, phi, V, "k3-in-loss", behav=mu, kl_is="prefix", is_clip=1.5, eos=eos)
    assert rel(clipped, rkl) > 0.01
    assert zmax(mc_grads(theta, phi, mu, ys, V, parse_kl("k3-in-loss", "sequence", "prefix", 1.5), eos), clipped) < 4.5


# ---------------------------------------------------------------------------------------------------------
# Loss bookkeeping: metrics, masks, float range, micro-batches
# ---------------------------------------------------------------------------------------------------------
def _batch(n=6, T=5, seed=0, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(n, T, generator=g) * 3).requires_grad_()
    ref = -torch.rand(n, T, generator=g) * 3
    behav = logp.detach() + spread * torch.randn(n, T, generator=g)
    mask = torch.ones(n, T)
    mask[0, 2:] = 0
    mask[3, 4:] = 0
    return logp, ref, behav, mask


def test_prefix_weight_metrics_by_hand():
    logp, ref, behav, mask = _batch(spread=1.0)
    kl = parse_kl("k3-in-loss", "sequence", "prefix", 2.0)
    _, m = policy_loss(logp, ref, mask, torch.zeros_like(ref), 0.1, kl, behav)
    W, finals = [], []
    for i in range(mask.shape[0]):
        log_w = 0.0
        for t in range(mask.shape[1]):
            if mask[i, t]:
                log_w += float(logp[i, t].detach() - behav[i, t])
                W.append(math.exp(log_w))
        finals.append(math.exp(log_w))
    assert m["prefix_weight_mean"] == pytest.approx(sum(W) / len(W), rel=1e-5)
    assert m["prefix_weight_max"] == pytest.approx(max(W), rel=1e-5)
    assert m["prefix_weight_ess"] == pytest.approx(sum(finals) ** 2 / (len(finals) * sum(f * f for f in finals)),
                                                   rel=1e-5)
    assert m["prefix_weight_clip_frac"] == pytest.approx(sum(w > 2.0 for w in W) / len(W))
    assert 0 < m["prefix_weight_ess"] < 1 and 0 < m["prefix_weight_clip_frac"] < 1
    # on-policy: every weight is 1, the ESS is 1; other weights log no prefix statistics
    _, m = policy_loss(logp, ref, mask, torch.zeros_like(ref), 0.1, kl)
    assert (m["prefix_weight_mean"], m["prefix_weight_max"], m["prefix_weight_clip_frac"]) == (1.0, 1.0, 0.0)
    assert m["prefix_weight_ess"] == pytest.approx(1.0, abs=1e-12)
    _, m = policy_loss(logp, ref, mask, torch.zeros_like(ref), 0.1, parse_kl("k3-in-loss", kl_is="rho"), behav)
    assert not any(k.startswith("prefix_weight") for k in m)


def test_padding_does_not_enter_the_prefix_weights():
    logp, ref, behav, mask = _batch()
    kl = parse_kl("k1-in-loss", "sequence", "prefix")
    loss, m = policy_loss(logp, ref, mask, torch.zeros_like(ref), 1.0, kl, behav)
    (g,) = torch.autograd.grad(loss, logp)
    junk = torch.where(mask.bool(), behav, behav - 30.0)                        # a padded ratio of e^30
    loss2, m2 = policy_loss(logp, ref, mask, torch.zeros_like(ref), 1.0, kl, junk)
    (g2,) = torch.autograd.grad(loss2, logp)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6) and torch.allclose(g, g2) and m == m2
    assert (g[~mask.bool()] == 0).all()


def test_truncated_weights_stay_finite_where_the_product_overflows_float32():
    n, T = 2, 300
    logp = torch.full((n, T), -0.5, requires_grad=True)
    behav = torch.full((n, T), -1.0)                                          # log W_{1:T} = 150: e^150 > float32 max
    ref, mask = torch.full((n, T), -0.7), torch.ones(n, T)
    kl = parse_kl("k3-in-loss", "sequence", "prefix", 5.0)
    loss, m = policy_loss(logp, ref, mask, torch.zeros(n, T), 1.0, kl, behav)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    log_w = (0.5 * torch.arange(1, T + 1, dtype=torch.float64)).clamp(max=math.log(5.0))
    d = torch.tensor(0.2, dtype=torch.float64)                                 # δ = −0.5 − (−0.7)
    w, k3 = log_w.exp(), torch.expm1(-d) + d                                  # (T,) min(W_{1:s}, c); k3_s
    assert loss.item() == pytest.approx((w * k3).sum().item(), rel=1e-4)
    # the clipped weights keep their score term: ∂/∂logp_t = Σ_{s≥t} W̃_s k3_s + W̃_t (1 − e^{−δ_t}), per sequence / n
    expected = (w * k3).flip(0).cumsum(0).flip(0) + w * -torch.expm1(-d)
    assert torch.allclose(g[0].double(), expected / n, rtol=1e-4) and torch.equal(g[0], g[1])
    assert m["prefix_weight_max"] == pytest.approx(math.exp(150), rel=1e-6)   # logged in float64
    unclipped, _ = policy_loss(logp, ref, mask, torch.zeros(n, T), 1.0, parse_kl("k3-in-loss", "sequence", "prefix"),
                               behav)
    assert not torch.isfinite(unclipped)                                      # the unbiased one cannot be stored


def test_prefix_micro_batches_add_up_to_the_full_batch():
    logp, ref, behav, mask = _batch()
    kl = parse_kl("k3-in-loss", "sequence", "prefix", 3.0)
    full, _ = policy_loss(logp, ref, mask, torch.zeros_like(ref), 0.2, kl, behav)
    parts = sum(policy_loss(logp[i:i + 2], ref[i:i + 2], mask[i:i + 2], torch.zeros(2, 5), 0.2, kl, behav[i:i + 2],
                            n_seqs=6)[0] for i in range(0, 6, 2))
    assert torch.allclose(parts, full)
    assert torch.allclose(torch.autograd.grad(parts, logp)[0], torch.autograd.grad(full, logp)[0])


# ---------------------------------------------------------------------------------------------------------
# Configuration: which estimators and placements the prefix weight is valid with
# ---------------------------------------------------------------------------------------------------------
def test_parse_kl_accepts_prefix_only_where_it_is_unbiased():
    assert "prefix" in KL_IS
    for name in ("k1-in-loss", "k3-in-loss"):
        c = parse_kl(name, "sequence", "prefix")
        assert (c.weight, c.is_clip) == ("prefix", math.inf)
        assert parse_kl(name, kl_is="prefix", is_clip=2).is_clip == 2.0
    assert parse_kl("k3-in-loss", "sequence", "rho").is_clip == math.inf     # old positional calls unchanged
    for name, msg in [("k2-in-loss", "k2's value is biased"), ("k1-in-both", "second KL gradient"),
                      ("k3-in-both", "second KL gradient"), ("k2-in-both", "k2's value is biased"),
                      ("k1-in-reward", "applies to the loss placement"), ("none", "applies to the loss placement")]:
        with pytest.raises(ValueError, match=msg) as e:
            parse_kl(name, kl_is="prefix")
        assert "\n" not in str(e.value)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="must be > 0"):
            parse_kl("k3-in-loss", kl_is="prefix", is_clip=bad)
    for kl_is in ("none", "rho", "sg_rho"):
        with pytest.raises(ValueError, match="needs kl_is 'prefix'"):
            parse_kl("k3-in-loss", kl_is=kl_is, is_clip=5.0)
    with pytest.raises(AttributeError):
        parse_kl("k3-in-loss", kl_is="prefix").is_clip = 1.0                   # KLConfig stays immutable


# ---------------------------------------------------------------------------------------------------------
# The off-policy table (python tools/toy.py --off-policy)
# ---------------------------------------------------------------------------------------------------------
def test_off_policy_table_agrees_with_the_exact_oracle():
    rows = toy.off_policy_table(Ts=(3,), stale=(0.0, 1.0), clips=(1, 1e9), V=2, R=20, N=200)
    assert len(rows) == 2 * 6                                                  # 2 staleness × 6 estimators
    by = {(s, name): dict(kl_mu=kl_mu, ess=ess, bias=bias, err=err, sd=sd, var=var, infl=infl)
          for T, s, kl_mu, ess, name, bias, err, sd, var, infl in rows}
    for s in (0.0, 1.0):
        for name in ("W·k1", "W·k3", "min(W,1e+09)·k3"):
            assert by[(s, name)]["bias"] < 1e-8, name                          # unbiased at any staleness
        assert by[(s, "ρ·k3")]["bias"] > 0.05                                  # ρ·k3: biased, even on-policy
        assert by[(s, "ρ·k3")]["bias"] == pytest.approx(by[(s, "sg(ρ)·k2")]["bias"], rel=1e-10)
    assert by[(0.0, "W·k3")]["kl_mu"] == pytest.approx(0, abs=1e-12)
    assert by[(0.0, "W·k3")]["ess"] == pytest.approx(1, abs=1e-12)
    assert by[(1.0, "W·k3")]["kl_mu"] > 0.01 and by[(1.0, "W·k3")]["ess"] < 1
    assert by[(1.0, "min(W,1)·k3")]["bias"] > 0.01                             # the clip at 1 bites off-policy
    for (s, name), r in by.items():
        assert r["var"] > 0
        if s == 0.0:
            assert r["infl"] == pytest.approx(1.0, rel=1e-9), name            # on-policy: variance × 1 exactly
        if r["bias"] > 0.05:                                                   # biased rows: MC error ≈ exact bias
            assert abs(r["err"] - r["bias"]) < 0.1 * r["bias"] + 3 * r["sd"], (s, name)


def test_off_policy_table_rows_depend_on_their_own_T_only():
    # notebook 04 builds the table for one T, the README's for several: a row must not depend on the other Ts
    kw = dict(stale=(0.5,), clips=(2,), V=2, R=2, N=5)
    alone, together = toy.off_policy_table(Ts=(2,), **kw), toy.off_policy_table(Ts=(2, 3), **kw)
    assert alone == [row for row in together if row[0] == 2]


def test_off_policy_cli_rejects_bad_arguments():
    r = subprocess.run([sys.executable, "tools/toy.py", "--off-policy", "--stale", "-1"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and "--stale >= 0" in r.stderr
