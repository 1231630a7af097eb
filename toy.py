"""toy.py -- an exact-gradient oracle for every KL configuration, and the paper's Figure 2.

The policy π_θ and the reference π_ref are tabular autoregressive models over V tokens and T steps: the
logits of token t are a table entry indexed by (t, previous token) (the first token sees a BOS row), so
earlier tokens change later states and the sequence-level subtleties of paper §2.3 are all present.
With V^T sequences we can enumerate everything, so every expectation here is exact (float64, no sampling):

    rkl          ∇_θ KL(π_θ ‖ π_ref) over whole sequences           (the gradient we want)
    tok_fkl      Σ_t E_{s_t~π_θ}[∇_θ KL(π_ref(·|s_t) ‖ π_θ(·|s_t))]  (state weights held fixed; paper Eq. 41)
    tok_rkl      Σ_t E_{s_t~π_θ}[∇_θ KL(π_θ(·|s_t) ‖ π_ref(·|s_t))]  (token-local reverse KL = E[Σ_t δ_t g_t])
    <config>     E[ĝ] of each configuration's single-sample KL gradient, built by the SAME code the trainer
                 uses (estimators.kl_reward_penalty and kl_rl.policy_loss)

How a configuration's gradient is obtained without a special case per configuration: every KL surrogate
depends on θ only through the sampled tokens' log-probs logp_t, so autograd gives per-token weights
w_t = ∂ℓ/∂logp_t and the per-sample gradient is Σ_t w_t ∇ log π_θ(y_t|s_t). Weighting by sg(π_θ(y)) over
all sequences gives the exact expectation; averaging over sampled sequences gives the Monte-Carlo estimate.

Simplifications: zero task reward and no baseline (the KL part alone, β = 1), as in the paper's toy.

    python toy.py                          # Figure-2 table: T = 2,4,6,8,10, binary vocabulary (≈15 s)
    python toy.py --T 3 5 --V 3 --R 100    # other sizes
"""
import argparse
import itertools

import torch

from estimators import KL_CONFIGS, kl_reward_penalty, parse_kl, token_kl
from kl_rl import policy_loss

# ---------------------------------------------------------------------------------------------------------
# The tabular autoregressive policy
# ---------------------------------------------------------------------------------------------------------


