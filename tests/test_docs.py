"""Every reference resolves inside the repository.

- Markdown links (``[text](target)``, images too) point to files that exist, and a ``#fragment``
  into a Markdown file names one of its headings (GitHub's heading anchors).
- File paths named in the Markdown files and in the Python docstrings and comments
  (``pixel_bert/heads.py``, ``see docs/paper.md#pre-training``, ``benchmarks/model_speed.py``) exist.
  Paths that name files made at run time or downloaded are not repository references and are left
  alone: see `path_candidates` for the rule.
- Dotted references to this package (``pixel_bert.saved_model.load_saved_model``) name a module that exists
  and, when they go on, a name that module defines; ``TrainConfig.lr``-style references (and the
  fields listed in docs/paper.md's tables) name fields the config dataclasses have.
- No file points outside the repository for the paper: paper references use the paper's own
  numbering ("Sec. 3.2", "eq. (5)") and docs/paper.md.
"""
import ast
import functools
import io
import os
import re
import subprocess
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Walked when git is not available (an unpacked sdist, say); git's own rules apply otherwise.
SKIP_DIRS = {".git", ".venv", "venv", "runs", "build", "dist", "data", "__pycache__", ".pytest_cache"}

# Named in the docs on purpose although they are not in this repository: files of other projects.
EXTERNAL_FILES = {
    "vqaEval.py",               # GT-Vision-Lab/VQA's official evaluator ...
    "vqaEvalDemo.py",           # ... and the demo script that calls it
    "nlvr2/eval/metrics.py",    # lil-lab/nlvr's official evaluator
    "detectron/modeling/ResNet.py",  # facebookresearch/Detectron's ResNet, whose blob names we map
}

# First path components that are run-time folders (made by the scripts or holding downloads), not
# repository content: runs/demo/model.pt, data/synthetic, ...
RUNTIME_ROOTS = {"runs", "data", "run", "out", "output", "tmp", "scratch"}

# Source files and documents (.py, .md, .sh) are repository files wherever they are named, so a
# missing one is a dead reference. Other files (.json, .pt, .png, ...) are mostly data named by their
# format or run-time outputs, so those are checked only under a folder of the repository
# (docs/attention_demo.png).
SOURCE_FILE = re.compile(r"[\w.+-]*\w\.(py|md|sh)")

TOKEN = re.compile(r"[^\s`'\"()\[\]<>,;|]+")
URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
DOTTED = re.compile(r"(?<![\w.])pixel_bert(?:\.\w+)+")


def repo_files():
    """Repository files as POSIX paths relative to ROOT: git's tracked and not-ignored files."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
        return sorted(f for f in set(files) if os.path.exists(os.path.join(ROOT, f)))
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/") for f in filenames]
        return sorted(files)


FILES = repo_files()
DIRS = {"/".join(f.split("/")[:i]) for f in FILES for i in range(1, f.count("/") + 1)}
TOP_LEVEL_DIRS = {d for d in DIRS if d and "/" not in d}
BASENAMES = {os.path.basename(f) for f in FILES}


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def exists(rel):
    """A repository file or folder, given relative to ROOT (normalised: no '..' escapes)."""
    rel = os.path.normpath(rel).replace(os.sep, "/")
    return not rel.startswith("..") and (rel in FILES or rel.rstrip("/") in DIRS)


def github_anchors(markdown):
    """The anchors GitHub gives the headings of a Markdown text: lower case, punctuation dropped,
    spaces to hyphens, a -1, -2 ... suffix on repeats."""
    anchors, seen = set(), {}
    for line in FENCE.sub("", markdown).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link keeps its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def python_prose(source):
    """The lines of the docstrings and comments of a Python file, with their line numbers."""
    parts = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and node.body:
                first = node.body[0].lineno
                parts += [(first + i, line) for i, line in enumerate(doc.splitlines())]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            parts.append((tok.start[0], tok.string))
    return parts


@functools.lru_cache(maxsize=None)  # parsed once: the file lists below and the checks read the same prose
def prose(path):
    """(line number, line) of a file where references are looked for: every line of a Markdown
    file, the docstrings and comments of a Python file."""
    text = read(path)
    if path.endswith(".py"):
        return python_prose(text)
    # link targets are test_markdown_links_resolve's; their text is checked here
    return [(n, re.sub(r"\]\([^)]*\)", "]", line)) for n, line in enumerate(text.splitlines(), 1)]


def is_placeholder(component):
    """RUN, DIR, NODE0_HOST, COCO: upper-case names stand for a path the user chooses."""
    return bool(re.fullmatch(r"[A-Z0-9_+-]*[A-Z][A-Z0-9_+-]*", component))


def path_candidates(text):
    """Words of ``text`` that name a repository path, by these rules:

    - a word with a '/' counts when its first folder is one of the repository's (``docs/...``,
      ``pixel_bert/...``) or when it ends in .py, .md or .sh (a source file or a document anywhere);
    - a bare file name counts when it ends in .py, .md or .sh (``heads.py``, ``README.md``);
    - never: URLs, command-line flags, absolute or home paths, templates and globs ({split}, *,
      <dir>, $VAR), paths under a run-time folder (runs/, data/) or with an UPPER-CASE placeholder
      component (RUN/model.pt, VQA/), and the other projects' files in EXTERNAL_FILES.
    ``path::test_name`` (a pytest node id) and ``path#anchor`` count as their path.
    """
    for word in TOKEN.findall(URL.sub(" ", text)):
        word = word.rstrip(".:!?")
        word = word.split("::")[0]
        if not word or word[0] in "-/~$" or any(c in word for c in "{}*%=@\\"):
            continue
        path, _, anchor = word.partition("#")
        components = [c for c in path.split("/") if c not in ("", ".")]
        if not components or path in EXTERNAL_FILES or os.path.basename(path) in EXTERNAL_FILES:
            continue
        if components[0] in RUNTIME_ROOTS or any(is_placeholder(c) for c in components):
            continue
        is_source = bool(SOURCE_FILE.fullmatch(components[-1]))  # "heads.py", not a bare ".py"
        if "/" in path.strip("/"):
            first = next(c for c in components if c != "..")
            if first in TOP_LEVEL_DIRS or is_source:
                yield path, anchor
        elif is_source:
            yield path, anchor


def resolves(path, source_file):
    """Relative to the referring file's folder or to the repository root; a bare file name may
    be any repository file of that name (``heads.py`` in the README means pixel_bert/heads.py)."""
    here = os.path.dirname(source_file)
    if exists(os.path.join(here, path)) or exists(path):
        return True
    return "/" not in path and path in BASENAMES


def markdown_target(target, source_file):
    """The repository path a Markdown link target points to, relative to ROOT."""
    return os.path.normpath(os.path.join(os.path.dirname(source_file), target)).replace(os.sep, "/")


def anchor_problem(path, anchor):
    """Why ``path#anchor`` does not resolve, or None (only Markdown headings are checked)."""
    if not anchor or not path.endswith(".md") or not exists(path):
        return None
    if anchor not in github_anchors(read(path)):
        return f"{path} has no heading with anchor #{anchor}"
    return None


