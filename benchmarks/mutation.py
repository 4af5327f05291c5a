"""Mutation testing of the core with mutmut: how many deliberately broken versions of the metrics, the
masking and loss functions and the feature-mask code the fast unit tests catch.

    pip install -e ".[dev]"                                   # mutmut
    python benchmarks/mutation.py                             # every target: the table and the survivors
    python benchmarks/mutation.py --targets mask_tokens hard_negative_loss --keep /tmp/mut

mutmut changes one thing at a time in a function (an operator, a constant, a comparison, an argument)
and runs the tests against each such mutant; a mutant is "killed" when some test fails. This script
copies pixel_bert/ and tests/ into a scratch folder, writes mutmut's configuration there (setup.cfg:
only the target files are mutated, and only FAST_TESTS run, the unit tests of these functions:
seconds, no training runs), runs ``mutmut run`` on the target functions' mutants and prints, per
function, killed / total and each surviving mutant's diff. Not part of the test suite (minutes; it
asserts nothing): a benchmark-style report, to be read. Equivalent mutants (a change that cannot
alter behaviour, e.g. a bound that is never reached) survive by construction; EQUIVALENT_PATTERNS names the
kinds recognised among the survivors, and why.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# report name -> (file, mutmut's name glob for its mutants). mutmut names a function's mutants
# <module>.x_<function>__mutmut_<n>, and a method's <module>.xǁ<Class>ǁ<method>__mutmut_<n>.
TARGETS = {
    "metrics.py": ("pixel_bert/metrics.py", "pixel_bert.metrics.*"),
    "mask_tokens": ("pixel_bert/losses.py", "pixel_bert.losses.x_mask_tokens__mutmut_*"),
    "make_itm_pairs": ("pixel_bert/losses.py", "pixel_bert.losses.x_make_itm_pairs__mutmut_*"),
    "pretrain_losses": ("pixel_bert/losses.py", "pixel_bert.losses.x_pretrain_losses__mutmut_*"),
    "hard_negative_loss": ("pixel_bert/losses.py", "pixel_bert.losses.x_hard_negative_loss__mutmut_*"),
    "VisualEmbedding.feature_mask": ("pixel_bert/model.py",
                                     "pixel_bert.model.xǁVisualEmbeddingǁfeature_mask__mutmut_*"),
    "VisualEmbedding.forward": ("pixel_bert/model.py", "pixel_bert.model.xǁVisualEmbeddingǁforward__mutmut_*"),
}

# The fast unit tests of those functions (seconds each): no training run, no subprocess.
FAST_TESTS = [
    "tests/test_metrics.py",
    "tests/test_properties.py::test_vqa_accuracy_is_the_soft_score_of_the_matches_in_any_order",
    "tests/test_properties.py::test_vqa_accuracy_of_any_strings_is_the_brute_force_leave_one_out_in_any_order",
    "tests/test_properties.py::test_retrieval_recall_is_monotone_in_k_and_equals_brute_force_ranking",
    "tests/test_properties.py::test_nlvr2_metrics_are_the_brute_force_counts_and_consistency_never_exceeds_accuracy",
    "tests/test_properties.py::test_nlvr2_consistency_can_exceed_accuracy_when_sentences_have_unequal_pairs",
    "tests/test_train.py::test_mask_tokens_follows_bert_rules",
    "tests/test_train.py::test_every_caption_gets_a_prediction",
    "tests/test_train.py::test_masking_rate_is_what_the_config_says",
    "tests/test_train.py::test_itm_negatives_never_from_the_same_image",
    "tests/test_train.py::test_pretrain_losses_are_eq7_over_predicted_tokens_plus_weighted_eq8",
    "tests/test_train.py::test_pixel_sampling_only_in_pretraining",
    "tests/test_train.py::test_itm_joins_at_itm_start_step",
    "tests/test_train.py::test_the_named_words_are_masked_at_the_early_rate_and_the_others_at_the_paper_rate",
    "tests/test_train.py::test_the_loss_functions_defaults_are_the_papers",
    "tests/test_train.py::test_masking_and_itm_pairs_follow_the_generator_they_are_given",
    "tests/test_train.py::test_itm_pairs_take_half_negatives_by_default_from_donors_drawn_per_row",
    "tests/test_train.py::test_itm_weight_and_lr_factor_apply_from_itm_start_step",
    "tests/test_downstream.py::test_hard_negative_loss_forms_match_hand_computed_gradients",
    "tests/test_downstream.py::test_hard_negative_loss_takes_given_hard_negatives_and_refuses_unknown_forms",
    "tests/test_downstream.py::test_retrieval_step_backprops_through_positive_and_5_hard",
    "tests/test_model.py::test_visual_embedding_shapes_and_grid",
    "tests/test_model.py::test_feature_mask_follows_padding",
    "tests/test_model.py::test_pixel_sampling_k_valid_random_and_off_in_eval",
    "tests/test_model.py::test_feature_mask_is_exact_over_a_sweep_of_sizes",
    "tests/test_model.py::test_padded_pixels_do_not_change_valid_outputs",
    "tests/test_model.py::test_the_feature_grid_covers_every_input_pixel",
]

# Surviving mutants examined by hand that cannot change behaviour: mutant name -> why.
# Survivors that cannot change behaviour where the tests run, recognised by what the mutant's added
# line does (mutmut's names number the mutants of a function, so they change when its code does).
EQUIVALENT_PATTERNS = [
    (re.compile(r"device=None|\.to\(None\)|^device = None$|(dtype=torch\.\w+|arange\(g[hw]|zeros\(\(\)|topk\(num_hard), \)"),
     "drops a device argument (or its dim): every tensor of a CPU test run is on the CPU, and dim=-1 "
     "is dim=1 for the 2-D scores"),
    (re.compile(r"argmax\(\+1\)"), "argmax(+1) is argmax(-1) on 2-D logits"),
    (re.compile(r"\(r (<=|>) replace_probs|\) <= (negative_ratio|torch\.as_tensor\(probability\))"),
     "a uniform random float equals the bound with probability 0"),
    (re.compile(r"masked_fill\(~(candidate|other_image), -2\.0\)"),
     "any negative fill ranks below the uniform [0, 1) scores"),
    (re.compile(r"other_image\.any\(dim=None\)"),
     "if any row has another image, every row has one: the per-row and the batch-wide test agree"),
]


def equivalent_reason(diff: str):
    """Why a surviving mutant is equivalent (EQUIVALENT_PATTERNS), or None."""
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    for pattern, reason in EQUIVALENT_PATTERNS:
        if added and all(pattern.search(line) for line in added):
            return reason
    return None


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS),
                   help="functions to mutate (default: all of them)")
    p.add_argument("--keep", default=None, help="scratch folder to use and keep (default: a temporary one, "
                   "removed afterwards); an existing one is reused, so mutmut only reruns what changed")
    p.add_argument("--max-children", type=int, default=None, help="mutants run in parallel (mutmut's default: "
                   "the CPU count)")
    p.add_argument("--json", default=None, help="also write the table and the survivors to this JSON file")
    return p


SETUP_CFG = """[mutmut]
source_paths =
    pixel_bert
