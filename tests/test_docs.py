"""The documentation holds together: README.md and docs/*.md link only to what exists, and the README stays short.

Every relative link, [text](target) or ![alt](target), in README.md and docs/*.md (outside code) must name a file or
folder of the repository, and its #anchor a heading of the target as GitHub renders it (github-slugger: lowercase,
punctuation dropped, spaces to hyphens, "-1", "-2" for repeats). The README stays at most 250 lines, every docs file
opens with a "# " title and one line saying what it answers, and docs/README.md lists every docs file. The answers in
"Which KL should I use?" cite evidence; the clamp numbers they quote (verl's k3 clamp) are checked here.
"""
import glob
import os
import re

import pytest
import torch

from conftest import ROOT, docs_text

DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
PAGES = [os.path.join(ROOT, "README.md")] + DOCS
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")        # [text](target), text may hold [x]


def prose(text):
    """The text outside fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading):
    """GitHub's anchor for a heading: markdown stripped, lowercase, only letters, digits, '_', '-' and spaces kept,
    spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)          # a link's text stays
    text = text.replace("`", "").replace("*", "").lower()
    text = "".join(c for c in text if c.isalnum() or c in "_- ")
    return text.replace(" ", "-")


def anchors(path):
    """Every anchor GitHub gives the headings of a markdown file (repeats numbered -1, -2, ...)."""
    seen, out = {}, set()
    for line in prose_lines(open(path, encoding="utf-8").read()):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def prose_lines(text):
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M).splitlines()


def links(path):
    return [m.group(1) for m in LINK.finditer(prose(open(path, encoding="utf-8").read()))]


def test_slug_matches_github():
    # anchors GitHub renders for headings of this kind (checked by hand on github.com)
    assert slug("The paper's study at toy scale: `comedy.py`") == "the-papers-study-at-toy-scale-comedypy"
    assert slug("A real model on a CPU: SmolLM2-135M-Instruct") == "a-real-model-on-a-cpu-smollm2-135m-instruct"
    assert slug("Which KL should I use?") == "which-kl-should-i-use"
    assert slug("Off-policy, sequence level: `--kl-is prefix` (the paper's open problem)") == \
        "off-policy-sequence-level---kl-is-prefix-the-papers-open-problem"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page):
    found = links(page)
    assert found, f"{page}: no links found (is the link pattern broken?)"
    for target in found:
        if re.match(r"[a-z]+:", target):                                   # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(full), f"{os.path.relpath(page, ROOT)}: link {target!r}: no such file"
        assert os.path.commonpath([full, ROOT]) == ROOT, f"{page}: link {target!r} leaves the repository"
        if anchor:
            assert full.endswith(".md"), f"{page}: anchor on a non-markdown file: {target!r}"
            assert anchor in anchors(full), \
                f"{os.path.relpath(page, ROOT)}: link {target!r}: no heading renders as #{anchor}"


def test_a_broken_link_is_caught(tmp_path):
    """The checker can fail: a missing file and a missing anchor are both reported."""
    page = tmp_path / "p.md"
    page.write_text("# Title\n\n[a](p.md#title) [b](p.md#nope) [c](missing.md) `[d](x.md)`\n```\n[e](y.md)\n```\n")
    assert links(str(page)) == ["p.md#title", "p.md#nope", "missing.md"]
    assert anchors(str(page)) == {"title"}


def test_readme_is_at_most_250_lines():
    n = len(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines())
    assert n <= 250, f"README.md has {n} lines: move detail into docs/"


@pytest.mark.parametrize("page", DOCS, ids=os.path.basename)
def test_each_doc_opens_with_a_title_and_what_it_answers(page):
    lines = open(page, encoding="utf-8").read().splitlines()
    assert lines[0].startswith("# "), f"{page}: first line is not a '# ' title"
    assert lines[1] == "" and lines[2] and not lines[2].startswith(("#", "|", "`", "-")) and lines[3] == "", \
        f"{page}: the title must be followed by one line saying what the page answers"


def test_docs_index_lists_every_doc():
    listed = {t.partition("#")[0] for t in links(os.path.join(ROOT, "docs", "README.md"))}
    missing = {os.path.basename(p) for p in DOCS} - {"README.md"} - listed
    assert not missing, f"docs/README.md does not list {sorted(missing)}"
    readme_links = links(os.path.join(ROOT, "README.md"))
    assert all(any(t.startswith(f"docs/{os.path.basename(p)}") for t in readme_links) for p in DOCS), \
        "the README links every docs file"


def test_docs_text_is_the_readme_and_every_doc():
    text = docs_text()
    for page in PAGES:
        assert open(page, encoding="utf-8").read() in text


# ---------------------------------------------------------------------------------------------------------
# Numbers quoted by "Which KL should I use?" that no other test holds
# ---------------------------------------------------------------------------------------------------------
def verl_k3(delta):
    """verl's low_var_kl (b178a3cd, core_algos.kl_penalty): −δ clamped to ±20 inside the exponential, then the value
    clamped to [−10, 10]."""
    kl = (-delta).clamp(-20, 20)
    return (kl.exp() - kl - 1).clamp(-10, 10)


def test_verl_k3_clamp_is_exact_only_on_its_stated_range_and_zeroes_the_gradient_outside():
    delta = torch.linspace(-30, 30, 60001, dtype=torch.float64).requires_grad_()
    exact = torch.expm1(-delta) + delta
    clamped = verl_k3(delta)
    (g,) = torch.autograd.grad(clamped.sum(), delta)
    agree = (clamped - exact).abs() < 1e-9
    lo, hi = delta[agree].min().item(), delta[agree].max().item()
    assert lo == pytest.approx(-2.61, abs=0.01) and hi == pytest.approx(11.0, abs=0.01)       # README: [−2.61, 11]
    assert (g[~agree] == 0).all()                                          # a token past the clamp: no KL gradient
    # k3's pathwise gradient (1 − e^{−δ})·∇log π: where π ≪ π_ref it is huge, e.g. e^10 − 1 at δ = −10
    (g_exact,) = torch.autograd.grad((torch.expm1(-delta) + delta).sum(), delta)
    i = int((delta.detach() + 10).abs().argmin())
    assert g_exact[i].item() == pytest.approx(1 - torch.e ** 10, rel=1e-6)


def test_every_test_the_docs_cite_exists():
    """The docs answer questions by naming the test that proves the answer ("`test_estimators.py`:
    `test_k1_in_loss_has_exactly_zero_expected_gradient`"): a renamed or deleted test must not leave a citation that
    proves nothing."""
    cited = set(re.findall(r"`(test_[a-z0-9_]+)`", docs_text()))
    defined = set()
    for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py")):
        with open(path, encoding="utf-8") as f:
            defined |= set(re.findall(r"^def (test_[a-z0-9_]+)\(", f.read(), flags=re.M))
    assert len(cited) >= 5 and cited <= defined, sorted(cited - defined)
