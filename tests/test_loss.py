"""The pure RL loss (kl_rl.rl_loss / policy_loss) by Monte Carlo on the tabular toy, against exact values.

Each test samples many independent groups, takes autograd's gradient of the loss with respect to the
sampled tokens' log-probs, turns it into one gradient estimate per group (toy.table_grads) and checks the
mean against the exact expectation coordinate by coordinate, within a few standard errors.
"""
import pytest
import torch

from tools import toy
from estimators import parse_kl
from kl_rl import policy_loss, rl_loss, seq_kl_values, shaped_advantages

V, T, G = 2, 3, 4
GROUPS = 20000
Z_MAX = 4.5          # per coordinate; 18 coordinates, so a false alarm has probability ~1e-4


def group_grads(theta, phi, ys, rewards, beta, kl, level="sequence", adv="rloo", behav_logp=None, kl_is="none"):
    """(groups, P) i.i.d. estimates of E[∇ℓ(y)] per sequence, through rl_loss."""
    with torch.no_grad():
        ref_logp = toy.token_logprobs(phi, ys, V)
    logp = toy.token_logprobs(theta, ys, V).detach().requires_grad_()
    mask = torch.ones_like(logp)
    loss, _ = rl_loss(logp, ref_logp, mask, rewards, G, beta, parse_kl(kl, level, kl_is), adv, behav_logp, None)
    w = torch.autograd.grad(loss * ys.shape[0], logp)[0]                  # (N, T) = Σ_i ℓ_i per token
    return toy.table_grads(theta, ys, V, w).view(ys.shape[0] // G, G, -1).mean(1)     # (groups, P)


def zscores(samples, expected):
    """|mean − expected| / standard error per coordinate. Table entries no sequence visits (e.g. the BOS
    row at t > 0) have zero gradient in every sample: they must then match exactly (z = 0 or inf)."""
    mean, se = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    diff = (mean - expected).abs()
    return torch.where(se > 0, diff / se.clamp(min=1e-300), torch.where(diff < 1e-12, 0.0, float("inf")))


def assert_mc_matches(samples, expected):
    z = zscores(samples, expected)
    assert z.max() < Z_MAX, f"max z = {z.max():.2f}; mean {samples.mean(0)}, expected {expected}"


@pytest.fixture(scope="module")
def setup():
    theta, phi = toy.make_toy(V, T, seed=3)
    ys = toy.sample(theta.detach(), GROUPS * G, V, torch.Generator().manual_seed(11))
    return theta, phi, ys, toy.exact_reference_grads(theta, phi, V)


@pytest.mark.parametrize("kl,level", [("k1-in-reward", "sequence"), ("k1-in-reward", "token"),
                                      ("k3-in-loss", "sequence"), ("k3-in-reward", "sequence"),
                                      ("k3-in-both", "sequence"), ("k2-in-loss", "sequence")])
def test_zero_reward_loss_gradient_is_beta_times_the_configuration_kl_gradient(setup, kl, level):
    theta, phi, ys, ref = setup
    beta = 0.5
    samples = group_grads(theta, phi, ys, torch.zeros(len(ys)), beta, kl, level, "rloo")
    expected = beta * toy.exact_config_grad(theta, phi, V, kl, level)
    assert_mc_matches(samples, expected)


def test_rloo_k1_in_reward_descends_the_true_reverse_kl_and_k3_in_loss_does_not(setup):
    theta, phi, ys, ref = setup
    beta = 1.0
    k1r = group_grads(theta, phi, ys, torch.zeros(len(ys)), beta, "k1-in-reward")
    assert_mc_matches(k1r, beta * ref["rkl"])
    k3l = group_grads(theta, phi, ys, torch.zeros(len(ys)), beta, "k3-in-loss")
    assert zscores(k3l, beta * ref["rkl"]).max() > 10                                                  # the bias is resolved by the test


def test_dr_grpo_group_mean_shrinks_the_in_reward_kl_gradient_by_one_minus_one_over_g(setup):
    theta, phi, ys, ref = setup
    samples = group_grads(theta, phi, ys, torch.zeros(len(ys)), 1.0, "k1-in-reward", adv="dr_grpo")
    assert_mc_matches(samples, (1 - 1 / G) * ref["rkl"])


def test_task_reward_without_kl_gives_the_policy_gradient(setup):
    theta, phi, ys, _ = setup
    reward_table = torch.tensor([float((y.sum() % 2) == 0) for y in toy.all_sequences(V, T)], dtype=torch.float64)
    index = (ys * V ** torch.arange(T - 1, -1, -1)).sum(-1)              # sequence -> row of all_sequences
    all_lp = toy.token_logprobs(theta, toy.all_sequences(V, T), V).sum(-1)
    grad_er = torch.autograd.grad((all_lp.exp() * reward_table).sum(), theta)[0].flatten()   # ∇E[R] exactly
    for adv in ("rloo", "dr_grpo"):
        samples = group_grads(theta, phi, ys, reward_table[index], 0.0, "none", adv=adv)
        scale = 1.0 if adv == "rloo" else 1 - 1 / G
        assert_mc_matches(samples, -scale * grad_er)                      # minimising the loss ascends E[R]


def test_grpo_std_division_makes_the_in_reward_kl_pull_independent_of_beta(setup):
    # zero task reward: every group has equal rewards, so std_j R'_j = β·std_j K_j and β cancels
    theta, phi, ys, _ = setup
    ys = ys[:400 * G]
    z = torch.zeros(len(ys))
    g_small = group_grads(theta, phi, ys, z, 0.1, "k1-in-reward", adv="grpo").mean(0)
    g_large = group_grads(theta, phi, ys, z, 1.0, "k1-in-reward", adv="grpo").mean(0)
    r_small = group_grads(theta, phi, ys, z, 0.1, "k1-in-reward", adv="rloo").mean(0)
    r_large = group_grads(theta, phi, ys, z, 1.0, "k1-in-reward", adv="rloo").mean(0)
    assert torch.allclose(g_small, g_large, rtol=0.02, atol=1e-6)        # β = 0.1 pulls as hard as β = 1
    assert torch.allclose(r_small, 0.1 * r_large, rtol=1e-9)             # rloo: linear in β
    assert (g_small.norm() / r_small.norm()).item() > 3                  # grpo rescaled β up here


def test_off_policy_rho_k3_through_policy_loss_matches_token_reverse_kl_at_mu_states():
    theta, phi = toy.make_toy(V, T, seed=3)
    mu = (theta + 0.8 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(5),
                                    dtype=theta.dtype)).detach()
    ys = toy.sample(mu, GROUPS * G, V, torch.Generator().manual_seed(12))
    behav = toy.token_logprobs(mu, ys, V)
    target = toy.exact_reference_grads(theta, phi, V, weights_from=mu)["tok_rkl"]
    rho_k3 = group_grads(theta, phi, ys, torch.zeros(len(ys)), 1.0, "k3-in-loss", behav_logp=behav, kl_is="rho")
    assert_mc_matches(rho_k3, target)
    plain = group_grads(theta, phi, ys, torch.zeros(len(ys)), 1.0, "k3-in-loss", behav_logp=behav)
    assert zscores(plain, target).max() > 10