only_mutate =
{only}
pytest_add_cli_args_test_selection =
{tests}
pytest_add_cli_args =
    -p
    no:cacheprovider
    -x
    -q
"""


def prepare(folder: str, targets) -> None:
    """The scratch copy of the package and the tests, and mutmut's configuration for it."""
    for name in ("pixel_bert", "tests"):
        if os.path.isdir(os.path.join(folder, name)):
            shutil.rmtree(os.path.join(folder, name))
        shutil.copytree(os.path.join(ROOT, name), os.path.join(folder, name),
                        ignore=shutil.ignore_patterns("__pycache__"))
    files = sorted({TARGETS[t][0] for t in targets})
    with open(os.path.join(folder, "setup.cfg"), "w") as f:
        f.write(SETUP_CFG.format(only="\n".join(f"    {p}" for p in files),
                                 tests="\n".join(f"    {t}" for t in FAST_TESTS)))


def function_of(mutant: str) -> str:
    """A mutant's function: '<module>.x_vqa_soft_score__mutmut_3' -> 'vqa_soft_score' and
    '<module>.xǁVisualEmbeddingǁforward__mutmut_2' -> 'VisualEmbedding.forward'."""
    name = mutant.rsplit(".", 1)[1].rsplit("__mutmut_", 1)[0]
    if name.startswith("xǁ"):
        return ".".join(name[2:].split("ǁ"))
    return name[2:]


