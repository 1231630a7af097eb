"""estimators.py -- the KL estimators k1, k2, k3 and where they go in the RL objective.

RL fine-tuning maximises  J(θ) = E_x[ E_{y~π_θ}[R(x,y)] − β·KL(π_θ(·|x) ‖ π_ref(·|x)) ]  with the
sequence-level *reverse* KL  KL = E_{y~π_θ}[Σ_t δ_t],  δ_t = log π_θ(y_t|s_t) − log π_ref(y_t|s_t).
The KL is estimated from the sampled tokens (Schulman's naming, paper §2):

    k1_t = δ_t                        unbiased value          autodiff gradient  g_t
    k2_t = ½ δ_t²                     biased value            autodiff gradient  δ_t g_t
    k3_t = e^{−δ_t} − 1 + δ_t          unbiased value, ≥ 0     autodiff gradient  (1 − e^{−δ_t}) g_t

(g_t = ∇_θ log π_θ(y_t|s_t), G(y) = Σ_t g_t). For any estimator K̂ = Σ_t k_t the paper's Eq. 6 splits

    ∇_θ E_{y~π_θ}[K̂]  =  E[Σ_t ∇k_t]   (pathwise: what you get by putting K̂ in the LOSS and autodiffing)
                      +  E[K̂ · G(y)]    (score function: what you get by subtracting sg(K̂) from the REWARD)

so only "both" terms together are ∇ of the estimator's expectation. What each configuration's expected
gradient of the KL part equals (β = 1; all on-policy; checked to 1e-8 by exact enumeration in tests/):

    configuration   expected KL gradient                           why
    --------------  ---------------------------------------------  -------------------------------------------
    none            0                                              no KL term
    k1-in-reward    ∇ reverse KL  (unbiased)                       score term of an unbiased value estimate
    k1-in-loss      exactly 0                                      pathwise E[Σ g_t] = 0: pure noise
    k1-in-both      ∇ reverse KL                                   both terms of Eq. 6 for an unbiased value
    k2-in-reward    biased (score term of a biased value)          E[Σ ½δ² · G] is not ∇KL
    k2-in-loss      token-local partial gradient E[Σ_t δ_t g_t]    misses the future-KL terms (Tang & Munos)
    k2-in-both      ∇E[Σ k2]: biased (k2's value is biased)        both terms, but of the wrong quantity
    k3-in-reward    ∇ reverse KL − token-forward-KL gradient       score term = ∇E[Σk3] − pathwise term
    k3-in-loss      token-forward-KL gradient Σ_t ∇KL(π_ref‖π_θ)   E[(1−r_t) g_t] = −E_{π_ref}[∇log π_θ]
                    at the states π_θ visits (paper Eq. 41)        (GRPO's default; state weights held fixed)
    k3-in-both      ∇ reverse KL                                   both terms of Eq. 6 for an unbiased value

`level` only matters for the reward placement: "sequence" subtracts β·Σ_t k_t from the whole sequence's
reward (the paper's choice), "token" gives token t the reward-to-go penalty β·Σ_{s≥t} k_s (OpenRLHF). The
dropped past terms Σ_{s<t} k_s are fixed given s_t and E[g_t|s_t] = 0, so every expected gradient above is
unchanged and only the variance changes: usually it drops, not always (the exact token/sequence variance ratio is
1.095 at T = 2 on notebook 01's toy, below 1 from T = 4: the dropped terms can be negatively correlated with the rest).

Off-policy (samples from a behaviour policy μ, ρ_t = π_θ/μ per token), for the loss placement:
ρ_t·k3_t with ρ_t NOT detached (RPG / DeepSeek-V3.2) and sg(ρ_t)·k2_t both have per-sample gradient
ρ_t δ_t g_t, whose μ-expectation is the token-level reverse-KL gradient E_{π_θ}[Σ_t δ_t g_t] at μ's states;
plain k3 gives E_μ[(1 − r_t) g_t], which is neither. On-policy ρ ≡ 1 but must stay in the graph (ρ = π/sg(π)).
The paper leaves the *sequence*-level gradient off-policy open (§3); kl_is = "prefix" (k1- or k3-in-loss only)
weights k_s by the prefix product W_{1:s} = Π_{u≤s} ρ_u instead, which gives it exactly (prefix_weighted_kl;
optionally truncated at c, trading bias for variance).

Run `python tools/toy.py` for the paper's Figure 2 (bias and variance of each configuration on a toy).
"""
import math
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------------------------
# The KL configuration: parsed once from what a user types, then passed around as one immutable value
# ---------------------------------------------------------------------------------------------------------
ESTIMATORS = ("k1", "k2", "k3")
PLACEMENTS = ("reward", "loss", "both")
KL_CONFIGS = ("none",) + tuple(f"{k}-in-{p}" for k in ESTIMATORS for p in PLACEMENTS)
LEVELS = ("sequence", "token")
KL_IS = ("none", "rho", "sg_rho", "prefix")


