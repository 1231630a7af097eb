"""toy.py -- an exact-gradient oracle for every KL configuration, and the paper's Figure 2.

The policy π_θ and the reference π_ref are tabular autoregressive models over V tokens and T steps: the
logits of token t are a table entry indexed by (t, previous token) (the first token sees a BOS row), so
earlier tokens change later states and the sequence-level subtleties of paper §2.3 are all present.
With eos = a token id, completions have variable lengths ≤ T: a completion ends at its first EOS and a mask
(completion_mask, as the trainer's) hides the padding after it. With at most V^T sequences we can enumerate
everything, so every expectation here is exact (float64, no sampling):

    rkl          ∇_θ KL(π_θ ‖ π_ref) over whole sequences           (the gradient we want)
    tok_fkl      Σ_t E_{s_t~π_θ}[∇_θ KL(π_ref(·|s_t) ‖ π_θ(·|s_t))]  (state weights held fixed; paper Eq. 41)
    tok_rkl      Σ_t E_{s_t~π_θ}[∇_θ KL(π_θ(·|s_t) ‖ π_ref(·|s_t))]  (token-local reverse KL = E[Σ_t δ_t g_t])
    <config>     E[ĝ] of each configuration's single-sample KL gradient, built by the SAME code the trainer
                 uses (estimators.kl_reward_penalty and kl_rl.policy_loss)

How a configuration's gradient is obtained without a special case per configuration: every KL surrogate
depends on θ only through the sampled tokens' log-probs logp_t, so autograd gives per-token weights
w_t = ∂ℓ/∂logp_t and the per-sample gradient is Σ_t w_t ∇ log π_θ(y_t|s_t). Weighting by sg(π_θ(y)) over
all sequences gives the exact expectation; averaging over sampled sequences gives the Monte-Carlo estimate.
Off-policy the weight is the sampler's μ(y) instead, and μ's log-probs go to the loss as behav_logp.

Simplifications: zero task reward and no baseline (the KL part alone, β = 1), as in the paper's toy.

    python tools/toy.py                          # Figure-2 table: T = 2,4,6,8,10, binary vocabulary (≈15 s)
    python tools/toy.py --T 3 5 --V 3 --R 100    # other sizes
    python tools/toy.py --off-policy             # off-policy: token-level ρ·k3 vs the sequence-level prefix W·k (≈35 s)
    python tools/toy.py --eos --V 3              # variable lengths: token V−1 is an EOS (all completions of length ≤ T)
"""
import argparse
import itertools
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repo root: `python tools/toy.py` runs from here,
if ROOT not in sys.path:                                             # and the core modules (train, run_folder, ...) sit one
    sys.path.insert(0, ROOT)                                         # folder up

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


def all_sequences(V, T, eos=None):
    """Every sequence (M, T): all V^T, or with an EOS token id every completion of length ≤ T (the positions
    after the first EOS are padding, filled with EOS so each completion appears once)."""
    ys = torch.tensor(list(itertools.product(range(V), repeat=T)), dtype=torch.long)     # (V^T, T)
    return ys if eos is None else torch.unique(pad_after_eos(ys, eos), dim=0)            # (M, T)


def completion_mask(ys, eos=None):
    """1 on completion tokens up to and including the first EOS, 0 after it; all ones without EOS: (M, T)."""
    if eos is None:
        return torch.ones(ys.shape, dtype=torch.float64)
    is_eos = (ys == eos).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).to(torch.float64)                          # no EOS before t


def pad_after_eos(ys, eos):
    return torch.where(completion_mask(ys, eos).bool(), ys, eos)                          # (M, T)


def prev_tokens(ys, V):
    """Row index of each state: the previous token, or V (the BOS row) at t = 0."""
    return torch.cat([torch.full_like(ys[:, :1], V), ys[:, :-1]], dim=1)                 # (M, T)


def state_logprobs(table, ys, V):
    """Full next-token log-distributions at each visited state: (M, T, V)."""
    T = ys.shape[1]
    return torch.log_softmax(table[torch.arange(T), prev_tokens(ys, V)], dim=-1)          # (M, T, V)


