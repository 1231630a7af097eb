"""The README's copy-paste snippets give exactly the trainer's loss and gradient, and survive real use.

Every ```python block under README.md's "## Copy-paste snippets" heading is read from the README itself and executed
on its own, in an empty namespace (so it must be self-contained: torch only). Its loss and its gradient with respect
to logp are compared with kl_rl.shaped_advantages + kl_rl.policy_loss (train.py's calls, default --ratio-clip 0 8)
for the same estimators.parse_kl configuration, to 1e-12, on random float64 batches: several groups, variable
completion lengths (random masks), and off-policy ratios on both sides of the clamp. Real use: −inf, +inf or NaN at
padded positions (what a log-softmax of masked logits gives) change neither loss nor gradient; micro-batches of whole
groups, each loss weighted by its share of the sequences as the README says, add up to the whole batch; a group size
below 2 (or one that does not divide the rows) is refused with a ValueError. Slipped variants of each snippet (the
source edited one way a reader might) must NOT match, so each comparison is shown to be able to fail.
"""
import os
import re

import pytest
import torch

from estimators import parse_kl
from kl_rl import policy_loss, shaped_advantages

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
NAMES = ("k1_in_reward_rloo_loss", "rho_k3_in_loss", "k3_in_both_loss")
P, G, T, BETA = 3, 4, 7, 0.3          # 3 groups of 4 completions, up to 7 tokens


def snippet_sources():
    """{function name: its fenced code block} from the README's "## Copy-paste snippets" section."""
    text = open(README, encoding="utf-8").read()
    section = re.search(r"^## Copy-paste snippets\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Copy-paste snippets' section"
    blocks = re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)
    found = {re.search(r"^def (\w+)\(", b, re.M).group(1): b for b in blocks}
    assert sorted(found) == sorted(NAMES), f"snippet functions {sorted(found)}, expected {sorted(NAMES)}"
    return found


SOURCES = snippet_sources()


def load(name, source=None):
    namespace = {}
    exec(compile(source or SOURCES[name], f"README.md:{name}", "exec"), namespace)   # our own README, not input
    return namespace[name]


def batch(seed):
    """Random float64 tensors shaped like one trainer batch: (N, T) with N = P·G, variable lengths."""
    g = torch.Generator().manual_seed(seed)
    N = P * G
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0] = T                                                                    # one full-length row
    mask = (torch.arange(T)[None] < lengths[:, None]).double()                        # (N, T)
    logp = -3 * torch.rand(N, T, generator=g, dtype=torch.float64)                    # (N, T) log π_θ
    ref_logp = logp + 0.7 * torch.randn(N, T, generator=g, dtype=torch.float64)       # (N, T) log π_ref
    behav_logp = logp + 1.5 * torch.randn(N, T, generator=g, dtype=torch.float64)     # (N, T) log μ: ρ crosses 8
    rewards = torch.randint(0, 2, (N,), generator=g).double() + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)
    return logp, ref_logp, behav_logp, mask, rewards


def loss_and_grad(fn, logp, *args):
    lp = logp.clone().requires_grad_()
    loss = fn(lp, *args)
    loss.backward()
    return loss.detach(), lp.grad


def trainer(config, logp, ref_logp, mask, rewards, behav_logp=None, kl_is="none"):
    """kl_rl's loss and its gradient w.r.t. logp, as train.py computes them (advantages from sg(logp), RLOO)."""
    kl = parse_kl(config, kl_is=kl_is)
    advantages, _ = shaped_advantages(rewards, logp.detach(), ref_logp, mask, G, BETA, kl, "rloo")   # (N, T)
    out = loss_and_grad(lambda lp: policy_loss(lp, ref_logp, mask, advantages, BETA, kl, behav_logp)[0], logp)
    return out, advantages