# ---------------------------------------------------------------------------------------------------------
# Bookkeeping: ratio, aggregation constant, micro-batches, metrics
# ---------------------------------------------------------------------------------------------------------
def _batch(N=8, Tn=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(N, Tn, generator=g) * 3).requires_grad_()
    ref = -torch.rand(N, Tn, generator=g) * 3
    mask = torch.ones(N, Tn)
    mask[0, 3:] = 0                                                       # a short completion
    return logp, ref, mask, (torch.rand(N, generator=g) > 0.5).float()


def test_on_policy_ratio_is_exactly_one_and_off_policy_is_not():
    logp, ref, mask, r = _batch()
    _, m = rl_loss(logp, ref, mask, r, 4, 0.1)
    assert m["ratio_mean"] == m["ratio_max"] == m["ratio_min"] == 1.0
    _, m = rl_loss(logp, ref, mask, r, 4, 0.1, behav_logp=logp.detach() - 0.1)
    assert m["ratio_min"] > 1.0


def test_micro_batches_add_up_to_the_full_batch_loss_and_gradient():
    logp, ref, mask, r = _batch()
    for kl in ("k1-in-reward", "k3-in-loss", "k3-in-both"):
        kl = parse_kl(kl)
        full, _ = rl_loss(logp, ref, mask, r, 4, 0.2, kl, token_budget=7)
        (g_full,) = torch.autograd.grad(full, logp)
        adv, _ = shaped_advantages(r, logp, ref, mask, 4, 0.2, kl)
        parts = [policy_loss(logp[i:i + 3], ref[i:i + 3], mask[i:i + 3], adv[i:i + 3], 0.2, kl, n_seqs=8,
                             token_budget=7)[0] for i in range(0, 8, 3)]
        (g_parts,) = torch.autograd.grad(sum(parts), logp)
        assert torch.allclose(sum(parts), full) and torch.allclose(g_parts, g_full)


def test_in_loss_kl_is_summed_over_tokens_not_averaged():
    # one sequence of 2 tokens and one of 4 with the same per-token KL: the sequence KL doubles
    logp = torch.zeros(2, 4, requires_grad=True)
    ref = torch.full((2, 4), -0.5)
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    adv = torch.zeros(2, 4)
    loss, m = policy_loss(logp, ref, mask, adv, 1.0, parse_kl("k1-in-loss"))
    assert m["kl_term"] == pytest.approx((2 * 0.5 + 4 * 0.5) / 2)
    loss2, _ = policy_loss(logp, ref, mask, adv, 1.0, parse_kl("k1-in-loss"), token_budget=4)
    assert loss2.item() == pytest.approx(loss.item() / 4)


def test_kl_metrics_report_all_three_estimators_and_separate_terms():
    logp, ref, mask, r = _batch()
    loss, m = rl_loss(logp, ref, mask, r, 4, 0.1, parse_kl("k3-in-loss"))
    d = (logp.detach() - ref) * mask
    assert m["k1"] == pytest.approx(d.sum(-1).mean().item(), rel=1e-5)
    assert m["k2"] == pytest.approx((0.5 * d ** 2).sum(-1).mean().item(), rel=1e-5)
    assert m["k3"] == pytest.approx(((torch.expm1(-d) + d) * mask).sum(-1).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(m["pg_term"] + m["kl_term"], rel=1e-6)
    assert seq_kl_values(logp, ref, mask) == {k: m[k] for k in ("k1", "k2", "k3")}


def test_bad_options_raise_clear_errors():
    logp, ref, mask, r = _batch()
    with pytest.raises(ValueError, match="advantage type"):
        rl_loss(logp, ref, mask, r, 4, 0.1, adv="ppo")
    with pytest.raises(ValueError, match="groups of 3"):
        rl_loss(logp, ref, mask, r, 3, 0.1)
    with pytest.raises(ValueError, match="unknown KL configuration"):
        rl_loss(logp, ref, mask, r, 4, 0.1, kl=parse_kl("k1-reward"))
