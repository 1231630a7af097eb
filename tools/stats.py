"""stats.py -- what a study's summary.md rests on: t-intervals over seeds, one verdict rule, Holm, seeds to settle.

What it computes, from runs.jsonl's records (a dict per run: arm, beta, seed and the run's final metrics):
  mean_ci, t_quantile                    mean ± the half-width of a 95% t-interval over seeds (exact Student-t, scipy)
  cell, by_seed, paired_diff,            one arm × β's values; two arms' differences paired by seed; each seed's
  seed_means, beta_effect, pooled_at     difference averaged over β; one arm's β effect, paired by seed; the β
                                         a pooled claim actually covers
  verdict, p_value, holm_levels          the verdict rule below; the p-value that agrees with the interval (t-test
                                         for a direction, TOST for a match); Holm's step-down level per claim
  seeds_to_settle                        for "cannot tell": the seeds that, at the measured spread, would decide it
  claims, claim_row                      each of the paper's claims the runs allow, at every β it depends on; its line

The verdict rule (`verdict`, an if-chain: the first line that applies, so no two outcomes overlap). [lo, hi] is the
95% CI of the difference oriented so that the paper's side is positive; δ is the claim's margin (MARGINS, fixed here
before any data and printed beside each claim):
  a claimed direction:  lo > 0 and hi >= δ  -> holds
                        lo > 0 and hi < δ   -> holds, but smaller than the margin (significant, not practical)
                        hi < 0              -> does not hold: the opposite
                        -δ < lo, hi < δ     -> does not hold: no practical difference
                        otherwise           -> cannot tell
  a claimed match:      -δ < lo, hi < δ     -> holds;  lo > δ or hi < -δ -> does not hold;  otherwise cannot tell
Holm's column applies the same rule with each interval widened to its step-down level across a study's claims, so
the chance that any "holds" in the table is false stays at ALPHA.

Why the seed is the unit: the training seed is the randomness the paper's claims are about, and a seed's runs share
their LoRA initialisation, prompt stream and sampling seeds, across arms and across β. So arms are compared paired by
seed, and a claim over every β averages each seed's differences over β before the t-test (df = seeds − 1): its
β-pairs are not independent draws, and counting each seed once per β had narrowed every pooled interval (issue 25).
comedy.py runs the studies and writes summary.md with these; notebooks 03 and 05 call them as comedy.<name>.
"""
import math

ALPHA = 0.05       # the CIs are 95%; Holm's step-down keeps the chance of any false "holds" in a study at 5%
# What counts as "no practical difference" for each measured quantity, fixed here before any data: 2 problems in 100
# of accuracy, a 0.01 larger fall of the (0-1) training reward, 0.005 nats/token of entropy. summary.md prints them.
MARGINS = {"accuracy": 0.02, "reward drop": 0.01, "entropy": 0.005}
SETTLE_CAP = 100   # seeds_to_settle looks up to SETTLE_CAP × the seeds a claim has, then gives up (claim_row says so)


# ---------------------------------------------------------------------------------------------------------
# Intervals over seeds
# ---------------------------------------------------------------------------------------------------------
def t_quantile(q, df):
    """The q-quantile of Student's t with df degrees of freedom, exact for any df (scipy): a t table that stops at
    df 10 and falls back to 1.96 narrowed every pooled claim's CI by 7% at df 17 and flipped a verdict (issue 25)."""
    from scipy import stats
    return float(stats.t.ppf(q, df))


def mean_ci(xs, level=1 - ALPHA):
    """Mean and the half-width of a t-interval over seeds at `level` (nan for a single seed: no spread is known)."""
    n, m = len(xs), sum(xs) / len(xs)
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)


# ---------------------------------------------------------------------------------------------------------
# Selecting runs and pairing them by seed
# ---------------------------------------------------------------------------------------------------------
def cell(recs, arm, beta, key):
    beta = 0.0 if arm == "none" else beta
    return [r[key] for r in recs if r["arm"] == arm and r["beta"] == beta]


def by_seed(recs, arm, beta, key):
    """{seed: value} of one arm at one β (the `none` arm has no β: its runs serve every β)."""
    beta = 0.0 if arm == "none" else beta
    return {r["seed"]: r[key] for r in recs if r["arm"] == arm and r["beta"] == beta}


def paired_diff(recs, a, b, key, betas):
    """Per (β, seed) differences a − b over the β grid: the runs share seed and β, so differences are paired."""
    out = []
    for beta in betas:
        xa, xb = by_seed(recs, a, beta, key), by_seed(recs, b, beta, key)
        out += [xa[s] - xb[s] for s in sorted(xa.keys() & xb.keys())]
    return out


