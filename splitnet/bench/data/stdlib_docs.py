"""Text that ships with Python: a docstring -> stdlib-package classification task and calibration text.

Items are the docstrings (``ast.get_docstring``) of modules, classes and functions of the standard
library (the ``test`` package and ``site-packages`` excluded), labelled with the top-level package or
module they come from. The ``n_classes`` largest labels are kept. Items are split at random (fixed
seed) into a train part and a held-out eval part.

Calibration text for codecs is the train docstrings, the docstrings of packages outside the task's
classes, and source-code chunks with every docstring removed, so no evaluation text is ever seen by
a codec.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import json
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(os.environ.get("SPLITNET_CACHE", Path.home() / ".cache" / "splitnet"))
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class DocTask:
    classes: list[str]
    train_text: list[str]
    train_label: list[int]
    eval_text: list[str]
    eval_label: list[int]
    code_chunks: list[str]  # docstring-free source chunks (calibration only)
    other_text: list[str]  # docstrings of packages outside ``classes`` (calibration only)

    def unlabelled_text(self, n_code: int) -> list[str]:
        """Calibration text beside the train docstrings: other packages' docstrings, then
        ``n_code`` source chunks."""
        return list(self.other_text) + list(self.code_chunks[:n_code])

    def calibration_text(self, n_code: int) -> list[str]:
        """All text a codec may learn from (train docstrings first): never an evaluation item."""
        return list(self.train_text) + self.unlabelled_text(n_code)


def _scan(root: str, min_chars: int, chunk_lines: int):
    docs: dict[str, str] = {}
    chunks: list[str] = []
    for dp, dn, fn in os.walk(root):
        dn[:] = sorted(d for d in dn if d not in _SKIP_DIRS)
        for f in sorted(fn):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dp, f)
            rel = os.path.relpath(path, root).split(os.sep)
            label = rel[0][:-3] if rel[0].endswith(".py") else rel[0]
            try:
                src = Path(path).read_text(encoding="utf-8")
                tree = ast.parse(src)
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            doc_lines: set[int] = set()
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    s = ast.get_docstring(node)
                    if node.body and isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None), ast.Constant):
                        e = node.body[0]
                        doc_lines.update(range(e.lineno, (e.end_lineno or e.lineno) + 1))
                    if s and len(s) >= min_chars and s not in docs:
                        docs[s] = label
            lines = [ln for i, ln in enumerate(src.splitlines(), 1) if i not in doc_lines and ln.strip()]
            for i in range(0, len(lines), chunk_lines):
                chunk = "\n".join(lines[i : i + chunk_lines]).strip()
                if len(chunk) >= min_chars:
                    chunks.append(chunk)
    return docs, chunks


def load_doc_task(n_classes: int = 30, n_eval: int = 3000, min_chars: int = 30, seed: int = 0, chunk_lines: int = 12) -> DocTask:
    """Build (or read from the cache) the stdlib docstring classification task."""
    root = sysconfig.get_paths()["stdlib"]
    key = hashlib.sha256(json.dumps([root, n_classes, n_eval, min_chars, seed, chunk_lines, 2]).encode()).hexdigest()[:16]
    cache = CACHE_DIR / f"stdlib_docs_{key}.json"
    if cache.is_file():
        d = json.loads(cache.read_text())
        return DocTask(**d)
    docs, chunks = _scan(root, min_chars, chunk_lines)
    counts = collections.Counter(docs.values())
    classes = sorted(c for c, _ in counts.most_common(n_classes))
    items = sorted((t, classes.index(lab)) for t, lab in docs.items() if lab in classes)
    rng = random.Random(seed)
    rng.shuffle(items)
    if len(items) < n_eval + 10 * len(classes):
        raise ValueError(f"only {len(items)} docstrings for {len(classes)} classes; lower n_eval")
    ev, tr = items[:n_eval], items[n_eval:]
    docset = set(docs)
    chunks = [c for c in chunks if c not in docset]
    rng.shuffle(chunks)
    task = DocTask(
        classes=classes,
        train_text=[t for t, _ in tr], train_label=[y for _, y in tr],
        eval_text=[t for t, _ in ev], eval_label=[y for _, y in ev],
        code_chunks=chunks,
        other_text=sorted(t for t, lab in docs.items() if lab not in classes),
    )
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(task.__dict__))
    return task
