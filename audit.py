"""audit.py -- "is my trainer's KL right?": the exact-gradient oracle of toy.py, pointed at anyone's KL code.

Give it the KL code of your own trainer; it says which gradient that code gives in expectation, exactly, and how big:

    python audit.py --estimator my_kl.py:kl_penalty --placement loss                  # k3 in the loss, GRPO-style?
    python audit.py --estimator my_kl.py:kl_penalty --placement reward --level token  # reward-to-go, OpenRLHF-style
    python audit.py --estimator my_kl.py:k3 --placement loss --kl-is rho --off-policy  # ρ·k3 from a stale sampler
    python audit.py --loss my_loss.py:grpo_loss --beta 0.04 --json --expect reverse-kl # in CI: exit 1 if it is not

What the code must be (tensors (N, T), float64: N sequences of T tokens):
  --estimator NAME(logp, ref_logp) -> (N, T) per-token estimate, differentiable in logp (like verl's kl_penalty or
              OpenRLHF's compute_approx_kl). The audit places it with the trainer's own code (estimators.py, kl_rl.py:
              the code paths of `train.py --kl`): detached in the reward, differentiated in the loss, or both (same β).
  --loss      NAME(logp, ref_logp, mask, rewards, group_size, beta) -> the scalar you call backward() on (the README
              snippets' signature); with --off-policy it is also given behav_logp= (log μ of the sampler) by keyword.
              Rows i·G … i·G+G−1 are one group; the task rewards are all 0, so the gradient is the KL part alone.

How: π_θ and π_ref are small tabular autoregressive policies (toy.py: V = 3 tokens, T = 3 steps, the logits of a token
indexed by the previous one, so earlier tokens change later states and the future-KL terms matter), three seeds, each
far enough from π_ref that biases show (KL 0.27–1.44 nats). Every completion (V^T = 27) and, for --loss, every group of
G completions (27^G, all in one batch) is enumerated and weighted by its probability under the sampler (π_θ, or with
--off-policy a behaviour policy μ = θ + ε, ε ~ N(0, 1) per logit), so E[ĝ] below is exact, not sampled.

Verdict: E[ĝ] is compared with β × each named gradient (see --help). It is NAMED when its cosine with one of them is
≥ COS_MIN = 0.999 on every seed (the named gradients themselves have cosines ≤ 0.977 here, checked on every run),
"zero" when ‖E ĝ‖ < 1e-3·β‖∇KL‖ on every seed, else "other" with the nearest name (largest |mean cos|) and that.
Also measured: scale (E ĝ's coefficient along β × that gradient, mean over seeds: "both" with β/2 in each is
reverse-kl at scale 0.5), value_bias (--estimator only: E_{π_θ}[Σ_t k_t] − KL in nats, mean over seeds), and
beta_responsive (doubling the β passed in changes E[ĝ] by ≥ 10%: false for code that ignores its β).

Simplifications: no task reward and no PG clipping in --estimator mode (the KL part alone; in expectation a baseline
changes nothing); fixed-length completions (mask all ones). Importing the file RUNS the user's code.
Exit status: 0 audited, 1 audited but --expect differs, 2 bad input (one line on stderr).
"""
import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import os
import sys
import time

import torch

import estimators
from tools import toy
from estimators import parse_kl

# ---------------------------------------------------------------------------------------------------------
# What the audit can name, and the toy it measures on
# ---------------------------------------------------------------------------------------------------------
GRADIENTS = {
    "reverse-kl": "∇ KL(π_θ‖π_ref) of whole sequences: the objective's gradient (k1 in the reward; k1 or k3 in both)",
    "token-reverse-kl": "∇ Σ_t KL_t(π_θ‖π_ref) at the sampled states, future-KL terms missing (k2 in the loss; "
                        "ρ·k3 off-policy)",
    "token-forward-kl": "∇ Σ_t KL_t(π_ref‖π_θ) at the sampled states (k3 in the loss: GRPO's default)",
    "zero": "no KL gradient in expectation: noise only (k1 differentiated in the loss) or no KL at all",
    "other": "none of these (e.g. k3 in the reward: reverse minus token-forward); the nearest is named, with cosine",
}
NAMED = ("reverse-kl", "token-reverse-kl", "token-forward-kl")
COS_MIN = 0.999          # named when cos ≥ this on every seed
ZERO_TOL = 1e-3          # zero when ‖E ĝ‖ < ZERO_TOL · β‖∇KL‖ on every seed
V, T, SPREAD, SEEDS, STALE = 3, 3, 1.5, (0, 1, 2), 1.0
USER = "audited"         # the name under which the user's estimator is lent to estimators.token_kl