def make_toy(V=2, T=4, seed=0, spread=1.0):
    """Policy θ and reference φ logit tables (T, V+1, V) in float64; θ = φ + noise so that KL > 0."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(T, V + 1, V, generator=g, dtype=torch.float64)
    theta = phi + spread * torch.randn(T, V + 1, V, generator=g, dtype=torch.float64)
    return theta.requires_grad_(), phi


def all_sequences(V, T):
    return torch.tensor(list(itertools.product(range(V), repeat=T)), dtype=torch.long)   # (V^T, T)


def prev_tokens(ys, V):
    """Row index of each state: the previous token, or V (the BOS row) at t = 0."""
    return torch.cat([torch.full_like(ys[:, :1], V), ys[:, :-1]], dim=1)                 # (M, T)


def state_logprobs(table, ys, V):
    """Full next-token log-distributions at each visited state: (M, T, V)."""
    T = ys.shape[1]
    return torch.log_softmax(table[torch.arange(T), prev_tokens(ys, V)], dim=-1)          # (M, T, V)


def token_logprobs(table, ys, V):
    return state_logprobs(table, ys, V).gather(-1, ys[..., None]).squeeze(-1)             # (M, T)


def sample(table, M, V, generator):
    """M sequences from the tabular policy (no grad)."""
    T = table.shape[0]
    ys = torch.empty(M, T, dtype=torch.long)
    prev = torch.full((M,), V, dtype=torch.long)
    with torch.no_grad():
        for t in range(T):
            probs = torch.softmax(table[t, prev], dim=-1)                                 # (M, V)
            ys[:, t] = prev = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return ys


# ---------------------------------------------------------------------------------------------------------
# Per-token weights of a configuration's single-sample KL gradient, from the trainer's own loss code
# ---------------------------------------------------------------------------------------------------------


def kl_weights(logp, ref_logp, kl, beta=1.0, behav_logp=None):
    """w_t = ∂ℓ(y)/∂logp_t for the KL part of the loss (kl: an estimators.KLConfig), zero task reward, no
    baseline: (M, T)."""
    lp = logp.detach().requires_grad_()
    mask = torch.ones_like(lp)
    advantages = -beta * kl_reward_penalty(lp, ref_logp, mask, kl) if kl.in_reward else torch.zeros_like(lp)
    # n_seqs=1: the loss is Σ_y ℓ(y), so row y of the gradient is sample y's own weights
    loss, _ = policy_loss(lp, ref_logp, mask, advantages, beta, kl, behav_logp, None, n_seqs=1)
    return torch.autograd.grad(loss, lp)[0]


# ---------------------------------------------------------------------------------------------------------
# Exact expectations by enumeration
# ---------------------------------------------------------------------------------------------------------


def _grad(scalar, theta):
    return torch.autograd.grad(scalar, theta, retain_graph=True)[0].flatten()


def exact_reference_grads(theta, phi, V, weights_from=None):
    """rkl, tok_fkl, tok_rkl (flat gradient vectors) and the exact sequence reverse KL value.

    weights_from: logit table whose sequence distribution weights the states (default π_θ itself);
    tok_rkl with weights_from = μ is what token-level importance weighting targets off-policy.
    """
    T = theta.shape[0]
    ys = all_sequences(V, T)
    logq = state_logprobs(theta, ys, V)                                           # (M, T, V)
    logr = state_logprobs(phi, ys, V)
    lp_seq = logq.gather(-1, ys[..., None]).squeeze(-1).sum(-1)                   # (M,)  log π_θ(y)
    ref_seq = logr.gather(-1, ys[..., None]).squeeze(-1).sum(-1)
    p = lp_seq.exp()
    w = p.detach() if weights_from is None else token_logprobs(weights_from, ys, V).sum(-1).exp().detach()
    kl = (p * (lp_seq - ref_seq)).sum()                                           # Σ_y π(y) log π/π_ref
    fkl_states = (logr.exp() * (logr - logq)).sum(-1).sum(-1)                     # (M,) Σ_t KL(ref‖π)(s_t)
    rkl_states = (logq.exp() * (logq - logr)).sum(-1).sum(-1)                     # (M,) Σ_t KL(π‖ref)(s_t)
    return {"rkl": _grad(kl, theta), "tok_fkl": _grad((w * fkl_states).sum(), theta),
            "tok_rkl": _grad((w * rkl_states).sum(), theta), "kl_value": kl.item()}


def exact_config_grad(theta, phi, V, kl, level="sequence", beta=1.0, behav=None, kl_is="none"):
    """E[ĝ] of the configuration, exactly. behav: a logit table μ that samples y (off-policy), or None."""
    kl = parse_kl(kl, level, kl_is)
    T = theta.shape[0]
    ys = all_sequences(V, T)
    logp = token_logprobs(theta, ys, V)                                           # (M, T) with grad
    ref_logp = token_logprobs(phi, ys, V).detach()
    behav_logp = None if behav is None else token_logprobs(behav, ys, V).detach()
    w = kl_weights(logp, ref_logp, kl, beta, behav_logp)                           # (M, T) = ∂ℓ/∂logp
    sampler_logp = logp if behav_logp is None else behav_logp
    prob = sampler_logp.sum(-1).exp().detach()                                    # (M,) P(y) under the sampler
    return _grad((prob[:, None] * w * logp).sum(), theta)


def exact_value(theta, phi, V, estimator):
    """E_{y~π_θ}[Σ_t k_t] exactly, for the value tests."""
    T = theta.shape[0]
    ys = all_sequences(V, T)
    logp, ref = token_logprobs(theta, ys, V), token_logprobs(phi, ys, V)
    return (logp.sum(-1).exp() * token_kl(logp, ref, estimator).sum(-1)).sum().item()


# ---------------------------------------------------------------------------------------------------------
# Monte Carlo: per-sample gradients Σ_t w_t (onehot(y_t) − π(·|s_t)) scattered into the logit table
# ---------------------------------------------------------------------------------------------------------


def table_grads(theta, ys, V, w):
    """Per-sample gradients Σ_t w_t ∇_θ log π_θ(y_t|s_t), (M, P), P = number of table entries."""
    M, T = ys.shape
    with torch.no_grad():
        logq = state_logprobs(theta, ys, V)                                       # (M, T, V)
        score = torch.nn.functional.one_hot(ys, V).to(logq) - logq.exp()          # (M, T, V) ∇_logits log π
        g = torch.zeros(M, T, V + 1, V, dtype=logq.dtype)
        g[torch.arange(M)[:, None], torch.arange(T), prev_tokens(ys, V)] = w[..., None] * score
    return g.reshape(M, -1)


def per_sample_grads(theta, phi, ys, V, kl, level="sequence", beta=1.0):
    """(M, P) single-sample gradient estimates of a configuration's KL part on sampled sequences ys."""
    with torch.no_grad():
        logp, ref_logp = token_logprobs(theta, ys, V), token_logprobs(phi, ys, V)  # (M, T)
    return table_grads(theta, ys, V, kl_weights(logp, ref_logp, parse_kl(kl, level), beta))