def run_snippet(name, logp, ref_logp, behav_logp, mask, rewards, source=None):
    """(loss, grad) of a snippet, and of kl_rl for the configuration it claims to be."""
    fn = load(name, source)
    if name == "rho_k3_in_loss":
        want, adv = trainer("k3-in-loss", logp, ref_logp, mask, rewards, behav_logp, kl_is="rho")
        return loss_and_grad(fn, logp, ref_logp, behav_logp, mask, adv, BETA), want
    config = {"k1_in_reward_rloo_loss": "k1-in-reward", "k3_in_both_loss": "k3-in-both"}[name]
    want, _ = trainer(config, logp, ref_logp, mask, rewards)
    return loss_and_grad(fn, logp, ref_logp, mask, rewards, G, BETA), want


def test_snippets_are_short_and_self_contained():
    for name, source in SOURCES.items():
        body = source[source.index(f"def {name}("):].rstrip("\n").split("\n")
        assert len(body) <= 15, f"{name}: {len(body)} lines (the README promises ≤ 15)"
        imports = [line for line in source.split("\n") if re.match(r"\s*(import|from)\s", line)]
        assert imports == ["import torch"], f"{name} imports {imports}: torch only"


def test_batches_exercise_masks_and_the_ratio_clamp():
    """Otherwise a snippet that ignored the mask or the clamp would pass."""
    logp, _, behav_logp, mask, _ = batch(0)
    rho = (logp - behav_logp).exp()[mask.bool()]
    assert 0 < (rho > 8).sum() < rho.numel() and len(set(mask.sum(1).tolist())) > 2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_snippet_equals_trainer(name, seed):
    (loss, grad), (want_loss, want_grad) = run_snippet(name, *batch(seed))
    assert grad.abs().max() > 1e-3                                   # a nonzero gradient to compare
    assert (loss - want_loss).abs() < 1e-12
    assert (grad - want_grad).abs().max() < 1e-12, f"{name}: max |Δgrad| = {(grad - want_grad).abs().max():.3g}"


# One slip per line a reader might get wrong: (snippet, exact text, replacement, what the slip is)
SLIPS = [
    ("k1_in_reward_rloo_loss", "(r.sum(1, keepdim=True) - r) / (G - 1)", "r.mean(1, keepdim=True)",
     "baseline includes the sample itself (Dr. GRPO): gradient × (1 − 1/G)"),
    ("k1_in_reward_rloo_loss", "(logp - ref_logp).detach()", "(logp - ref_logp)",
     "in-reward KL not detached"),
    ("rho_k3_in_loss", "kl = (rho * k3)", "kl = (rho.detach() * k3)",
     "ρ detached: plain k3's (1 − r)·∇log π, weighted"),
    ("rho_k3_in_loss", "rho.clamp(max=8.0)", "rho",
     "no ratio clamp"),
    ("k3_in_both_loss", "(rewards - beta * k3.detach().sum(-1))", "rewards",
     "k3 in the loss only (GRPO's default): the token-level forward-KL gradient"),
    ("k3_in_both_loss", "+ beta * k3.sum()", "",
     "k3 in the reward only: reverse KL minus a forward-KL term"),
]


@pytest.mark.parametrize("name, old, new, slip", SLIPS,
                         ids=["self-in-baseline", "kl-not-detached", "rho-detached", "no-clamp", "k3-loss-only",
                              "k3-reward-only"])
def test_a_slip_does_not_match(name, old, new, slip):
    assert SOURCES[name].count(old) == 1, f"{name} no longer contains {old!r}: update SLIPS"
    (_, grad), (_, want_grad) = run_snippet(name, *batch(0), source=SOURCES[name].replace(old, new))
    assert (grad - want_grad).abs().max() > 1e-3, f"the slip '{slip}' went unnoticed"


# ---------------------------------------------------------------------------------------------------------
# Real use: garbage at padded positions, gradient accumulation, a group size that cannot work
# ---------------------------------------------------------------------------------------------------------
def snippet_args(name, logp, ref_logp, behav_logp, mask, rewards):
    """The snippet's arguments after logp, as run_snippet passes them (advantages from the trainer for ρ·k3)."""
    if name == "rho_k3_in_loss":
        _, adv = trainer("k3-in-loss", logp, ref_logp, mask, rewards, behav_logp, kl_is="rho")
        return [ref_logp, behav_logp, mask, adv, BETA]
    return [ref_logp, mask, rewards, G, BETA]