class AuditError(Exception):
    """Bad input: a missing file or name, a wrong signature, a non-finite or wrongly shaped output (exit 2)."""


def cos(a, b):
    return (a @ b / (a.norm() * b.norm())).item()


@functools.lru_cache(maxsize=2)
def instances(off_policy=False):
    """One dict per seed: θ, φ (π_ref), μ (the sampler off-policy, else None), the named gradients, the exact KL."""
    out = []
    for seed in SEEDS:
        theta, phi = toy.make_toy(V, T, seed, SPREAD)
        eps = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1000 + seed), dtype=theta.dtype)
        mu = (theta + STALE * eps).detach() if off_policy else None
        ref = toy.exact_reference_grads(theta, phi, V, weights_from=mu)     # token-level ones at the sampler's states
        named = dict(zip(NAMED, (ref["rkl"], ref["tok_rkl"], ref["tok_fkl"])))
        apart = max(cos(named[a], named[b]) for i, a in enumerate(NAMED) for b in NAMED[i + 1:])
        assert apart < COS_MIN - 0.01, f"seed {seed}: named gradients {apart:.4f} apart: they cannot be told apart"
        out.append(dict(seed=seed, theta=theta, phi=phi, mu=mu, named=named, kl=ref["kl_value"]))
    return out


# ---------------------------------------------------------------------------------------------------------
# The user's code: loaded from a file, called with checks
# ---------------------------------------------------------------------------------------------------------
def load(spec):
    """'path/to/file.py:NAME' -> the callable. Importing the file runs it, as any test runner does."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise AuditError(f"{spec!r}: expected FILE.py:NAME")
    if not os.path.isfile(path):
        raise AuditError(f"{path}: no such file")
    folder = os.path.dirname(os.path.abspath(path))
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)                                              # its own sibling imports work
    module_name = "audited_" + os.path.splitext(os.path.basename(path))[0]
    try:
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(module_name, path))
        sys.modules[module_name] = module           # as an import does: dataclasses with future annotations need it
        module.__spec__.loader.exec_module(module)
    except (Exception, SystemExit) as e:            # sys.exit() in the file must not end the audit with exit 0
        raise AuditError(f"importing {path} raised {type(e).__name__}: {e}") from e
    finally:
        if added:
            sys.path.remove(folder)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AuditError(f"{path} has no function {name!r}")
    return fn


def call(fn, args, kwargs, what):
    """fn(*args, **kwargs), its signature checked first; its own exceptions become one line."""
    label = getattr(fn, "__name__", repr(fn))
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        hint = "; behav_logp is passed with --off-policy only" if "behav_logp" in inspect.signature(fn).parameters \
            and "behav_logp" not in kwargs else ""
        raise AuditError(f"{label}{inspect.signature(fn)}: wrong signature, {what}{hint}") from None
    except ValueError:                                                          # a builtin without a signature
        pass
    try:
        return fn(*args, **kwargs)
    except (Exception, SystemExit) as e:            # sys.exit() in user code: exit 2, never a silent exit 0
        raise AuditError(f"{label} raised {type(e).__name__}: {e}") from e


def checked(out, shape, label):
    if not torch.is_tensor(out) or tuple(out.shape) != tuple(shape):
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise AuditError(f"{label} returned {got}, expected a tensor of shape {tuple(shape)}")
    if not torch.isfinite(out).all():
        raise AuditError(f"{label} returned non-finite values (inf or nan) on the toy policies")
    return out


@contextlib.contextmanager
def lent(fn, ref_logp):
    """Lend the user's estimator to the trainer's code for one call. estimators.token_kl looks an estimator up by name
    and calls it on δ = logp − ref_logp; every call of toy.kl_weights passes this ref_logp, so ref_logp + δ is logp,
    in value and in gradient."""
    def estimate(delta):                                                        # (M, T) -> (M, T)
        k = call(fn, (ref_logp + delta, ref_logp), {}, "expected NAME(logp, ref_logp)")
        return checked(k, delta.shape, getattr(fn, "__name__", "estimator"))
    estimators.ESTIMATOR_FNS[USER] = estimate
    try:
        yield
    finally:
        estimators.ESTIMATOR_FNS.pop(USER, None)


# ---------------------------------------------------------------------------------------------------------
# Exact expected gradients: E[ĝ] = Σ_y P(y) Σ_t w_t(y) ∇log π_θ(y_t|s_t), w_t = ∂ℓ/∂logp_t from the code audited
# ---------------------------------------------------------------------------------------------------------
def expectation(inst, ys, weights):
    """Σ_y Σ_t weights[y, t] ∇_θ log π_θ(y_t|s_t): weights (M, T) already carry each sequence's probability."""
    logp = toy.token_logprobs(inst["theta"], ys, V)                             # (M, T) with grad
    return torch.autograd.grad((weights.detach() * logp).sum(), inst["theta"])[0].flatten()


