"""Errors the user caused: a file, a folder, a flag or a checkpoint that cannot be used as given.

Their messages name what was wrong and where, and say what to do; the scripts print them as
``error: <message>`` without a Python traceback (`pixel_bert.cli.run_cli`). Any other exception is
a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user gave, explained by the message (a ValueError, so callers that
    expect one keep working)."""


class RunFolderError(UserError):
    """The run folder belongs to another run: one still running there, or checkpoints of another
    task or model configuration."""


class RunInterrupted(UserError):
    """The run was stopped by the user (Ctrl-C); the message says what was saved and how to resume."""
