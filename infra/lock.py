"""Write infra/constraints.txt: the versions the images install, known to go together.

    .venv/bin/python infra/lock.py          # resolves; takes about a minute, downloads no wheels

pip resolves the CUDA worker (vLLM and the models extra, CPython 3.12, manylinux x86_64, as
in its CUDA base and python:3.12-slim) and then the CPU worker and the gateway on CPython 3.11
(Debian bookworm's Python, which the CI images use) with the same versions of what matters
(`SAME`: torch, the model libraries, the project's own dependencies). Only wheel metadata is
fetched (PyPI serves it apart from the wheels). A package both resolve alike is one line; one
that a Python version decides otherwise (networkx 3.7 wants 3.12) gets a line per version.
The Dockerfiles install with `-c infra/constraints.txt`, so that two builds of the same commit
install the same packages.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "infra" / "constraints.txt"
# vLLM pins its torch exactly; this one pins torch 2.13.0, the CPU worker's torch too.
VLLM = "vllm==0.32.0"
# What both Pythons must install alike, beside the project's own dependencies.
SAME = {"torch", "numpy", "huggingface-hub", "tokenizers", "safetensors", "pillow"}


def platforms(glibc_minor: int) -> list[str]:
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(17, glibc_minor + 1)]
    return [*tags, "manylinux2014_x86_64", "linux_x86_64"]


def resolve(
    python_version: str, glibc_minor: int, requirements: list[str], constraints: Path | None
) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        command = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
            "--only-binary=:all:", "--implementation", "cp", "--python-version", python_version,
            *(arg for platform in platforms(glibc_minor) for arg in ("--platform", platform)),
            "--target", str(Path(scratch) / "target"), "--report", str(report),
        ]  # fmt: skip
        if constraints:
            command += ["-c", str(constraints)]
        # the index alone: not this machine's own wheel folders or caps
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_FIND_LINKS")}
        env["PIP_CONFIG_FILE"] = os.devnull
        subprocess.run([*command, *requirements], check=True, env=env, cwd=ROOT)
        installs = json.loads(report.read_text())["install"]
    return {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
        for item in installs
        if item["metadata"]["name"] != "gpuhost"
    }


def own_dependencies() -> set[str]:
    """The names the project asks for itself (its base and models dependencies)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["models"]
    return {re.match(r"[A-Za-z0-9_.-]+", spec).group().lower().replace("_", "-") for spec in wanted}


def main() -> int:
    # Ubuntu 24.04 (the CUDA base) has glibc 2.39; Debian bookworm 2.36.
    cuda = resolve("3.12", 39, [VLLM, ".[models]"], None)
    same = {name: cuda[name] for name in (SAME | own_dependencies()) & cuda.keys()}
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as pins:
        pins.write("".join(f"{name}=={version}\n" for name, version in sorted(same.items())))
        pins.flush()
        cpu = resolve("3.11", 36, [".[models]"], Path(pins.name))
    lines = []
    for name in sorted(cuda.keys() | cpu.keys()):
        versions = {"3.12": cuda.get(name), "3.11": cpu.get(name)}
        if None in versions.values() or versions["3.12"] == versions["3.11"]:
            lines.append(f"{name}=={versions['3.12'] or versions['3.11']}")
            continue
        lines += [f'{name}=={v}; python_version == "{py}"' for py, v in versions.items()]
    OUT.write_text(
        "# Written by infra/lock.py: do not edit by hand, run it again.\n"
        "# The versions the gateway and worker images install (pip install -c this file).\n"
        + "\n".join(lines)
        + "\n"
    )
    print(f"{OUT.relative_to(ROOT)}: {len(lines)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
