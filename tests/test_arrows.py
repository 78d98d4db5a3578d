"""Imports follow the arrows of docs/ARCHITECTURE.md, read from the code: who may import whom.

- `config` (the stack's settings) imports nothing else of the project, and `billing` and
  `storage` nothing but `config`;
- `tuning` and `webhooks` never import `workers`, `api` or `cli`;
- the gateway (`api/`) never imports torch, the engines, the worker's tasks or entry point,
  the tiny models, `migrations` or the command line;
- no product package imports `tests`, `bench` or `harness`;
- `bench/` never imports `tests/`, nor `tests/` `bench/`: what both need is in `harness/`.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = (
    "api", "billing", "cli", "config", "migrations", "storage", "tuning", "webhooks", "workers"
)  # fmt: skip
GATEWAY_NEVER = (
    "torch",
    "diffusers",
    "transformers",
    "vllm",
    "migrations",
    "cli",
    "workers.engines",
    "workers.tasks",
    "workers.main",
    "workers.tiny",
    "workers.training",
)


def imported(path: Path):
    """Every module `path` imports, absolute (relative imports resolved)."""
    module = path.relative_to(ROOT).with_suffix("").parts
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(module[: -node.level])
                yield ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                yield node.module


def refused(top: str, name: str) -> bool:
    first = name.split(".")[0]
    within = lambda *names: any(name == n or name.startswith(n + ".") for n in names)  # noqa: E731
    if top in PRODUCT and first in ("tests", "bench", "harness"):
        return True
    if top == "config":
        return first in PRODUCT and first != top
    if top in ("billing", "storage"):
        return first in PRODUCT and first not in (top, "config")
    if top in ("tuning", "webhooks"):
        return first in ("workers", "api", "cli")
    if top == "api":
        return within(*GATEWAY_NEVER)
    if top == "bench":
        return first == "tests"
    if top in ("tests", "harness"):
        return first == "bench"
    return False


def test_imports_follow_the_arrows():
    broken = []
    for top in (*PRODUCT, "bench", "tests", "harness"):
        for path in sorted((ROOT / top).rglob("*.py")):
            broken += [
                f"{path.relative_to(ROOT)} imports {name}"
                for name in imported(path)
                if refused(top, name)
            ]
    assert not broken, "\n".join(broken)
