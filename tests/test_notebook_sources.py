"""A function that a notebook shows and the package provides is the package's function, character
for character, so that the two cannot drift apart.

IDENTICAL lists every (notebook, package function) pair whose source the notebook shows; the test
compares the notebook's `def` block with `inspect.getsource` of the package's function.

Exercises. An exercise's solution sits between the lines `### BEGIN SOLUTION` and
`### END SOLUTION` (dpo_teach.student). The comparison drops exactly those two marker lines and
nothing else: the instructor edition shows the learner the package's function, signature, docstring
and body, and the student edition (which replaces the marked block by a stub) shows its signature
and docstring.

EXCLUDED lists the functions a notebook shows that have a package counterpart but differ from it on
purpose (a simplified exercise, a helper with another job), each with the counterpart and a one-line
reason. A notebook function whose name is that of a public package function must be in one of the
two lists (test_no_unlisted_function_shares_a_package_name), and every exclusion must still be
shown by its notebook (test_exclusions_are_current).
"""

import ast
import difflib
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import nbformat
import pytest

from dpo_teach.student import without_markers

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PACKAGE = ROOT / "dpo_teach"

NB01 = "01_preferences_and_bradley_terry.ipynb"
NB02 = "02_the_rlhf_objective_and_its_optimum.ipynb"
NB03 = "03_from_rlhf_to_dpo.ipynb"
NB04 = "04_the_model_and_the_task.ipynb"
NB05 = "05_supervised_fine_tuning.ipynb"
NB06 = "06_reward_model.ipynb"
NB07 = "07_rlhf_with_ppo.ipynb"
NB08 = "08_direct_preference_optimization.ipynb"
NB09 = "09_dpo_vs_ppo.ipynb"
NB10 = "10_beyond_dpo.ipynb"
NB12 = "12_scaling_out.ipynb"

# (notebook, module, function): the notebook shows the package's function (as an exercise or in full).
IDENTICAL = [
    (NB01, "dpo_teach.bandit", "bt_probability"),
    (NB01, "dpo_teach.bandit", "bt_nll"),
    (NB02, "dpo_teach.bandit", "kl_divergence"),
    (NB02, "dpo_teach.bandit", "rlhf_objective"),
    (NB02, "dpo_teach.bandit", "optimal_policy"),
    (NB04, "dpo_teach.logps", "sequence_logps"),
    (NB05, "dpo_teach.sft", "sft_loss"),
    (NB05, "dpo_teach.sft", "sft_batch_loss"),
    (NB06, "dpo_teach.reward", "last_token_index"),
    (NB06, "dpo_teach.reward", "bradley_terry_loss"),
    (NB06, "dpo_teach.reward", "reward_model_batch_loss"),
    (NB07, "dpo_teach.ppo", "ppo_minibatch_steps"),
    (NB07, "dpo_teach.ppo", "ppo_step"),
    (NB08, "dpo_teach.dpo", "dpo_batch_loss"),
    (NB09, "dpo_teach.frontier", "best_of_n_rewards"),
    (NB12, "dpo_teach.distributed", "combine_means"),
]

# (notebook, function shown) -> (package counterpart, why the two differ on purpose).
EXCLUDED = {
    (NB01, "fit_bt"): (
        "dpo_teach.bandit.fit_bt_rewards",
        "plain L-BFGS over every comparison; the package first counts repeated triples (faster), as "
        "the notebook says, and the next cell checks that the two agree"),
    (NB03, "dpo_loss"): (
        "dpo_teach.dpo.dpo_loss",
        "the exercise is the sigmoid loss alone; the package adds loss_type, label_smoothing, input "
        "checks and detached rewards, as the notebook says after the exercise"),
    (NB03, "train_tabular_dpo"): (
        "dpo_teach.bandit.train_tabular_dpo",
        "calls package_dpo_loss (the name dpo_loss is the learner's exercise), spells out the L-BFGS "
        "settings the package keeps in a private helper, and takes a start= policy (the notebook's "
        "non-uniqueness experiment starts away from pi_ref); the next cell checks the results agree"),
    (NB05, "perplexity_from_logps"): (
        "dpo_teach.sft.perplexity",
        "the formula on precomputed log-prob sums; the package's perplexity runs a model over records"),
    (NB06, "spearman"): (
        "dpo_teach.evaluation.spearman_correlation",
        "ranks without ties (argsort twice); the package gives tied values their average rank, as "
        "the notebook says"),
    (NB07, "kl_penalty_rewards"): (
        "dpo_teach.ppo.kl_penalty_rewards",
        "the exercise's computation alone; the package also checks the right padding (a private "
        "helper), names the estimator kl_k1 and adds the score out of place"),
    (NB07, "gae"): (
        "dpo_teach.ppo.gae",
        "the exercise's recursion alone; the package also checks shapes and right padding (a private "
        "helper) and has defaults gamma=1, lam=0.95"),
    (NB07, "clipped_policy_loss"): (
        "dpo_teach.ppo.policy_loss",
        "returns the loss alone; the package's policy_loss also returns the clip fraction and an "
        "approximate KL"),
    (NB08, "concatenated_logps"): (
        "dpo_teach.dpo.pair_logps",
        "runs the model and sequence_logps as the exercise asks; the package's pair_logps goes "
        "through logps.model_sequence_logps and has average="),
    (NB09, "on_frontier"): (
        "dpo_teach.frontier.on_frontier",
        "returns a bool mask, as the exercise asks; the package returns a 0/1 mask in the rewards' "
        "dtype (tests/test_frontier.py pins it)"),
    (NB10, "ipo_loss"): (
        "dpo_teach.variants.ipo_loss",
        "returns the loss alone; the package's is dpo_loss(loss_type='ipo'), with input checks, and "
        "returns (losses, chosen_rewards, rejected_rewards)"),
    (NB10, "log_odds"): (
        "dpo_teach.variants.log_odds",
        "both branches inline; the package's uses variants.log1mexp (shared with other losses) and "
        "clamps at the dtype's smallest normal number"),
}