def token_logprobs(table, ys, V):
    return state_logprobs(table, ys, V).gather(-1, ys[..., None]).squeeze(-1)             # (M, T)


def sample(table, M, V, generator, eos=None):
    """M sequences from the tabular policy (no grad); with eos, each ends at its first EOS (padded after it)."""
    T = table.shape[0]
    ys = torch.empty(M, T, dtype=torch.long)
    prev = torch.full((M,), V, dtype=torch.long)
    with torch.no_grad():
        for t in range(T):
            probs = torch.softmax(table[t, prev], dim=-1)                                 # (M, V)
            ys[:, t] = prev = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return ys if eos is None else pad_after_eos(ys, eos)     # tokens after EOS were never part of y


# ---------------------------------------------------------------------------------------------------------
# Per-token weights of a configuration's single-sample KL gradient, from the trainer's own loss code
# ---------------------------------------------------------------------------------------------------------


def kl_weights(logp, ref_logp, kl, beta=1.0, behav_logp=None, mask=None):
    """w_t = ∂ℓ(y)/∂logp_t for the KL part of the loss (kl: an estimators.KLConfig), zero task reward, no
    baseline: (M, T); 0 where mask (completion_mask) is 0."""
    lp = logp.detach().requires_grad_()
    mask = torch.ones_like(lp) if mask is None else mask
    advantages = -beta * kl_reward_penalty(lp, ref_logp, mask, kl) if kl.in_reward else torch.zeros_like(lp)
    # n_seqs=1: the loss is Σ_y ℓ(y), so row y of the gradient is sample y's own weights
    loss, _ = policy_loss(lp, ref_logp, mask, advantages, beta, kl, behav_logp, None, n_seqs=1)
    return torch.autograd.grad(loss, lp)[0]


# ---------------------------------------------------------------------------------------------------------
# Exact expectations by enumeration
# ---------------------------------------------------------------------------------------------------------


def _grad(scalar, theta):
    return torch.autograd.grad(scalar, theta, retain_graph=True)[0].flatten()


def exact_reference_grads(theta, phi, V, weights_from=None, eos=None):
    """rkl, tok_fkl, tok_rkl (flat gradient vectors) and the exact sequence reverse KL value.

    weights_from: logit table whose sequence distribution weights the states (default π_θ itself);
    tok_rkl with weights_from = μ is what token-level importance weighting targets off-policy.
    eos: an EOS token id (variable lengths ≤ T: the states after EOS are never visited), or None.
    """
    T = theta.shape[0]
    ys = all_sequences(V, T, eos)
    mask = completion_mask(ys, eos)                                               # (M, T)
    logq = state_logprobs(theta, ys, V)                                           # (M, T, V)
    logr = state_logprobs(phi, ys, V)
    lp_seq = (logq.gather(-1, ys[..., None]).squeeze(-1) * mask).sum(-1)          # (M,)  log π_θ(y)
    ref_seq = (logr.gather(-1, ys[..., None]).squeeze(-1) * mask).sum(-1)
    p = lp_seq.exp()
    w = p.detach() if weights_from is None else sequence_probs(weights_from, ys, V, eos)
    kl = (p * (lp_seq - ref_seq)).sum()                                           # Σ_y π(y) log π/π_ref
    fkl_states = ((logr.exp() * (logr - logq)).sum(-1) * mask).sum(-1)            # (M,) Σ_t KL(ref‖π)(s_t)
    rkl_states = ((logq.exp() * (logq - logr)).sum(-1) * mask).sum(-1)            # (M,) Σ_t KL(π‖ref)(s_t)
    return {"rkl": _grad(kl, theta), "tok_fkl": _grad((w * fkl_states).sum(), theta),
            "tok_rkl": _grad((w * rkl_states).sum(), theta), "kl_value": kl.item()}


def sequence_probs(table, ys, V, eos=None):
    """P(y) under a logit table, no grad: (M,)."""
    with torch.no_grad():
        return (token_logprobs(table, ys, V) * completion_mask(ys, eos)).sum(-1).exp()