def seed_means(recs, a, b, key, betas):
    """{seed: mean over β of a − b}: the unit of a claim pooled over β is the seed, not the (β, seed) pair. Runs of one
    seed share their LoRA initialisation, prompt stream and sampling seeds at every β, so its β-pairs are not
    independent draws; a t-test over them would count each seed len(betas) times."""
    per = {}
    for beta in betas:
        xa, xb = by_seed(recs, a, beta, key), by_seed(recs, b, beta, key)
        for s in xa.keys() & xb.keys():
            per.setdefault(s, []).append(xa[s] - xb[s])
    return {s: sum(d) / len(d) for s, d in sorted(per.items())}


def pooled_at(recs, a, b, key, betas):
    """The "at" of a claim pooled over β: "every β" when both arms ran at each β of the study, else the β they share
    (a second β may hold only the arms whose claims depend on β; a pooled claim must not say it covers it)."""
    shared = [beta for beta in sorted(set(betas)) if by_seed(recs, a, beta, key).keys() & by_seed(recs, b, beta, key).keys()]
    if len(shared) == len(set(betas)):
        return "every β"
    return "β = " + ", ".join(f"{beta:g}" for beta in shared)


def beta_effect(recs, arm, lo, hi, key):
    """{seed: value at β = hi − value at β = lo} of one arm, paired by seed."""
    xl, xh = by_seed(recs, arm, lo, key), by_seed(recs, arm, hi, key)
    return {s: xh[s] - xl[s] for s in xl.keys() & xh.keys()}


# ---------------------------------------------------------------------------------------------------------
# The verdict rule, its p-values, Holm's correction and the seeds that would settle a claim
# ---------------------------------------------------------------------------------------------------------
# The module docstring's rule, line for line: the first line that applies is the verdict.
def verdict(kind, lo, hi, margin):
    if math.isnan(lo) or math.isnan(hi):
        return "cannot tell"
    if kind == "match":
        if -margin < lo and hi < margin:
            return "holds"
        return "does not hold" if lo > margin or hi < -margin else "cannot tell"
    if lo > 0:
        return "holds" if hi >= margin else "holds, but smaller than the margin"
    if hi < 0:
        return "does not hold: the opposite"
    if -margin < lo and hi < margin:
        return "does not hold: no practical difference"
    return "cannot tell"


def p_value(kind, xs, margin):
    """The p-value of the finding the claim asks for, consistent with the CI rule: a (1 − α) CI excludes 0 iff the
    two-sided t-test's p < α (a direction); it lies inside ±δ iff 2·max of the two one-sided tests' p < α (a match,
    TOST)."""
    from scipy import stats
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
    if se == 0:
        return float(m == 0) if kind != "match" else float(abs(m) >= margin)
    if kind == "match":
        return min(1.0, 2 * max(stats.t.sf((m + margin) / se, n - 1), stats.t.cdf((m - margin) / se, n - 1)))
    return float(2 * stats.t.sf(abs(m) / se, n - 1))


def holm_levels(ps, alpha=ALPHA):
    """Holm's step-down: the i-th smallest of m p-values is tested at α/(m − i + 1) until one fails; that one and
    every later one keep the failing level. -> the CI level for each claim (in the input order)."""
    order = sorted(range(len(ps)), key=lambda i: 1.0 if math.isnan(ps[i]) else ps[i])
    levels, stop = [0.0] * len(ps), None
    for rank, i in enumerate(order):
        a = alpha / (len(ps) - rank)
        if stop is None and not (ps[i] <= a):
            stop = a
        levels[i] = 1 - (a if stop is None else stop)
    return levels


def seeds_to_settle(kind, xs, margin):
    """For a claim left "cannot tell": the seeds at which the CI, at the measured mean and spread, would decide it —
    a direction: exclude 0, or (|mean| < δ) fit inside ±δ; a match: fit inside ±δ (|mean| < δ) or leave it (|mean| >
    δ) — whichever comes first; None when none would (a mean on the margin)."""
    n, m = len(xs), sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    room = [abs(m)] if kind != "match" else [abs(m) - margin]
    room += [margin - abs(m)] if abs(m) < margin else []
    for k in range(n + 1, SETTLE_CAP * n):
        if any(t_quantile(1 - ALPHA / 2, k - 1) * sd / math.sqrt(k) < r for r in room if r > 0):
            return k
    return None