MARKDOWN = [f for f in FILES if f.endswith(".md")]
PYTHON = [f for f in FILES if f.endswith(".py")]


def holding(files, finds):
    """The files whose prose holds at least one reference of a kind (``finds(text)`` yields them):
    each check below runs on those files only, so every collected case checks something."""
    return [f for f in files if any(next(iter(finds(text)), None) is not None for _, text in prose(f))]


def markdown_links(markdown):
    return MD_LINK.findall(FENCE.sub("", markdown))


LINKED_MARKDOWN = [f for f in MARKDOWN if markdown_links(read(f))]
PATH_FILES = holding(MARKDOWN + PYTHON, path_candidates)
DOTTED_FILES = holding(MARKDOWN + PYTHON, DOTTED.findall)


def test_the_scan_sees_the_repository():
    # The checks below are only as good as the file list: it must hold the sources and the docs.
    assert "README.md" in FILES and "pixel_bert/model.py" in FILES and "tests/test_docs.py" in FILES
    assert MARKDOWN and len(PYTHON) > 10
    # and the files each check runs on are the ones that hold its kind of reference
    assert {"README.md", "docs/paper.md"} <= set(LINKED_MARKDOWN)
    assert {"README.md", "docs/paper.md", "pixel_bert/model.py", "train.py"} <= set(PATH_FILES)
    assert {"README.md", "pixel_bert/inference.py", "pixel_bert/downstream.py"} <= set(DOTTED_FILES)
    assert {"docs/paper.md", "pixel_bert/train.py", "pixel_bert/retrieval.py"} <= set(CONFIG_FILES)
    assert "pixel_bert/__init__.py" not in PATH_FILES + DOTTED_FILES + CONFIG_FILES  # it holds no reference


def test_candidate_rules():
    # the rule of path_candidates on words that occur in this repository's docs and comments
    words = ("see `pixel_bert/heads.py`; docs/paper.md#pre-training, heads.py and README.md: "
             "tests/test_inference.py::test_colour_words_look_at_their_shapes")
    assert list(path_candidates(words)) == [("pixel_bert/heads.py", ""), ("docs/paper.md", "pre-training"),
                                            ("heads.py", ""), ("README.md", ""), ("tests/test_inference.py", "")]
    not_references = ("runs/demo/model.pt RUN/answers.json --coco-images COCO/ data/synthetic "
                      "v2_mscoco_{split}_annotations.json /abs/file.py https://arxiv.org/abs/2004.00849 "
                      "dataset_coco.json nlvr2/data/dev.json ckpt_*.pt MLM/ITM yes/no pairs/s "
                      "GT-Vision-Lab/VQA vqaEval.py lil-lab/nlvr nlvr2/eval/metrics.py")
    assert list(path_candidates(not_references)) == []
    assert "pre-training" in github_anchors("# Title\n## Pre-training\n")
    headings = "## A `b` (eq. 1)\n## a b (eq. 1)\n```\n# not a heading\n```\n"
    assert github_anchors(headings) == {"a-b-eq-1", "a-b-eq-1-1"}


