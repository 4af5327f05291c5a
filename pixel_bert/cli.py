"""The command line: every config dataclass field is a flag, checked when parsed.

`add_config_arguments` gives each field of `ModelConfig`, `TrainConfig` or a task's config a
``--field-name`` flag (``--field_name`` too) whose help is the field's comment in its source and
whose value is parsed by the field's type and checked against the class's ``ALLOWED`` table;
`apply_overrides` puts the flags the user gave on top of a preset. `run_cli` runs a script's main:
an error the user caused ends with ``error: <message>`` instead of a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
from dataclasses import fields
from typing import Any, Callable, Dict, Optional

from .errors import RunInterrupted, UserError
from .model import field_problem


def parse_field(cls, name: str, text: str) -> Any:
    """A command-line string -> the value of field ``name`` of config class ``cls``, by the field's
    type; a value that is not allowed raises ``argparse.ArgumentTypeError`` saying what is."""
    kind = str({f.name: f for f in fields(cls)}[name].type).replace(" ", "")
    optional = kind.startswith("Optional[")
    base = kind[len("Optional["):-1] if optional else kind
    text = text.strip()
    try:
        if optional and text.lower() in ("none", "null"):
            return None
        if base == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            value = text.lower() in ("true", "1", "yes")
        elif base in ("int", "float"):
            value = int(text) if base == "int" else float(text)
        elif base.startswith("Tuple["):
            item = str if "str" in base else int if "int" in base else float
            value = tuple(item(v.strip()) for v in text.strip("()[]").split(",") if v.strip())
        else:
            value = text
    except ValueError:
        expected = {"bool": "true or false", "int": "an integer", "float": "a number"}.get(base, base)
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    problem = field_problem(cls, name, value)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
    return value


def parse_override(cfg, key: str, value: str):
    """Set ``cfg.key`` from a command-line string (`parse_field`), then re-check the whole config."""
    if key not in {f.name for f in fields(cfg)}:
        raise ValueError(f"unknown config field {key!r} for {type(cfg).__name__}; known: "
                         f"{sorted(f.name for f in fields(cfg))}")
    setattr(cfg, key, parse_field(type(cfg), key, value))
    cfg.__post_init__()
    return cfg


def field_help(cls) -> Dict[str, str]:
    """Each field's comment in this file (the text after ``#`` on its line and the comment lines
    under it), so command-line ``--help`` explains every flag from the one place it is written."""
    docs: Dict[str, str] = {}
    last = None
    sources = [inspect.getsource(c) for c in cls.__mro__ if dataclasses.is_dataclass(c)]
    for line in "\n".join(sources).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", line)
        if m and m.group(1) in {f.name for f in fields(cls)}:
            last = m.group(1)
            docs[last] = (m.group(2) or "").strip()
            continue
        c = re.match(r"\s+#\s*(.*)$", line)
        if c and last and not c.group(1).startswith("----"):
            docs[last] = (docs[last] + " " + c.group(1).strip()).strip()
        else:
            last = None
    return docs


class _NotGiven:
    """Default of every field flag: the flag was not given (None is a value: ``--bert-weights none``)."""

    def __repr__(self) -> str:
        return "not given"


NOT_GIVEN = _NotGiven()


def add_config_arguments(parser, cls, prefix_help: str = ""):
    """One ``--field-name`` flag per dataclass field (``--field_name`` is accepted too), checked when
    parsed; not given = keep the preset's value."""
    docs = field_help(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields{prefix_help}")
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        parse = lambda text, name=f.name: parse_field(cls, name, text)  # noqa: E731
        parse.__name__ = f.name  # argparse names the type in its messages
        group.add_argument(*names, dest=f.name, default=NOT_GIVEN, metavar="V", type=parse,
                           # argparse %-formats help text: a literal % (e.g. "60%") must be doubled
                           help=f"{docs.get(f.name, '')} (default {default!r})".replace("%", "%%"))


def apply_overrides(cfg, args) -> list:
    """Apply the field flags the user gave to ``cfg`` (already parsed and checked by the flags' types);
    returns the names changed. Cross-field checks run once all are set."""
    changed = []
    for f in fields(cfg):
        value = getattr(args, f.name, NOT_GIVEN)
        if value is not NOT_GIVEN:
            setattr(cfg, f.name, value)
            changed.append(f.name)
    if changed:
        cfg.__post_init__()
    return changed


def int_at_least(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (a count, a size, a seed), so that a negative count
    is refused by name instead of acting as a Python slice or failing deep inside torch."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text!r}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def flag_name(dest: str) -> str:
    """The command-line spelling of an argparse dest: ``coco_images`` -> ``--coco-images``."""
    return f"--{dest.replace('_', '-')}"


def flag_without_companion(args, needs: Dict[str, str]) -> Optional[str]:
    """Why the data flags cannot be used as given, or None: ``needs`` maps a flag (argparse dest) to the
    flag it is read together with (an image folder to its annotation file), so that a flag given alone,
    which would be ignored (and the run fall back to the synthetic data), is an error instead."""
    for dest, needed in needs.items():
        if getattr(args, dest) and not getattr(args, needed):
            return f"{flag_name(dest)} is given without {flag_name(needed)}, which names the annotations to read"
    return None


# -------------------------------------------------------------------------------------------------
#                                   Errors the user caused
# -------------------------------------------------------------------------------------------------

DEBUG_ENV = "PIXEL_BERT_DEBUG"  # =1: tracebacks for user errors too, as --debug


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error about a file, "
                        f"folder, flag or checkpoint too (also {DEBUG_ENV}=1); without it such an error is one "
                        "line, 'error: <message>'")


def run_cli(main: Callable[[], Any], argv=None) -> Any:
    """Run a script's ``main()``. An error the user caused (`pixel_bert.errors.UserError`: a bad file,
    folder, flag or checkpoint; or a file not found) ends the process with ``error: <message>`` on
    stderr and exit status 1, and a Ctrl-C with what was saved and status 130, both without a Python
    traceback, which would bury the message; ``--debug`` (or PIXEL_BERT_DEBUG=1) shows it. Any other
    exception is a bug and keeps its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    try:
        return main()
    except RunInterrupted as e:
        if debug:
            raise
        print(f"{e}{rank}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"interrupted{rank}", file=sys.stderr)
        sys.exit(130)
    except (UserError, FileNotFoundError) as e:
        if debug:
            raise
        print(f"error{rank}: {e}", file=sys.stderr)
        sys.exit(1)
