"""The dependency direction: the core never imports Celery, kombu, workers/ or devstack/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("celery", "kombu", "workers", "devstack")


def test_no_module_of_the_core_imports_celery_kombu_workers_or_devstack() -> None:
    offenders = []
    for path in sorted((ROOT / "dispatcher").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} imports {n}"
                for n in names
                if n.split(".")[0] in FORBIDDEN
            ]
    assert offenders == []


def test_importing_every_core_module_loads_no_celery_nor_devstack_and_connects_nowhere() -> None:
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "dispatcher").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and "migrations" not in p.parts
    )
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise AssertionError('connected at import time')\n"
        "socket.socket.connect = refuse\n"
        f"for m in {modules!r}: __import__(m)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_importing_the_celery_app_module_connects_nowhere() -> None:
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise AssertionError('connected at import time')\n"
        "socket.socket.connect = refuse\n"
        "import workers.app, workers.tasks, workers.web, workers.queue\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