@dataclass(frozen=True)
class KLConfig:
    """Which estimator, where it goes, and how it is weighted off-policy. Build it with parse_kl."""
    name: str                      # what the user typed: "none" or "k{1,2,3}-in-{reward,loss,both}"
    estimator: str = None          # "k1" | "k2" | "k3" | None (no KL)
    in_reward: bool = False        # subtract β·sg(Σ k) from the reward (score-function term of Eq. 6)
    in_loss: bool = False          # add β·Σ k to the loss and differentiate it (pathwise term of Eq. 6)
    level: str = "sequence"        # in-reward penalty: the sequence sum, or reward-to-go ("token")
    weight: str = "none"           # off-policy weight on the in-loss k_t: "none", "rho" (ρ_t), "sg_rho" (sg(ρ_t)),
    #                                "prefix" (W_{1:t} = Π_{u≤t} ρ_u: the sequence-level gradient, prefix_weighted_kl)
    is_clip: float = math.inf      # "prefix" only: truncate W at this c (inf = unbiased)


def parse_kl(name, level="sequence", kl_is="none", is_clip=math.inf):
    """'k3-in-loss' -> KLConfig(estimator='k3', in_reward=False, in_loss=True, ...); 'none' -> no KL at all.

    The one place a KL configuration is validated. It also rejects options the configuration would silently
    ignore (a token level without a reward placement, an off-policy weight without a loss placement, a clip
    without prefix weights): a user who asked for them meant something.
    """
    est, place = (None, None) if name == "none" else name.partition("-in-")[::2]
    if name != "none" and (est not in ESTIMATORS or place not in PLACEMENTS):
        raise ValueError(f"unknown KL configuration {name!r}; choose one of: {', '.join(KL_CONFIGS)}")
    if level not in LEVELS:
        raise ValueError(f"unknown KL level {level!r}; choose one of: {', '.join(LEVELS)}")
    if kl_is not in KL_IS:
        raise ValueError(f"unknown KL importance weight {kl_is!r}; choose one of: {', '.join(KL_IS)}")
    in_reward, in_loss = place in ("reward", "both"), place in ("loss", "both")
    if level == "token" and not in_reward:
        raise ValueError(f"KL level 'token' (reward-to-go) needs a reward placement; {name!r} has none")
    if kl_is != "none" and not in_loss:
        raise ValueError(f"KL importance weight {kl_is!r} applies to the loss placement; {name!r} has none")
    if kl_is == "prefix" and (est == "k2" or in_reward):   # see prefix_weighted_kl: why only these two are unbiased
        why = "k2's value is biased, so W·k2 follows ∇E[Σ k2]" if est == "k2" else \
            "its in-reward part would add a second KL gradient"
        raise ValueError(f"KL importance weight 'prefix' is unbiased with k1-in-loss or k3-in-loss only; "
                         f"{name!r}: {why}")
    if not is_clip > 0:                                    # also rejects NaN
        raise ValueError(f"KL importance-weight clip must be > 0 (inf = no clip), got {is_clip}")
    if is_clip != math.inf and kl_is != "prefix":
        raise ValueError(f"KL importance-weight clip {is_clip:g} truncates prefix weights; it needs kl_is 'prefix', "
                         f"not {kl_is!r}")
    return KLConfig(name, est, in_reward, in_loss, level, kl_is, float(is_clip))


# ---------------------------------------------------------------------------------------------------------
# The three estimators, per token, from the log-ratio δ = log π_θ − log π_ref on the sampled token
# ---------------------------------------------------------------------------------------------------------
def k1(delta):
    return delta


def k2(delta):
    return 0.5 * delta.pow(2)


# e^{−δ} overflows float32 once −δ > 88. Below δ = −20 (π_θ(y_t) < 2e-9·π_ref(y_t), a token no sampling policy
# realistically emits) k3 continues along its tangent at −20: finite in every dtype, still decreasing in δ, with
# the right gradient sign (slope 1 − e^{20} < 0). Clamping δ inside the exponential alone would give slope +1
# there, and an in-loss k3 would then push π_θ further from π_ref.
K3_DELTA_MIN = -20.0


