"""The downstream tasks by name (Sec. 4.2 of the paper): finetune.py and evaluate.py look a task up
here. Each is a `pixel_bert.downstream.DownstreamTask` defined in its own module; docs/tasks.md says
how to add one."""
from __future__ import annotations

from typing import Dict

from .downstream import DownstreamTask
from .nlvr2 import NLVR2
from .retrieval import Retrieval
from .vqa import VQA

TASKS: Dict[str, DownstreamTask] = {task.name: task for task in (VQA(), NLVR2(), Retrieval())}