_TOP_LEVEL_DEF = re.compile(r"^(?:async\s+)?def\s+(\w+)\s*\(")


def _code_cells(notebook: str) -> list[str]:
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def function_source(notebook: str, name: str) -> str:
    """The source of `def name(...)` in the notebook's code cells: the def line and the indented
    block under it (up to the first line back at the def's indentation)."""
    for source in _code_cells(notebook):
        lines = source.splitlines()
        for start, line in enumerate(lines):
            if line.startswith(f"def {name}("):
                end = start + 1
                while end < len(lines) and (not lines[end].strip() or lines[end].startswith((" ", "\t", ")"))):
                    end += 1
                return "\n".join(lines[start:end]).rstrip() + "\n"
    raise AssertionError(f"{notebook} has no code cell with `def {name}(`")


def shown_functions() -> set[tuple[str, str]]:
    """(notebook, name) of every top-level `def` in the notebooks' code cells."""
    shown = set()
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        for source in _code_cells(path.name):
            for line in source.splitlines():
                match = _TOP_LEVEL_DEF.match(line)
                if match:
                    shown.add((path.name, match.group(1)))
    return shown


def public_package_functions() -> dict[str, list[str]]:
    """Name -> modules, for every public top-level function of dpo_teach (read from the source, so
    that no module has to be imported)."""
    functions: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if any(part.startswith("_") and part != "__init__" for part in parts):
            continue
        module = ".".join(part for part in parts if part != "__init__")
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                functions.setdefault(node.name, []).append(module)
    return functions


@pytest.mark.parametrize("notebook, module, name", IDENTICAL, ids=[f"{nb[:2]}-{name}" for nb, _, name in IDENTICAL])
def test_notebook_shows_the_package_function(notebook, module, name):
    function = getattr(importlib.import_module(module), name)
    shown = without_markers(function_source(notebook, name))
    package = textwrap.dedent(inspect.getsource(function))
    diff = "".join(difflib.unified_diff(package.splitlines(True), shown.splitlines(True),
                                        f"{module}.{name}", f"{notebook}"))
    assert shown == package, (f"{notebook} shows a {name} that differs from the package's "
                              f"({inspect.getsourcefile(function)}): copy the package's source into the "
                              f"notebook (an exercise keeps its solution markers around the body)\n{diff}")


def test_the_two_lists_do_not_overlap():
    identical = {(notebook, name) for notebook, _, name in IDENTICAL}
    assert not identical & set(EXCLUDED), f"both identical and excluded: {sorted(identical & set(EXCLUDED))}"
    assert len(identical) == len(IDENTICAL), "a pair is listed twice in IDENTICAL"
    for key, (counterpart, reason) in EXCLUDED.items():
        assert counterpart.startswith("dpo_teach.") and reason.strip(), f"{key}: name the counterpart and the reason"


def test_exclusions_are_current():
    """Every exclusion names a function its notebook still shows and a package function that exists."""
    shown, functions = shown_functions(), public_package_functions()
    stale = [key for key in EXCLUDED if key not in shown]
    assert not stale, f"no longer shown by their notebook, remove them from EXCLUDED: {stale}"
    for key, (counterpart, _) in EXCLUDED.items():
        module, name = counterpart.rsplit(".", 1)
        assert module in functions.get(name, []), f"{key}: the package has no public {counterpart}"


def test_no_unlisted_function_shares_a_package_name():
    """A notebook function named like a public package function is either kept identical to it or
    excluded with a reason, so that a new copy cannot drift unnoticed."""
    listed = {(notebook, name) for notebook, _, name in IDENTICAL} | set(EXCLUDED)
    functions = public_package_functions()
    unlisted = sorted((notebook, name, functions[name]) for notebook, name in shown_functions()
                      if name in functions and (notebook, name) not in listed)
    assert not unlisted, (
        "these notebook functions share a name with a package function but are neither in IDENTICAL "
        "(make the notebook show the package's source) nor in EXCLUDED (say why they differ): "
        + "; ".join(f"{notebook}: {name} (package: {', '.join(modules)})" for notebook, name, modules in unlisted))