def sequence_tensors(inst):
    ys = toy.all_sequences(V, T)                                                # (M, T) every completion
    with torch.no_grad():
        logp, ref = toy.token_logprobs(inst["theta"], ys, V), toy.token_logprobs(inst["phi"], ys, V)
        behav = None if inst["mu"] is None else toy.token_logprobs(inst["mu"], ys, V)
    prob = toy.sequence_probs(inst["theta"] if inst["mu"] is None else inst["mu"], ys, V)   # (M,) under the sampler
    return ys, logp, ref, behav, prob


def estimator_grad(fn, inst, kl, beta):
    """E[ĝ] of the KL part with the user's estimator placed as kl (an estimators.KLConfig) says: zero task reward,
    no baseline (toy.kl_weights: estimators.kl_reward_penalty + kl_rl.policy_loss, as train.py)."""
    ys, logp, ref, behav, prob = sequence_tensors(inst)
    with lent(fn, ref):
        w = toy.kl_weights(logp, ref, kl, beta, behav)                          # (M, T) per-sample weights
    return expectation(inst, ys, prob[:, None] * w)


def estimator_value(fn, inst):
    """E_{y~π_θ}[Σ_t k_t] − KL: the value bias of the estimate itself (on-policy, whatever the sampler)."""
    ys, logp, ref, _, _ = sequence_tensors(inst)
    k = checked(call(fn, (logp, ref), {}, "expected NAME(logp, ref_logp)"), logp.shape, fn.__name__).detach()
    return (toy.sequence_probs(inst["theta"], ys, V) * k.sum(-1)).sum().item() - inst["kl"]


def loss_grad(fn, inst, beta, group_size):
    """E[ĝ] of a whole loss: every group of G completions (M^G groups, one batch), task rewards 0. The loss of n groups
    is the mean of their losses, so n·∂loss/∂logp are one group's gradient weights."""
    ys, logp, ref, behav, prob = sequence_tensors(inst)
    G = group_size
    groups = torch.cartesian_prod(*[torch.arange(len(ys))] * G).view(-1, G)  # (n, G) sequence indices
    rows = groups.reshape(-1)                                                   # (n·G,) row -> sequence
    lp = logp[rows].clone().requires_grad_()                                    # (n·G, T)
    mask, rewards = torch.ones_like(lp.detach()), torch.zeros(len(rows), dtype=lp.dtype)
    kwargs = {} if behav is None else {"behav_logp": behav[rows]}
    what = "expected NAME(logp, ref_logp, mask, rewards, group_size, beta" + (", behav_logp=)" if kwargs else ")")
    loss = call(fn, (lp, ref[rows], mask, rewards, G, beta), kwargs, what)
    label = getattr(fn, "__name__", "loss")
    if torch.is_tensor(loss) and loss.numel() == 1:
        loss = loss.reshape(())
    checked(loss, (), label)
    w = torch.autograd.grad(loss, lp, allow_unused=True)[0] if loss.requires_grad else None
    w = torch.zeros_like(lp) if w is None else checked(w, lp.shape, f"the gradient of {label}")
    p_row = prob[groups].prod(1).repeat_interleave(G) * len(groups)             # (n·G,) P(group) · n
    weights = torch.zeros_like(logp).index_add_(0, rows, p_row[:, None] * w)   # (M, T) summed over each sequence's rows
    return expectation(inst, ys, weights)