def read_results(folder: str):
    """{mutant name: status} from mutmut's .meta files."""
    from mutmut.stats import status_by_exit_code
    statuses = {}
    for dirpath, _, filenames in os.walk(os.path.join(folder, "mutants")):
        for name in filenames:
            if name.endswith(".py.meta"):
                with open(os.path.join(dirpath, name)) as f:
                    meta = json.load(f)
                for mutant, code in meta["exit_code_by_key"].items():
                    statuses[mutant] = status_by_exit_code[code]
    return statuses


def show(folder: str, mutant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=folder, capture_output=True,
                         text=True)
    return out.stdout.strip()


def main(argv=None):
    import fnmatch
    args = get_args_parser().parse_args(argv)
    try:
        import mutmut  # noqa: F401
    except ImportError:
        raise SystemExit('mutmut is not installed: pip install -e ".[dev]"')
    folder = args.keep or tempfile.mkdtemp(prefix="pixel_bert_mutation_")
    os.makedirs(folder, exist_ok=True)
    prepare(folder, args.targets)
    globs = [TARGETS[t][1] for t in args.targets]
    cmd = [sys.executable, "-m", "mutmut", "run"] + globs
    if args.max_children:
        cmd += ["--max-children", str(args.max_children)]
    print(f"mutmut in {folder}: {' '.join(cmd[3:])}", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the scratch copy, not the checkout
    proc = subprocess.run(cmd, cwd=folder, env=env)
    statuses = {m: s for m, s in read_results(folder).items() if any(fnmatch.fnmatch(m, g) for g in globs)}
    by_function = collections.defaultdict(collections.Counter)
    for mutant, status in statuses.items():
        by_function[function_of(mutant)][status] += 1
    rows = []
    for function in sorted(by_function):
        counts = by_function[function]
        checked = sum(counts.values()) - counts["no tests"] - counts["not checked"]
        killed = counts["killed"] + counts["timeout"]
        rows.append({"function": function, "mutants": sum(counts.values()), "killed": killed,
                     "survived": counts["survived"], "no tests": counts["no tests"],
                     "share killed": killed / checked if checked else float("nan"), **{
                         k: v for k, v in counts.items() if k not in ("killed", "survived", "no tests", "timeout")}})
    print(f"\n{'function':40} {'killed':>7} / {'total':<6} {'share':>6}  survivors")
    for r in rows:
        print(f"{r['function']:40} {r['killed']:7d} / {r['mutants']:<6d} {r['share killed']:6.1%}  {r['survived']}"
              + (f"  (no tests {r['no tests']})" if r["no tests"] else ""))
    total_killed, total = sum(r["killed"] for r in rows), sum(r["mutants"] for r in rows)
    print(f"{'all':40} {total_killed:7d} / {total:<6d} {total_killed / max(total, 1):6.1%}")
    survivors = sorted(m for m, s in statuses.items() if s != "killed" and s != "timeout")
    details = {}
    for mutant in survivors:
        diff = show(folder, mutant)
        details[mutant] = {"status": statuses[mutant], "equivalent": equivalent_reason(diff), "diff": diff}
        reason = details[mutant]["equivalent"]
        print(f"\n--- {mutant} ({statuses[mutant]}){': equivalent: ' + reason if reason else ''}")
        print(diff)
    equivalent = sum(1 for d in details.values() if d["equivalent"] and d["status"] == "survived")
    print(f"\nkilled, counting the {equivalent} equivalent survivors out: {total_killed} / {total - equivalent} "
          f"= {total_killed / max(total - equivalent, 1):.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "survivors": details}, f, indent=1)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