def exact_config_grad(theta, phi, V, kl, level="sequence", beta=1.0, behav=None, kl_is="none", is_clip=math.inf,
                      eos=None):
    """E[ĝ] of the configuration, exactly. behav: a logit table μ that samples y (off-policy), or None."""
    ys = all_sequences(V, theta.shape[0], eos)
    logp = token_logprobs(theta, ys, V)                                           # (M, T) with grad
    ref_logp = token_logprobs(phi, ys, V).detach()
    behav_logp = None if behav is None else token_logprobs(behav, ys, V).detach()
    w = kl_weights(logp, ref_logp, parse_kl(kl, level, kl_is, is_clip), beta, behav_logp, completion_mask(ys, eos))
    prob = sequence_probs(theta if behav is None else behav, ys, V, eos)          # (M,) P(y) under the sampler
    return _grad((prob[:, None] * w * logp).sum(), theta)


def exact_value(theta, phi, V, estimator, eos=None):
    """E_{y~π_θ}[Σ_t k_t] exactly, for the value tests."""
    ys = all_sequences(V, theta.shape[0], eos)
    logp, ref = token_logprobs(theta, ys, V), token_logprobs(phi, ys, V)
    k = token_kl(logp, ref, estimator) * completion_mask(ys, eos)                 # (M, T)
    return (sequence_probs(theta, ys, V, eos) * k.sum(-1)).sum().item()


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


def per_sample_grads(theta, phi, ys, V, kl, level="sequence", beta=1.0, behav=None, kl_is="none", is_clip=math.inf,
                     eos=None):
    """(M, P) single-sample gradient estimates of a configuration's KL part on sequences ys (sampled from behav)."""
    with torch.no_grad():
        logp, ref_logp = token_logprobs(theta, ys, V), token_logprobs(phi, ys, V)  # (M, T)
        behav_logp = None if behav is None else token_logprobs(behav, ys, V)
    kl = parse_kl(kl, level, kl_is, is_clip)
    return table_grads(theta, ys, V, kl_weights(logp, ref_logp, kl, beta, behav_logp, completion_mask(ys, eos)))


def figure2(Ts=(2, 4, 6, 8, 10), V=2, R=200, N=1000, seed=0, eos=None):
    """Rows of (T, configuration, exact relative bias, MC bias mean, MC bias sd, variance)."""
    configs = [(c, "sequence") for c in KL_CONFIGS if c != "none"] + [("k1-in-reward", "token"),
                                                                      ("k3-in-reward", "token")]
    rows = []
    for T in Ts:
        theta, phi = make_toy(V, T, seed)
        true = exact_reference_grads(theta, phi, V, eos=eos)["rkl"]
        ys = sample(theta.detach(), R * N, V, torch.Generator().manual_seed(seed + T), eos)
        for kl, level in configs:
            exact = exact_config_grad(theta, phi, V, kl, level, eos=eos)
            g = per_sample_grads(theta, phi, ys, V, kl, level, eos=eos)          # (R*N, P)
            means = g.view(R, N, -1).mean(1)                                      # (R, P) one estimate per replicate
            bias = (means - true).norm(dim=-1) / true.norm()                      # (R,)
            var = (g - g.mean(0)).pow(2).sum(-1).mean().item()                    # trace of the covariance
            rows.append((T, kl if level == "sequence" else f"{kl} (token)",
                         ((exact - true).norm() / true.norm()).item(), bias.mean().item(), bias.std().item(), var))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Off-policy: the sequence-level estimator (prefix weights) against the token-level ones, vs length and staleness
# ---------------------------------------------------------------------------------------------------------
OFF_POLICY = (("ρ·k3", "k3-in-loss", "rho"), ("sg(ρ)·k2", "k2-in-loss", "sg_rho"), ("W·k1", "k1-in-loss", "prefix"),
              ("W·k3", "k3-in-loss", "prefix"))


OFF_POLICY_LEN = 12          # off_policy_table's toy length: each T ≤ 12 observes the first T steps of one toy


def moments(q, g):
    """E_q[ĝ] (P,) and trace Cov_q[ĝ] of per-sample gradients g (M, P) under sequence probabilities q (M,)."""
    mean = (q[:, None] * g).sum(0)
    return mean, (q * (g - mean).pow(2).sum(-1)).sum().item()