def k3(delta):
    d = delta.clamp(min=K3_DELTA_MIN)                               # δ, or the threshold below it
    exact = torch.expm1(-d) + d                                     # expm1 keeps precision near δ = 0
    tangent = (delta - d) * (-torch.expm1(-d))                      # 0 above the threshold
    return exact + tangent


ESTIMATOR_FNS = {"k1": k1, "k2": k2, "k3": k3}


def token_kl(logp, ref_logp, estimator):
    """Per-token estimate k_t (N, T); differentiable through logp if logp requires grad."""
    delta = logp - ref_logp                                         # (N, T)  δ_t
    return ESTIMATOR_FNS[estimator](delta)


# ---------------------------------------------------------------------------------------------------------
# Where the estimate goes
# ---------------------------------------------------------------------------------------------------------
def kl_reward_penalty(logp, ref_logp, mask, kl):
    """Detached KL penalty to subtract (times β) from the return each token is credited with.

    | tensor   | shape  | meaning                                                        |
    |----------|--------|----------------------------------------------------------------|
    | logp     | (N, T) | log π_θ(y_t|s_t) of the sampled tokens (detached here)          |
    | ref_logp | (N, T) | log π_ref(y_t|s_t)                                              |
    | mask     | (N, T) | 1 on completion tokens (up to and including EOS), 0 on padding  |
    | return   | (N, T) | sequence: Σ_s k_s on every token;  token: Σ_{s≥t} k_s (reward-to-go) |
    """
    k = token_kl(logp.detach(), ref_logp, kl.estimator) * mask      # (N, T)
    if kl.level == "sequence":
        return k.sum(-1, keepdim=True).expand_as(k) * mask          # (N, T) one scalar per sequence
    return k.flip(-1).cumsum(-1).flip(-1) * mask                    # (N, T) Σ_{s≥t} k_s


def kl_loss_term(logp, ref_logp, mask, kl, rho, log_rho=None):
    """Differentiable KL term for the loss, summed over each completion: (N,) per sequence.

    Summing (not averaging) over tokens makes it an estimate of the *sequence* KL, not KL/|y|.
    rho: the token importance ratio ρ_t = π_θ/μ, in the graph (exp of kl_rl.log_importance_ratio). kl.weight picks the
    off-policy weight on k_t:
      "none"   1         (GRPO as written)
      "rho"    ρ_t       with gradient through ρ  (use with k3: RPG / DeepSeek-V3.2)
      "sg_rho" sg(ρ_t)   (use with k2)
      "prefix" min(W_{1:t}, c) = min(Π_{u≤t} ρ_u, c), in the graph (k1 or k3; prefix_weighted_kl)
    log_rho: log ρ_t (N, T) in the graph, for "prefix" (taken from rho if None; pass it: e^x then log loses
    ratios outside the float range, and the prefix product leaves it quickly).
    """
    if kl.weight == "prefix":
        log_rho = rho.log() if log_rho is None else log_rho
        return prefix_weighted_kl(logp, ref_logp, mask, log_rho, kl.estimator, kl.is_clip)
    k = token_kl(logp, ref_logp, kl.estimator)                      # (N, T) with grad
    if kl.weight != "none":
        k = (rho.detach() if kl.weight == "sg_rho" else rho) * k    # (N, T)
    return (k * mask).sum(-1)                                       # (N,)


def log_prefix_weights(log_rho, mask):
    """log W_{1:t} = Σ_{u≤t} log ρ_u over completion tokens (N, T); padding adds nothing, so the last column
    is each sequence's whole-completion weight log W_{1:|y|}."""
    return (log_rho * mask).cumsum(-1)                              # (N, T)