@pytest.mark.parametrize("md_file", LINKED_MARKDOWN)
def test_markdown_links_resolve(md_file):
    dead = []
    for target in markdown_links(read(md_file)):
        if URL.match(target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        if not path:  # a link to a heading of this very file
            if anchor not in github_anchors(read(md_file)):
                dead.append(f"#{anchor}: no such heading in {md_file}")
            continue
        full = markdown_target(path, md_file)
        if not exists(full):
            dead.append(f"{target}: {full} does not exist")
        elif anchor_problem(full, anchor):
            dead.append(f"{target}: {anchor_problem(full, anchor)}")
    assert not dead, f"dead links in {md_file}:\n  " + "\n  ".join(dead)


@pytest.mark.parametrize("source_file", PATH_FILES)
def test_path_references_resolve(source_file):
    dead = []
    for line, text in prose(source_file):
        for path, anchor in path_candidates(text):
            if not resolves(path, source_file):
                dead.append(f"{path} (near line {line})")
                continue
            target = path if exists(path) else markdown_target(path, source_file)
            problem = anchor_problem(target, anchor)
            if problem:
                dead.append(f"{path}#{anchor} (near line {line}): {problem}")
    assert not dead, f"{source_file} names paths that are not in the repository:\n  " + "\n  ".join(dead)


def module_names(module_path):
    """Top-level names a module defines (functions, classes, assignments, imports)."""
    names = set()
    for node in ast.parse(read(module_path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


@pytest.mark.parametrize("source_file", DOTTED_FILES)
def test_dotted_package_references_resolve(source_file):
    dead = []
    for line, text in prose(source_file):
        for ref in DOTTED.findall(text):
            parts = ref.rstrip(".").split(".")
            module = "/".join(parts[:2]) + ".py"
            if not exists(module):
                if not exists("/".join(parts[:2])):
                    dead.append(f"{ref} (near line {line}): no module {module}")
                continue
            if len(parts) > 2 and parts[2] not in module_names(module):
                dead.append(f"{ref} (near line {line}): {module} defines no {parts[2]!r}")
    assert not dead, f"{source_file} names package objects that do not exist:\n  " + "\n  ".join(dead)


def config_fields():
    """{class name: its field names} of the configuration dataclasses the docs cite."""
    import dataclasses
    from pixel_bert.config import ModelConfig, TrainConfig
    from pixel_bert.downstream import DownstreamConfig
    from pixel_bert.model import PixelBertConfig
    from pixel_bert.retrieval import RetrievalConfig
    from pixel_bert.vqa import VQAConfig
    return {cls.__name__: {f.name for f in dataclasses.fields(cls)}
            for cls in (PixelBertConfig, ModelConfig, TrainConfig, DownstreamConfig, VQAConfig, RetrievalConfig)}


CONFIG_REF = re.compile(r"\b(PixelBertConfig|ModelConfig|TrainConfig|DownstreamConfig|VQAConfig|RetrievalConfig)\.(\w+)")
CONFIG_FILES = holding(MARKDOWN + PYTHON, CONFIG_REF.findall)  # a table row's bare fields need a class named too


@pytest.mark.parametrize("source_file", CONFIG_FILES)
def test_config_fields_named_in_the_docs_exist(source_file):
    # "TrainConfig.freeze_backbone" anywhere; in a Markdown table row that names a config class, also
    # the bare `field` (`default`) entries after it (docs/paper.md's paper-versus-implementation table).
    fields, dead = config_fields(), []
    for line, text in prose(source_file):
        named = [(cls, name) for cls, name in CONFIG_REF.findall(text)]
        cells = text.split("|")
        if source_file.endswith(".md") and len(cells) > 2:
            for cell in cells:
                classes = CONFIG_REF.findall(cell)
                if classes:
                    named += [(classes[0][0], name) for name in re.findall(r"`(\w+)` \(`", cell)]
        dead += [f"{cls}.{name} (near line {line})" for cls, name in named if name not in fields[cls]]
    assert not dead, f"{source_file} names config fields that do not exist:\n  " + "\n  ".join(dead)


def test_no_reference_leaves_the_repository():
    # Built from parts so that this file does not match itself.
    forbidden = ("PAPER" + ".md", ".." + "/shared")
    hits = []
    for path in FILES:
        try:
            text = read(path)
        except (UnicodeDecodeError, IsADirectoryError):
            continue  # binary files (images)
        for n, line in enumerate(text.splitlines(), 1):
            hits += [f"{path}:{n}: {word}" for word in forbidden if word in line]
    assert not hits, ("references to files outside the repository (cite the paper's numbering and "
                      "docs/paper.md instead):\n  " + "\n  ".join(hits))