# ---------------------------------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------------------------------
def verdict(grads, insts, beta, grads_2beta):
    """grads: E[ĝ] per seed at β; grads_2beta: at 2β (first seed). -> the result dict."""
    if not all(torch.isfinite(g).all() for g in [*grads, grads_2beta]):   # e.g. torch.where's NaN gradient trap
        raise AuditError("the code's gradient is not finite on the toy policies (a NaN or inf in E[ĝ]); a value "
                         "can be finite while its gradient is not, as with torch.where over a sqrt or log")
    size = [(g.norm() / (beta * i["named"]["reverse-kl"].norm())).item() for g, i in zip(grads, insts)]
    cosines = {n: [cos(g, i["named"][n]) if g.norm() > 0 else 0.0 for g, i in zip(grads, insts)] for n in NAMED}
    if max(size) < ZERO_TOL:
        gradient, nearest, cosine, scale = "zero", None, None, 0.0
    else:
        matched = [n for n in NAMED if min(cosines[n]) >= COS_MIN]
        nearest = matched[0] if matched else max(NAMED, key=lambda n: abs(sum(cosines[n])))
        gradient = nearest if matched else "other"
        cosine = min(cosines[nearest]) if matched else sum(cosines[nearest]) / len(insts)
        scale = sum((g @ i["named"][nearest] / (beta * i["named"][nearest].norm() ** 2)).item()
                    for g, i in zip(grads, insts)) / len(insts)
    nonzero = gradient != "zero"                       # a zero gradient has no size to respond with
    return {"gradient": gradient, "nearest": nearest, "cosine": cosine, "scale": scale, "value_bias": None,
            "beta_responsive": nonzero and (grads_2beta - grads[0]).norm().item() >= 0.1 * grads[0].norm().item(),
            "beta_exponent": math.log2(grads_2beta.norm() / grads[0].norm()) if nonzero and grads_2beta.norm() > 0
            else None,
            "cosines": cosines, "size": size, "kl": [i["kl"] for i in insts], "seeds": list(SEEDS), "beta": beta}


def audit_estimator(fn, placement, level="sequence", kl_is="none", is_clip=math.inf, off_policy=False, beta=0.1):
    """Audit a per-token estimator NAME(logp, ref_logp) placed in the reward, the loss or both (train.py --kl)."""
    if placement not in estimators.PLACEMENTS:
        raise AuditError(f"unknown placement {placement!r}; choose one of: {', '.join(estimators.PLACEMENTS)}")
    try:                                 # parse_kl's checks, with k1 standing in for the estimator
        kl = dataclasses.replace(parse_kl(f"k1-in-{placement}", level, kl_is, is_clip), estimator=USER,
                                 name=f"{USER}-in-{placement}")
    except ValueError as e:
        raise AuditError(str(e).replace("'k1-in-", "'in-")) from None
    insts = instances(off_policy)
    grads = [estimator_grad(fn, i, kl, beta) for i in insts]
    result = verdict(grads, insts, beta, estimator_grad(fn, insts[0], kl, 2 * beta))
    values = [estimator_value(fn, i) for i in insts]
    result["value_bias"], result["value_biases"] = sum(values) / len(values), values
    result["value_bias_rel"] = sum(v / i["kl"] for v, i in zip(values, insts)) / len(insts)
    return result