def pad_with(args, mask, value):
    """Every (N, T) tensor argument with `value` written at the padded positions (mask 0)."""
    return [a.masked_fill(mask == 0, value) if torch.is_tensor(a) and a.shape == mask.shape and a is not mask else a
            for a in args]


PAD_SLIPS = {"k1_in_reward_rloo_loss": ("logp.where(m, 0.0), ref_logp.where(m, 0.0)", "logp * m, ref_logp * m"),
             "k3_in_both_loss": ("logp.where(m, 0.0), ref_logp.where(m, 0.0)", "logp * m, ref_logp * m"),
             "rho_k3_in_loss": ("(x.where(m, 0.0) for x in", "(x * m for x in")}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pad", [-torch.inf, torch.inf, torch.nan, 1e4])
def test_padding_values_change_neither_loss_nor_gradient(name, pad):
    logp, ref_logp, behav_logp, mask, rewards = batch(1)
    args = snippet_args(name, logp, ref_logp, behav_logp, mask, rewards)
    zero = loss_and_grad(load(name), logp.masked_fill(mask == 0, 0.0), *pad_with(args, mask, 0.0))
    (loss, grad) = loss_and_grad(load(name), logp.masked_fill(mask == 0, pad), *pad_with(args, mask, pad))
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), f"{name}: padding {pad} leaks into the result"
    assert (loss - zero[0]).abs() < 1e-12 and (grad - zero[1]).abs().max() < 1e-12
    assert (grad[mask == 0] == 0).all()                                 # padding gets no gradient


@pytest.mark.parametrize("name", NAMES)
def test_masking_by_a_product_is_caught_by_the_padding_test(name):
    old, new = PAD_SLIPS[name]
    assert SOURCES[name].count(old) == 1, f"{name} no longer contains {old!r}: update PAD_SLIPS"
    logp, ref_logp, behav_logp, mask, rewards = batch(1)
    args = pad_with(snippet_args(name, logp, ref_logp, behav_logp, mask, rewards), mask, -torch.inf)
    loss, grad = loss_and_grad(load(name, SOURCES[name].replace(old, new)), logp.masked_fill(mask == 0, -torch.inf),
                               *args)
    assert not (torch.isfinite(loss) and torch.isfinite(grad).all()), "-inf * 0 = NaN went unnoticed"


@pytest.mark.parametrize("name", NAMES)
def test_micro_batches_of_whole_groups_add_up_to_the_batch(name):
    """The README: split between whole groups and backward loss * N_k / N; the gradients add up to the batch's."""
    logp, ref_logp, behav_logp, mask, rewards = batch(2)
    args = snippet_args(name, logp, ref_logp, behav_logp, mask, rewards)
    full_loss, full_grad = loss_and_grad(load(name), logp, *args)
    N, fn = logp.shape[0], load(name)
    lp = logp.clone().requires_grad_()
    total = 0
    for rows in (slice(0, G), slice(G, N)):                            # 1 group, then 2: unequal micro-batches
        part = [a[rows] if torch.is_tensor(a) and a.shape[:1] == (N,) else a for a in args]
        n_k = rows.stop - rows.start
        loss_k = fn(lp[rows], *part) * n_k / N
        loss_k.backward()
        total = total + loss_k.detach()
    assert (total - full_loss).abs() < 1e-12 and (lp.grad - full_grad).abs().max() < 1e-12


@pytest.mark.parametrize("name", ["k1_in_reward_rloo_loss", "k3_in_both_loss"])
@pytest.mark.parametrize("group_size", [1, 0, 5])
def test_a_group_size_that_cannot_work_is_refused(name, group_size):
    """G = 1: the leave-one-out mean divides by G − 1 = 0 (NaN advantages, silently); G = 5 does not divide 12 rows."""
    logp, ref_logp, _, mask, rewards = batch(0)
    with pytest.raises(ValueError, match="group_size must be >= 2 and divide"):
        load(name)(logp, ref_logp, mask, rewards, group_size, BETA)