# ---------------------------------------------------------------------------------------------------------
# The paper's claims
# ---------------------------------------------------------------------------------------------------------
def claims(recs, betas):
    """Each of the paper's empirical claims the study has the runs for, at every β it depends on -> a list of dicts:
    claim, at, kind, margin, n, mean, half (95% CI half-width), p, verdict (the rule above at 95%), holm (the same
    rule at Holm's level for the claim, across this list), settle (seeds that would decide a "cannot tell")."""
    lo, his, every = min(betas), sorted(b for b in set(betas) if b > min(betas)), sorted(set(betas))
    k1r_k3l = {t: seed_means(recs, "k1-in-reward", "k3-in-loss", f"{t}_greedy", every) for t in ("in", "ood")}
    loss_dd = {hi: beta_effect(recs, "k1-in-loss", lo, hi, "reward_drop") for hi in his}
    reward_dd = {hi: beta_effect(recs, "k1-in-reward", lo, hi, "reward_drop") for hi in his}
    tests = []  # (claim, at, kind, sign: +1 when the paper's side is a positive difference, margin, diffs, what)
    for b in every:
        tests.append(("K3-in-reward collapses: its final greedy accuracy falls below no-KL's", f"β = {b:g}",
                      "direction", -1, "accuracy", paired_diff(recs, "k3-in-reward", "none", "in_greedy", [b]),
                      "k3-in-reward − none, in domain"))
    for hi in his:     # a difference in differences: k1-in-loss's β effect beyond k1-in-reward's own
        tests.append(("K1-in-loss becomes unstable as β grows: its largest training-reward drop grows more than "
                      "K1-in-reward's", f"β {lo:g} → {hi:g}", "direction", 1, "reward drop",
                      [loss_dd[hi][s] - reward_dd[hi][s] for s in sorted(loss_dd[hi].keys() & reward_dd[hi].keys())],
                      f"(drop at β = {hi:g} − at β = {lo:g}), k1-in-loss − k1-in-reward"))
    at = {(a, b): pooled_at(recs, a, b, "in_greedy", every) for a, b in (("k1-in-reward", "k3-in-loss"),
                                                                          ("k3-in-both", "k1-in-reward"))}
    tests += [
        ("K3-in-loss is worse than K1-in-reward in domain", at["k1-in-reward", "k3-in-loss"], "direction", 1,
         "accuracy", list(k1r_k3l["in"].values()), "greedy accuracy, k1-in-reward − k3-in-loss"),
        ("K3-in-loss is worse than K1-in-reward out of domain", at["k1-in-reward", "k3-in-loss"], "direction", 1,
         "accuracy", list(k1r_k3l["ood"].values()), "OOD greedy accuracy, k1-in-reward − k3-in-loss"),
        ("... and the gap is largest out of domain", at["k1-in-reward", "k3-in-loss"], "direction", 1, "accuracy",
         [k1r_k3l["ood"][s] - k1r_k3l["in"][s] for s in k1r_k3l["in"].keys() & k1r_k3l["ood"].keys()],
         "OOD gap − in-domain gap"),
        ("K3-in-both matches K1-in-reward", at["k3-in-both", "k1-in-reward"], "match", 0, "accuracy",
         list(seed_means(recs, "k3-in-both", "k1-in-reward", "in_greedy", every).values()),
         "greedy accuracy, k3-in-both − k1-in-reward"),
    ]
    for hi in his:
        tests.append(("Lower β does better", f"β {lo:g} vs {hi:g}", "direction", 1, "accuracy",
                      [-d for _, d in sorted(beta_effect(recs, "k1-in-reward", lo, hi, "in_greedy").items())],
                      f"k1-in-reward greedy accuracy, β = {lo:g} − β = {hi:g}"))
    tests.append(("K3-in-loss keeps a higher entropy than K1-in-reward (forward-KL-like, mass-covering)",
                  pooled_at(recs, "k3-in-loss", "k1-in-reward", "entropy", every),
                  "direction", 1, "entropy",
                  list(seed_means(recs, "k3-in-loss", "k1-in-reward", "entropy", every).values()),
                  "entropy (nats/token, last 10% of steps), k3-in-loss − k1-in-reward"))
    out = []
    for text, at, kind, sign, quantity, xs, what in tests:
        if not xs:
            continue
        margin = MARGINS[quantity]
        m, h = mean_ci(xs)
        out.append(dict(claim=text, at=at, kind=kind, sign=sign, margin=margin, n=len(xs), mean=m, half=h, what=what,
                        p=p_value(kind, xs, margin), xs=xs))
    for c, level in zip(out, holm_levels([c["p"] for c in out])):
        for key, lvl in (("verdict", 1 - ALPHA), ("holm", level)):
            m, h = mean_ci(c["xs"], lvl)
            s = c["sign"] or 1
            c[key] = verdict(c["kind"], s * m - h, s * m + h, c["margin"])
        c["settle"] = seeds_to_settle(c["kind"], c["xs"], c["margin"]) \
            if c["verdict"] == "cannot tell" and c["n"] > 1 else None
    return out


def claim_row(c):
    """The claim's line in summary.md's table."""
    settle = (f"; ~{c['settle']} seeds would settle it" if c["settle"] else      # None: past SETTLE_CAP × n seeds
              f"; not even {SETTLE_CAP * c['n']} seeds would settle it" if c["verdict"] == "cannot tell" and c["n"] > 1
              else "")
    p = "n/a" if math.isnan(c["p"]) else f"{c['p']:.2g}"
    return (f"| {c['claim']} | {c['at']} | ±{c['margin']:g} | **{c['verdict']}** | {c['holm']} | "
            f"{c['mean']:+.3f} ± {c['half']:.3f} ({c['what']}; {c['n']} seeds, p = {p}{settle}) |")