def prefix_weighted_kl(logp, ref_logp, mask, log_rho, estimator, clip=math.inf):
    """Σ_t min(W_{1:t}, c)·k_t per sequence (N,): the in-loss KL whose gradient, off-policy, is the SEQUENCE-level
    reverse-KL gradient (the paper's open problem, §3). y ~ μ; ρ_u = π_θ(y_u|s_u)/μ(y_u|s_u); W_{1:s} = Π_{u≤s} ρ_u;
    G_{1:s} = Σ_{t≤s} g_t; r_s = π_ref/π_θ = e^{−δ_s}.  Why it is unbiased:

      ∇KL = E_π[Σ_t ∇δ_t] + E_π[Σ_t g_t Σ_s δ_s]      Eq. 6 for KL = E_π[Σ_s δ_s]; the pathwise term is
                                                     E_π[Σ_t g_t] = 0 (a score has mean 0), and so are the
          = E_π[Σ_t g_t Σ_{s≥t} δ_s]                  s < t terms: δ_s is fixed given s_t, E[g_t|s_t] = 0
          = Σ_s E_π[δ_s G_{1:s}]                      swap the sums
          = Σ_s E_μ[W_{1:s} δ_s G_{1:s}]              per-decision IS: δ_s G_{1:s} depends on y_{1:s} only, whose
                                                     likelihood ratio is W_{1:s}. The whole-sequence weight W_{1:|y|}
                                                     has the same mean given y_{1:s} but multiplies in |y| − s more
                                                     ratios' variance; ρ_s alone (kl_is = "rho") drops G_{1:s−1}
                                                     and gives only the token-level gradient.
    Autodiff of Σ_s W_{1:s} k_s with W in the graph (∇W_{1:s} = W_{1:s} G_{1:s}) gives, per sample, that estimator
    plus a term of mean zero:
      k1:  Σ_s W_{1:s} [δ_s G_{1:s} + g_s]                  the pathwise term: E_μ[W_{1:s} g_s] = E_π[g_s] = 0
      k3:  Σ_s W_{1:s} [δ_s G_{1:s} + (r_s − 1) G_{1:s−1}]  (k3's pathwise (1 − r_s)g_s cancels the g_s part of its
           score term); E_μ[ρ_s (r_s − 1) | y_{<s}] = E_π[r_s − 1 | s_s] = Σ_v π_ref(v|s_s) − 1 = 0, a control variate
    so both are unbiased; equivalently, E_μ[Σ_s W_{1:s} k_s] = E_π[Σ_s k_s] = KL for every θ, and μ does not
    depend on θ. k2 is not value-unbiased (W·k2 would follow ∇E_π[Σ ½δ²]); parse_kl rejects it. On-policy W ≡ 1
    in value but ∇W = W·G flows (log ρ = logp − sg(logp)), and the per-sample gradients are exactly k1-in-both /
    k3-in-both at token level (reward-to-go).

    Truncation at c: W̃ = min(W, c) in value with gradient W̃·G_{1:s} (the excess log W − log c is detached, so
    the score term still flows, and W̃ ≤ c cannot overflow). Bias = −E_μ[Σ_s (W_{1:s} − c)_+ ·(bracket above)]:
    0 once c ≥ max W, → 0 as c → ∞; clip = inf is the unbiased estimator. Its variance grows like E_μ[W²], i.e.
    geometrically in the length and the μ–π distance (`python tools/toy.py --off-policy` measures it).
    """
    log_w = log_prefix_weights(log_rho, mask)                      # (N, T) log W_{1:t}, in the graph
    log_w = log_w - (log_w - math.log(clip)).clamp(min=0).detach()  # (N, T) value min(log W, log c); ∇ = G_{1:t}
    k = token_kl(logp, ref_logp, estimator)                         # (N, T) with grad
    return (log_w.exp() * k * mask).sum(-1)                         # (N,)


# ---------------------------------------------------------------------------------------------------------
# Exact per-token KL over the whole vocabulary (a diagnostic; needs full logits, so only on a few rows)
# ---------------------------------------------------------------------------------------------------------
def full_kl(logits, ref_logits, temperature=1.0):
    """Exact per-position KLs from full logits (..., V) -> three tensors (...):

    reverse = KL(π_θ(·|s) ‖ π_ref(·|s)) = Σ_v π_θ (log π_θ − log π_ref)   what the objective penalises
    forward = KL(π_ref(·|s) ‖ π_θ(·|s)) = Σ_v π_ref (log π_ref − log π_θ)  what k3-in-loss follows (Eq. 41)
    entropy = −Σ_v π_θ log π_θ
    """
    logq = torch.log_softmax(logits.float() / temperature, dim=-1)          # (..., V) policy
    logr = torch.log_softmax(ref_logits.float() / temperature, dim=-1)      # (..., V) reference
    q, r = logq.exp(), logr.exp()
    reverse = (q * (logq - logr)).sum(-1)
    forward = (r * (logr - logq)).sum(-1)
    entropy = -(q * logq).sum(-1)
    return reverse, forward, entropy