def off_policy_table(Ts=(2, 4, 8, 12), stale=(0.25, 0.5, 1.0), clips=(1, 2, 5, 10), V=2, R=50, N=200, seed=0,
                     eos=None):
    """Rows of (T, s, KL(μ‖π_θ), ESS, estimator, exact bias, MC error mean, MC error sd, variance, variance ×).

    Every T ≤ OFF_POLICY_LEN observes the first T steps of one toy of that length, so rows at different T are
    comparable and a row does not depend on which other Ts are asked for (notebook 04's one-T table agrees with the
    README's). μ = θ + s·ε, ε ~ N(0, 1) per logit: s stands for staleness (n steps of a random walk of step σ:
    s = σ√n). Bias ‖E_μ ĝ − ∇KL‖/‖∇KL‖ against the SEQUENCE reverse-KL gradient, exact (enumeration); MC error:
    the same for the mean of N samples from μ (R replicates); variance: trace Cov_μ[ĝ] per sample from the R·N
    samples; "variance ×": its exact value over the same estimator's on-policy (μ = π_θ) one, the cost of the
    importance weights alone.
    ESS = 1/E_μ[W_{1:|y|}²], the effective fraction of a large batch.
    """
    configs = [(name, parse_kl(kl, "sequence", w)) for name, kl, w in OFF_POLICY] + \
        [(f"min(W,{c:g})·k3", parse_kl("k3-in-loss", "sequence", "prefix", c)) for c in clips]
    rows = []
    for T in Ts:
        full, phi_full = make_toy(V, max(T, OFF_POLICY_LEN), seed)          # the same toy for every T ≤ OFF_POLICY_LEN
        eps_full = torch.randn(full.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=full.dtype)
        theta, phi, eps = full[:T].detach().requires_grad_(), phi_full[:T], eps_full[:T]
        true = exact_reference_grads(theta, phi, V, eos=eos)["rkl"]
        ys_all = all_sequences(V, T, eos)
        mask_all = completion_mask(ys_all, eos)
        with torch.no_grad():
            lp_all, ref_all = token_logprobs(theta, ys_all, V), token_logprobs(phi, ys_all, V)   # (M, T)
        p = (lp_all * mask_all).sum(-1).exp()                                                    # (M,) π_θ(y)

        def grads(ys, lp, ref, mask, behav_lp, kl):                              # (M, P) per-sample gradients
            return table_grads(theta, ys, V, kl_weights(lp, ref, kl, 1.0, behav_lp, mask))
        on_var = {name: moments(p, grads(ys_all, lp_all, ref_all, mask_all, lp_all, kl))[1] for name, kl in configs}
        for s in stale:
            mu = (theta + s * eps).detach()
            q = sequence_probs(mu, ys_all, V, eos)                                                # (M,) μ(y)
            kl_mu, ess = (q * (q / p).log()).sum().item(), 1 / (p * p / q).sum().item()
            ys = sample(mu, R * N, V, torch.Generator().manual_seed(seed + T), eos)                # (R*N, T) from μ
            with torch.no_grad():
                lp, ref, beh = (token_logprobs(table, ys, V) for table in (theta, phi, mu))       # (R*N, T)
                beh_all = token_logprobs(mu, ys_all, V)
            for name, kl in configs:
                exact, var_exact = moments(q, grads(ys_all, lp_all, ref_all, mask_all, beh_all, kl))
                g = grads(ys, lp, ref, completion_mask(ys, eos), beh, kl)                          # (R*N, P)
                err = (g.view(R, N, -1).mean(1) - true).norm(dim=-1) / true.norm()                # (R,)
                rows.append((T, s, kl_mu, ess, name, ((exact - true).norm() / true.norm()).item(), err.mean().item(),
                             err.std().item(), (g - g.mean(0)).pow(2).sum(-1).mean().item(), var_exact / on_var[name]))
    return rows


