"""kl_rl.py -- the KL-regularised RL objective in plain torch: advantages, importance ratio, loss.

Maximises  E_x[ E_{y~π_θ}[R(x,y)] − β·KL(π_θ(·|x) ‖ π_ref(·|x)) ]  from a batch of sampled completions, given
as tensors (no model inside). The KL configuration is one estimators.KLConfig (from parse_kl); what each
configuration's expected gradient equals is the table at the top of estimators.py.

    kl = parse_kl("k1-in-reward")
    advantages, _ = shaped_advantages(rewards, logp.detach(), ref_logp, mask, G, beta, kl, "rloo")
    loss, metrics = policy_loss(logp, ref_logp, mask, advantages, beta, kl)      # or rl_loss(...) for both
    loss.backward()

  shaped_advantages   task rewards + the detached in-reward KL -> RLOO / Dr. GRPO / GRPO advantages
  log_importance_ratio  log ρ_t = log π_θ/μ per token, in the graph (on-policy μ = sg(π_θ): ρ ≡ 1, ∇ρ = ∇log π)
  policy_loss         −Σ clip(ρ)·A + β·Σ w·k, summed over tokens and divided by a constant
  prefix_weight_metrics  mean / max / ESS of the prefix weights W_{1:t} = Π ρ (logged when --kl-is prefix)
  rl_loss             both in one call;  seq_kl_values: the three sequence estimates, for logging

Imports only torch and estimators, so toy.py and the notebooks use exactly the trainer's loss without
transformers or peft. Simplifications: no PPO clipping (one update per batch, as in the paper's RLOO runs);
off-policy the ratio is clamped, as in the paper's async code.
"""
import math

import torch

from estimators import ESTIMATORS, kl_loss_term, kl_reward_penalty, log_prefix_weights, parse_kl, token_kl

# ---------------------------------------------------------------------------------------------------------
# Advantages: task rewards + KL configuration -> one baseline per sequence, from its group
# ---------------------------------------------------------------------------------------------------------
# Shapes: N sequences = prompts × G, grouped so rows i*G … i*G+G−1 share a prompt (generate's order);
# T completion positions. Every tensor below is (N, T) unless noted; `mask` is 1 on completion tokens.
#
#   R'_i    = R_i − β·Σ_t sg(k_i,t)                        if the KL is in the reward (else R'_i = R_i)
#   ret_i,t = R'_i (sequence level)  or  R_i − β·Σ_{s≥t} sg(k_i,s)  (token level, reward-to-go)
#   rloo    : A_i,t = ret_i,t − mean_{j≠i} R'_j     unbiased: the baseline does not depend on y_i (paper §4.1)
#   dr_grpo : A_i,t = ret_i,t − mean_j R'_j         includes y_i itself: scales the KL gradient by (1 − 1/G)
#   grpo    : A_i,t = (ret_i,t − mean_j R'_j) / (std_j R'_j + eps)
#             The std division turns β into β/std_group, a different coefficient in every group. In a group
#             whose task rewards are all equal, std_j R'_j = β·std_j K_j, so β cancels: the KL pull has the
#             same size whatever β is (and whatever the KL is). Prefer rloo/dr_grpo for KL in the reward.
ADVANTAGES = ("rloo", "dr_grpo", "grpo")


