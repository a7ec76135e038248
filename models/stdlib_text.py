"""Real English text that ships with Python: the docstrings of the standard library, read with `ast`
from the installed sources (nothing is imported or executed, nothing is downloaded).

Two corpora, both deterministic for a given Python (3.11.7 here):

* `labelled_docstrings`: a topic-classification task. Each docstring (module, class or function, at least
  ``MIN_WORDS`` words) of four stdlib packages is labelled with the package it comes from:
  0 asyncio (event loops, coroutines), 1 email (messages, MIME, headers), 2 logging (handlers, records),
  3 tkinter (GUI widgets). On Python 3.11.7: 156 / 164 / 113 / 281 eligible docstrings; a family takes
  the same number per class, so the labels are balanced by construction.
* `prose_bytes`: the docstrings of every top-level stdlib module (``*.py`` directly in the stdlib folder,
  sorted by name), joined with blank lines, as UTF-8 bytes: about 1 MB of technical English prose.
"""
from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

TOPICS = ("asyncio", "email", "logging", "tkinter")
MIN_WORDS = 20  # shorter docstrings ("Return the name.") say too little about their topic


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docstrings(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):  # a few stdlib test fixtures are deliberately broken
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def labelled_docstrings(topics=TOPICS, root=None):
    """Rows {"text", "label"} in a fixed order (sorted file paths, then source order); tests excluded.
    ``root``: the stdlib folder (default: this Python's; passing it keys an Arrow cache to the Python)."""
    root = Path(root) if root else stdlib_root()
    for label, package in enumerate(topics):
        for path in sorted((root / package).rglob("*.py")):
            if "test" in path.relative_to(root / package).parts[:-1] or path.name.startswith("test"):
                continue
            for doc in _docstrings(path):
                if len(doc.split()) >= MIN_WORDS:
                    yield {"text": " ".join(doc.split()), "label": label}


def prose_bytes(root=None) -> bytes:
    docs = (d for path in sorted((Path(root) if root else stdlib_root()).glob("*.py")) for d in _docstrings(path))
    return "\n\n".join(docs).encode("utf-8")
