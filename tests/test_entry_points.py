"""Every command the README names starts and explains itself: ``--help`` of each entry point exits 0
and lists every flag of its parser with that flag's help text. The launchers (train.py, finetune.py,
evaluate.py) and the ``python -m pixel_bert.*`` modules run in one separate Python process, each
exactly as Python runs a script or a module (``runpy``, which is what ``python FILE`` and ``python -m``
do), so their ``if __name__ == "__main__"`` wiring is what is tested; the installed console scripts
(``pip install -e .``) each run as a process of their own. A ``--help`` that crashes (a literal % in a
flag's help once did) or a flag without an explanation fails here."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest

from pixel_bert import datasets, evaluate, export, finetune, synthetic, synthetic_tasks, train, visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # where pip put the console scripts of this environment

# name -> (how the driver runs it: "path" or "module", the file or module, the main() whose parser
# it is, the sub-command or None)
ENTRY_POINTS = {
    "train.py": ("path", "train.py", train.main, None),
    "finetune.py": ("path", "finetune.py", finetune.main, None),
    "evaluate.py": ("path", "evaluate.py", evaluate.main, None),
    "python -m pixel_bert.train": ("module", "pixel_bert.train", train.main, None),
    "python -m pixel_bert.export": ("module", "pixel_bert.export", export.main, None),
    "python -m pixel_bert.visualize": ("module", "pixel_bert.visualize", visualize.main, None),
    "python -m pixel_bert.datasets verify": ("module", "pixel_bert.datasets", datasets.main, "verify"),
    "python -m pixel_bert.datasets download": ("module", "pixel_bert.datasets", datasets.main, "download"),
    "python -m pixel_bert.synthetic": ("module", "pixel_bert.synthetic", synthetic.main, None),
    "python -m pixel_bert.synthetic_tasks": ("module", "pixel_bert.synthetic_tasks", synthetic_tasks.main, None),
}
CONSOLE_SCRIPTS = {"pixel-bert-train": train.main, "pixel-bert-finetune": finetune.main,
                   "pixel-bert-evaluate": evaluate.main, "pixel-bert-export": export.main}

# Runs each entry point as `python FILE` / `python -m MODULE` would (runpy), capturing its output and
# exit status; one process for all of them, so the suite pays for importing torch once.
DRIVER = r"""
import contextlib, io, json, runpy, sys, warnings
warnings.simplefilter("ignore", RuntimeWarning)  # runpy: a module already imported by an earlier entry
results = {}
for name, kind, target, argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    sys.argv = [target] + argv
    code = "returned without exiting"
    with contextlib.redirect_stdout(out):
        try:
            if kind == "path":
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = 0 if e.code is None else e.code
    results[name] = {"code": code, "out": out.getvalue()}
print(json.dumps(results))
"""


def help_argv(subcommand):
    return ([subcommand] if subcommand else []) + ["--help"]


@pytest.fixture(scope="module")
def helps():
    """{entry point: (exit status, --help output)}, the console scripts' from their own processes."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               COLUMNS="10000")  # argparse wraps help at the terminal width: one line per flag
    jobs = [(name, kind, target, help_argv(sub)) for name, (kind, target, _, sub) in ENTRY_POINTS.items()]
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(jobs)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scripts = {}
    for name in CONSOLE_SCRIPTS:
        path = os.path.join(BIN, name)
        assert os.path.isfile(path), f"{path}: no console script (pip install -e . installs it)"
        scripts[name] = subprocess.Popen([path, "--help"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err[-3000:]
    results = {name: (r["code"], r["out"]) for name, r in json.loads(out.splitlines()[-1]).items()}
    for name, proc in scripts.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out + err)
    return results


class _Parsed(Exception):
    pass


def parser_of(main, subcommand=None, monkeypatch=None):
    """The parser ``main`` builds, caught at its parse_args (nothing runs), or its sub-command's."""
    caught = []

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise _Parsed
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Parsed):
        main(["--help"])
    monkeypatch.undo()
    parser = caught[0]
    if subcommand:
        (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = commands.choices[subcommand]
    return parser


def missing_from_help(parser, text):
    """The flags of ``parser`` whose option strings or help text are not in ``text`` (or that have no
    help text at all)."""
    flat = " ".join(text.split())
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue  # a parser of its own: checked as an entry point
        if action.help == argparse.SUPPRESS:
            continue
        names = action.option_strings or [action.metavar or action.dest]
        explanation = re.sub(r"\(default .*\)$", "", action.help or "").strip()
        if not explanation:
            missing.append(f"{names[0]}: no help text")
        elif not all(name in text for name in names):
            missing.append(f"{names}: not listed")
        elif " ".join(formatter._expand_help(action).split()) not in flat:
            missing.append(f"{names[0]}: help text not shown")
    return missing


@pytest.mark.parametrize("name", list(ENTRY_POINTS) + list(CONSOLE_SCRIPTS))
def test_help_exits_0_and_explains_every_flag(name, helps, monkeypatch):
    code, text = helps[name]
    assert code == 0, f"{name} --help exited {code}:\n{text[-2000:]}"
    if name in ENTRY_POINTS:
        _, _, main, subcommand = ENTRY_POINTS[name]
    else:
        main, subcommand = CONSOLE_SCRIPTS[name], None
    parser = parser_of(main, subcommand, monkeypatch)
    assert len(parser._actions) > 2  # a real parser, not an empty one
    missing = missing_from_help(parser, text)
    assert not missing, f"{name} --help:\n  " + "\n  ".join(missing)


def test_the_help_check_detects_a_flag_without_an_explanation():
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--documented", help="what it does (default 3)")
    parser.add_argument("--bare", help=" (default 1)")
    parser.add_argument("--hidden-help", help="shown")
    text = parser.format_help().replace("shown", "")
    assert missing_from_help(parser, text) == ["--bare: no help text", "--hidden-help: help text not shown"]