def shaped_advantages(rewards, logp, ref_logp, mask, group_size, beta, kl, adv="rloo", eps=1e-4):
    """Task rewards (N,) + detached in-reward KL -> advantages (N, T) and a metrics dict. See the rule above.

    N may be any whole number of groups (a micro-batch of whole groups gives the same rows as the full batch)."""
    N, T = mask.shape
    G = group_size
    if N % G or G < 2:
        raise ValueError(f"{N} sequences do not split into groups of {G} (need G >= 2 for a group baseline)")
    rewards = rewards.to(mask.dtype)
    ret = rewards[:, None] * mask                                            # (N, T) return credited to token t
    seq_ret = rewards                                                        # (N,)  R'_i
    if kl.in_reward:
        ret = ret - beta * kl_reward_penalty(logp, ref_logp, mask, kl)       # (N, T) sg(Σ k) or sg(Σ_{s≥t} k)
        seq_ret = rewards - beta * (token_kl(logp.detach(), ref_logp, kl.estimator) * mask).sum(-1)   # (N,)
    g = seq_ret.view(-1, G)                                                  # (N/G, G)
    if adv == "rloo":
        baseline = (g.sum(1, keepdim=True) - g) / (G - 1)                    # (N/G, G) leave-one-out mean
    elif adv in ("dr_grpo", "grpo"):
        baseline = g.mean(1, keepdim=True).expand_as(g)                      # (N/G, G) group mean, self included
    else:
        raise ValueError(f"unknown advantage type {adv!r}; choose one of: {', '.join(ADVANTAGES)}")
    scale = g.std(1, keepdim=True).expand_as(g) + eps if adv == "grpo" else torch.ones_like(g)
    advantages = (ret - baseline.reshape(N, 1)) / scale.reshape(N, 1) * mask  # (N, T)
    metrics = {"reward": rewards.mean().item(),
               "frac_reward_zero_std": (rewards.view(-1, G).std(1) == 0).float().mean().item(),
               "shaped_reward": seq_ret.mean().item()}
    return advantages.detach(), metrics


# ---------------------------------------------------------------------------------------------------------
# Loss: what autograd differentiates
# ---------------------------------------------------------------------------------------------------------
#   loss = [ Σ_i Σ_t −clip(ρ_i,t)·A_i,t  +  β·Σ_i Σ_t w_i,t·k_i,t (KL in loss) ] / (n_seqs · token_budget)
#   Clamping ρ to [lo, hi] as the paper's async code does (no PPO min) zeroes the gradient of clamped tokens.
#   Dividing by a constant (not by each completion's length) keeps Σ_t k_t a *sequence* KL; with
#   token_budget = 1 the loss is the per-sequence objective averaged over sequences; with token_budget =
#   max_new_tokens it is Dr. GRPO's constant. Either constant only rescales the whole gradient.
def log_importance_ratio(logp, behav_logp=None):
    """log ρ_t = log π_θ(y_t|s_t) − log μ(y_t|s_t): (n, T), in the graph. μ = the behaviour policy that sampled y
    (--async-level), or sg(π_θ) on-policy, where ρ ≡ 1 in value but ∇ρ = ∇log π still flows."""
    return logp - (logp.detach() if behav_logp is None else behav_logp)


