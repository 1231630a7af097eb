"""The README's copy-paste snippets give exactly the trainer's loss and gradient.

Every ```python block under README.md's "## Copy-paste snippets" heading is read from the README itself and executed
on its own, in an empty namespace (so it must be self-contained: torch only). Its loss and its gradient with respect
to logp are compared with kl_rl.shaped_advantages + kl_rl.policy_loss (train.py's calls, default --ratio-clip 0 8)
for the same estimators.parse_kl configuration, to 1e-12, on random float64 batches: several groups, variable
completion lengths (random masks), and off-policy ratios on both sides of the clamp. Slipped variants of each snippet
(the source edited one way a reader might) must NOT match, so the comparison is shown to be able to fail.
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
    ("rho_k3_in_loss", "kl = (rho * k3 * mask)", "kl = (rho.detach() * k3 * mask)",
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