def audit_loss(fn, off_policy=False, beta=0.1, group_size=3):
    """Audit a whole loss NAME(logp, ref_logp, mask, rewards, group_size, beta[, behav_logp=])."""
    if group_size < 2 or len(toy.all_sequences(V, T)) ** group_size > 2e5:
        raise AuditError(f"group size {group_size}: need 2 <= G <= 3 (every group of {V ** T} completions is "
                         "enumerated)")
    insts = instances(off_policy)
    grads = [loss_grad(fn, i, beta, group_size) for i in insts]
    return verdict(grads, insts, beta, loss_grad(fn, insts[0], 2 * beta, group_size))


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def report(result, title):
    print(title)
    print(f"toy: V={V}, T={T}, {len(SEEDS)} seeds, exact enumeration, β = {result['beta']:g}; named when cos ≥ "
          f"{COS_MIN} on every seed\n")
    print("| seed |   KL  | cos reverse-kl | cos token-reverse-kl | cos token-forward-kl | ‖E ĝ‖/β‖∇KL‖ | value bias |")
    print("|-----:|------:|---------------:|---------------------:|---------------------:|-------------:|-----------:|")
    for s, seed in enumerate(result["seeds"]):
        c = [result["cosines"][n][s] for n in NAMED]
        vb = f"{result['value_biases'][s]:+10.4f}" if "value_biases" in result else f"{'n/a':>10}"
        print(f"| {seed:>4} | {result['kl'][s]:5.3f} | {c[0]:+14.4f} | {c[1]:+20.4f} | {c[2]:+20.4f} | "
              f"{result['size'][s]:12.4f} | {vb} |")
    g = result["gradient"]
    near = "" if g in NAMED or g == "zero" else f" (nearest {result['nearest']}, mean cos {result['cosine']:+.4f})"
    cosine = f" (cos {result['cosine']:.4f} or more on every seed)" if g in NAMED else ""
    print(f"\ngradient         {g}{near}{cosine}: {GRADIENTS[g]}")
    along = result["nearest"] or "the KL gradient"
    print(f"scale            {result['scale']:+.4f}  (along β × {along}; 1 = as β says)")
    vb = result["value_bias"]
    print("value_bias       " + ("n/a (a whole loss has no per-token estimate)" if vb is None else
                                 f"{vb:+.4f} nats ({result['value_bias_rel']:+.1%} of the KL)  E[Σ_t k_t] − KL"))
    exp = result["beta_exponent"]
    print(f"beta_responsive  {'yes' if result['beta_responsive'] else 'NO'}" +
          ("  (there is no gradient to respond)" if exp is None else f"  (‖E ĝ‖ ∝ β^{exp:.2f} when β doubles)"))


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Audit your own KL code: which gradient does it give, exactly? Exact enumeration on small tabular "
                    "policies (the oracle of toy.py). WARNING: FILE.py is imported, so its code runs, as with any test "
                    "runner: audit only code you would run.",
        epilog="gradients it names:\n" + "\n".join(f"  {k:<17} {v}" for k, v in GRADIENTS.items()) +
               f"\n\nnamed when cos(E ĝ, that gradient) ≥ {COS_MIN} on every seed; zero when ‖E ĝ‖ < "
               f"{ZERO_TOL:g}·β‖∇KL‖"
               "\n\nexit status: 0 audited, 1 audited but --expect differs, 2 bad input",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--estimator", metavar="FILE.py:NAME", help="NAME(logp, ref_logp) -> (N, T) per-token estimate")
    what.add_argument("--loss", metavar="FILE.py:NAME",
                      help="NAME(logp, ref_logp, mask, rewards, group_size, beta[, behav_logp=]) -> scalar loss")
    ap.add_argument("--placement", choices=estimators.PLACEMENTS, help="--estimator: where it goes (both: same β)")
    ap.add_argument("--level", choices=estimators.LEVELS, default="sequence",
                    help="--estimator in the reward: one sequence penalty or reward-to-go (token)")
    ap.add_argument("--kl-is", choices=estimators.KL_IS, default="none", help="--estimator in the loss: its weight "
                    "off-policy (rho: ρ_t in the graph, sg_rho: detached, prefix: W_{1:t}), as train.py --kl-is")
    ap.add_argument("--kl-is-clip", type=float, default=math.inf, help="--kl-is prefix: truncate W at c")
    ap.add_argument("--off-policy", action="store_true", help="sample from a behaviour policy μ ≠ π_θ")
    ap.add_argument("--beta", type=float, default=0.1, help="the KL coefficient passed to the code (default 0.1)")
    ap.add_argument("--group-size", type=int, default=3, help="--loss: completions per group G (2 or 3; default 3)")
    ap.add_argument("--json", action="store_true", help="also print the result as one JSON object on the last line")
    ap.add_argument("--expect", choices=GRADIENTS, help="exit 1 unless the gradient is this one (for CI)")
    args = ap.parse_args(argv)
    if args.estimator and not args.placement:
        ap.error("--estimator needs --placement {reward,loss,both}")
    if args.loss and (args.placement or args.level != "sequence" or args.kl_is != "none"
                      or args.kl_is_clip != math.inf):
        ap.error("--placement, --level, --kl-is and --kl-is-clip describe an --estimator; a --loss places its KL itself")
    if args.estimator and args.group_size != 3:
        ap.error("--group-size is for a --loss (an --estimator's expectation needs no groups)")
    if not (args.beta > 0 and math.isfinite(args.beta)):
        ap.error(f"--beta must be a positive number, got {args.beta}")
    torch.set_num_threads(1)                                  # tiny tensors
    t0 = time.time()
    try:
        if args.estimator:
            result = audit_estimator(load(args.estimator), args.placement, args.level, args.kl_is, args.kl_is_clip,
                                     args.off_policy, args.beta)
            title = (f"audit of {args.estimator} in the {args.placement} ({args.level} level"
                     f"{', weight ' + args.kl_is if args.kl_is != 'none' else ''}), ")
        else:
            result = audit_loss(load(args.loss), args.off_policy, args.beta, args.group_size)
            title = f"audit of the loss {args.loss} (task rewards 0, groups of {args.group_size}), "
    except AuditError as e:
        print(f"audit.py: error: {e}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.time() - t0, 2)
    report(result, title + ("off-policy (samples from μ ≠ π_θ)" if args.off_policy else "on-policy"))
    print(f"(audited in {result['seconds']:.2f} s)")
    if args.json:
        print(json.dumps({k: v for k, v in result.items()}))
    if args.expect and result["gradient"] != args.expect:
        print(f"audit.py: expected {args.expect}, got {result['gradient']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