def policy_loss(logp, ref_logp, mask, advantages, beta, kl, behav_logp=None, ratio_clip=(0.0, 8.0), n_seqs=None,
                token_budget=None):
    """Scalar loss for n ≤ N sequences (a micro-batch is fine) and its two terms, logged separately.

    | tensor     | shape  | meaning                                                        |
    |------------|--------|----------------------------------------------------------------|
    | logp       | (n, T) | log π_θ(y_t|s_t), WITH grad                                     |
    | ref_logp   | (n, T) | log π_ref(y_t|s_t) (adapters off, no grad)                      |
    | mask       | (n, T) | 1 on completion tokens                                          |
    | advantages | (n, T) | from shaped_advantages                                          |
    | behav_logp | (n, T) | log μ(y_t|s_t) of the policy that sampled y; None = on-policy   |
    kl: an estimators.KLConfig. n_seqs: sequences in the WHOLE batch, so micro-batch losses add up to its loss.
    """
    log_rho = log_importance_ratio(logp, behav_logp)                         # (n, T) log ρ_t
    rho = log_rho.exp()                                                      # (n, T) ρ_t
    clipped = rho.clamp(*ratio_clip) if ratio_clip is not None else rho      # (n, T)
    # ∇(−ρ·A) = −ρ·A·∇log π: for an in-reward KL, A carries −β·sg(Σ k), so this line is where the KL's
    # score-function term E[K̂·∇log π(y)] (paper Eq. 6) enters the gradient.
    pg = -(clipped * advantages * mask).sum()                                # Σ_i Σ_t −ρ·A
    # the in-loss KL is differentiated: the pathwise term E[Σ_t ∇k_t] of Eq. 6 (weighted by ρ or W if kl.weight says so)
    kl_sum = kl_loss_term(logp, ref_logp, mask, kl, rho, log_rho).sum() if kl.in_loss else logp.new_zeros(())
    denom = (n_seqs or mask.shape[0]) * (token_budget or 1)
    pg_term, kl_term = pg / denom, beta * kl_sum / denom
    with torch.no_grad():
        r = rho[mask.bool()]
        metrics = {"pg_term": pg_term.item(), "kl_term": kl_term.item(),
                   "ratio_mean": r.mean().item() if r.numel() else 1.0,
                   "ratio_max": r.max().item() if r.numel() else 1.0,
                   "ratio_min": r.min().item() if r.numel() else 1.0,
                   "clip_frac": ((r < ratio_clip[0]) | (r > ratio_clip[1])).float().mean().item()
                   if ratio_clip is not None and r.numel() else 0.0}
        if kl.in_loss and kl.weight == "prefix":
            metrics.update(prefix_weight_metrics(log_rho.detach(), mask, kl.is_clip))
    return pg_term + kl_term, metrics


def prefix_weight_metrics(log_rho, mask, clip=math.inf):
    """How usable the prefix weights W_{1:t} = Π_{u≤t} ρ_u are (unclipped values, float64 from log space):
      prefix_weight_mean / _max   over completion tokens (E_μ[W] = 1; the max is what a clip c has to reach)
      prefix_weight_ess           (Σ_i W_i)² / (n·Σ_i W_i²) of each sequence's final weight W_i = W_{1:|y_i|}:
                                  1 on-policy, → 1/n when one sequence carries the whole batch
      prefix_weight_clip_frac     fraction of completion tokens whose W exceeds the clip c
    """
    log_w = log_prefix_weights(log_rho.double(), mask)                       # (n, T)
    w_tok, final = log_w[mask.bool()].exp(), log_w[:, -1]                    # (#tokens,), (n,) log W_{1:|y|}
    if not w_tok.numel():
        return {}
    log_ess = 2 * final.logsumexp(0) - math.log(final.numel()) - (2 * final).logsumexp(0)
    return {"prefix_weight_mean": w_tok.mean().item(), "prefix_weight_max": w_tok.max().item(),
            "prefix_weight_ess": log_ess.exp().item(), "prefix_weight_clip_frac": (w_tok > clip).double().mean().item()}


def rl_loss(logp, ref_logp, mask, rewards, group_size, beta, kl=parse_kl("k1-in-reward"), adv="rloo",
            behav_logp=None, ratio_clip=(0.0, 8.0), token_budget=None):
    """Whole batch in one call: shaped_advantages (from sg(logp)) then policy_loss. -> (loss, metrics)."""
    advantages, m1 = shaped_advantages(rewards, logp.detach(), ref_logp, mask, group_size, beta, kl, adv)
    loss, m2 = policy_loss(logp, ref_logp, mask, advantages, beta, kl, behav_logp, ratio_clip,
                           token_budget=token_budget)
    return loss, {**m1, **m2, **seq_kl_values(logp, ref_logp, mask)}


def seq_kl_values(logp, ref_logp, mask):
    """Batch means of the three sequence-level estimates Σ_t k_t (always log all three, CleanRL-style)."""
    with torch.no_grad():
        return {name: (token_kl(logp.detach(), ref_logp, name) * mask).sum(-1).mean().item() for name in ESTIMATORS}