def figure2(Ts=(2, 4, 6, 8, 10), V=2, R=200, N=1000, seed=0):
    """Rows of (T, configuration, exact relative bias, MC bias mean, MC bias sd, variance)."""
    configs = [(c, "sequence") for c in KL_CONFIGS if c != "none"] + [("k1-in-reward", "token"),
                                                                      ("k3-in-reward", "token")]
    rows = []
    for T in Ts:
        theta, phi = make_toy(V, T, seed)
        true = exact_reference_grads(theta, phi, V)["rkl"]
        ys = sample(theta.detach(), R * N, V, torch.Generator().manual_seed(seed + T))
        for kl, level in configs:
            exact = exact_config_grad(theta, phi, V, kl, level)
            g = per_sample_grads(theta, phi, ys, V, kl, level)                    # (R*N, P)
            means = g.view(R, N, -1).mean(1)                                      # (R, P) one estimate per replicate
            bias = (means - true).norm(dim=-1) / true.norm()                      # (R,)
            var = (g - g.mean(0)).pow(2).sum(-1).mean().item()                    # trace of the covariance
            rows.append((T, kl if level == "sequence" else f"{kl} (token)",
                         ((exact - true).norm() / true.norm()).item(), bias.mean().item(), bias.std().item(), var))
    return rows


def main():
    ap = argparse.ArgumentParser(description="Figure 2: bias and variance of each KL configuration on a toy.")
    ap.add_argument("--T", type=int, nargs="+", default=[2, 4, 6, 8, 10], help="sequence lengths")
    ap.add_argument("--V", type=int, default=2, help="vocabulary size (the paper's toy is binary)")
    ap.add_argument("--R", type=int, default=200, help="Monte-Carlo replicates")
    ap.add_argument("--N", type=int, default=1000, help="samples per replicate")
    ap.add_argument("--seed", type=int, default=0, help="seed for the tables and the samples")
    args = ap.parse_args()
    if min(args.T) < 1 or args.V < 2 or args.R < 2 or args.N < 1 or args.V ** max(args.T) > 2 ** 20:
        ap.error("need T >= 1, V >= 2, R >= 2, N >= 1 and V**T <= 2**20 (every sequence is enumerated)")
    torch.manual_seed(args.seed)
    rows = figure2(args.T, args.V, args.R, args.N, args.seed)
    print(f"KL-gradient bias ‖E ĝ − ∇KL‖/‖∇KL‖ (exact, by enumeration) and Monte-Carlo bias of the mean of "
          f"N={args.N} samples (mean ± sd over R={args.R}); variance = trace Cov[ĝ] per sample. V={args.V}, β=1.\n")
    print(f"| {'T':>2} | {'configuration':<22} | {'exact bias':>10} | {'MC bias':>15} | {'variance':>10} |")
    print(f"|{'-' * 4}|{'-' * 24}|{'-' * 12}|{'-' * 17}|{'-' * 12}|")
    for T, name, exact, b, sd, var in rows:
        print(f"| {T:>2} | {name:<22} | {exact:>10.4f} | {b:>7.4f} ± {sd:<5.3f} | {var:>10.4g} |")


if __name__ == "__main__":
    main()