def main():
    ap = argparse.ArgumentParser(description="Figure 2 (bias and variance of each KL configuration on a toy), or "
                                             "with --off-policy the same for the off-policy KL estimators.")
    ap.add_argument("--off-policy", action="store_true", help="samples from a stale μ: ρ·k3, sg(ρ)·k2, prefix W·k")
    ap.add_argument("--T", type=int, nargs="+", help="sequence lengths (default 2 4 6 8 10; off-policy 2 4 8 12)")
    ap.add_argument("--V", type=int, default=2, help="vocabulary size (the paper's toy is binary)")
    ap.add_argument("--eos", action="store_true", help="token V-1 ends a sequence: variable lengths <= T")
    ap.add_argument("--R", type=int, help="Monte-Carlo replicates (default 200; off-policy 50)")
    ap.add_argument("--N", type=int, help="samples per replicate (default 1000; off-policy 200)")
    ap.add_argument("--stale", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="off-policy: μ = θ + s·ε")
    ap.add_argument("--clips", type=float, nargs="+", default=[1, 2, 5, 10], help="off-policy: truncations c of W")
    ap.add_argument("--seed", type=int, default=0, help="seed for the tables and the samples")
    args = ap.parse_args()
    T = args.T or ([2, 4, 8, 12] if args.off_policy else [2, 4, 6, 8, 10])
    R, N = args.R or (50 if args.off_policy else 200), args.N or (200 if args.off_policy else 1000)
    if min(T) < 1 or args.V < 2 or R < 2 or N < 1 or args.V ** max(T) > 2 ** 20:
        ap.error("need T >= 1, V >= 2, R >= 2, N >= 1 and V**T <= 2**20 (every sequence is enumerated)")
    if min(args.stale) < 0 or not min(args.clips) > 0:
        ap.error("need --stale >= 0 and --clips > 0")
    torch.manual_seed(args.seed)
    eos = args.V - 1 if args.eos else None
    if args.off_policy:
        return print_off_policy(off_policy_table(T, args.stale, args.clips, args.V, R, N, args.seed, eos), args.V, R,
                                N, eos)
    rows = figure2(T, args.V, R, N, args.seed, eos)
    print(f"KL-gradient bias ‖E ĝ − ∇KL‖/‖∇KL‖ (exact, by enumeration) and Monte-Carlo bias of the mean of "
          f"N={N} samples (mean ± sd over R={R}); variance = trace Cov[ĝ] per sample. V={args.V}, β=1.\n")
    print(f"| {'T':>2} | {'configuration':<22} | {'exact bias':>10} | {'MC bias':>15} | {'variance':>10} |")
    print(f"|{'-' * 4}|{'-' * 24}|{'-' * 12}|{'-' * 17}|{'-' * 12}|")
    for T, name, exact, b, sd, var in rows:
        print(f"| {T:>2} | {name:<22} | {exact:>10.4f} | {b:>7.4f} ± {sd:<5.3f} | {var:>10.4g} |")


def print_off_policy(rows, V, R, N, eos):
    print(f"Off-policy KL gradients against ∇ SEQUENCE reverse KL, samples from μ = θ + s·ε. bias: exact relative "
          f"bias; MC error: ‖mean of N={N} − ∇KL‖/‖∇KL‖ (mean ± sd over R={R}); variance: trace Cov[ĝ] per sample "
          f"(MC); × on-policy: exact variance over the same estimator's at μ = π_θ; ESS = 1/E_μ[W²]. V={V}"
          f"{', EOS: variable lengths' if eos is not None else ''}.\n")
    print("|  T |    s | KL(μ‖π) |   ESS | estimator     |   bias |        MC error | variance | × on-policy |")
    print("|---:|-----:|--------:|------:|:--------------|-------:|----------------:|---------:|------------:|")
    for T, s, kl_mu, ess, name, bias, e, sd, var, infl in rows:
        print(f"| {T:>2} | {s:4.2f} | {kl_mu:7.3f} | {ess:5.3f} | {name:<13} | {bias:6.3f} | {e:6.3f} ± {sd:<6.3f} "
              f"| {var:8.3g} | {infl:11.3g} |")


if __name__ == "__main__":
    main()
