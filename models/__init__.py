"""Network builders and their data. Plain PyTorch and transformers: no Ray, no files."""
from eqlab.models.registry import FAMILIES, Task, build_task, expected_symmetries, missing_symmetries

__all__ = ["FAMILIES", "Task", "build_task", "expected_symmetries", "missing_symmetries"]
