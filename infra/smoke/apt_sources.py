"""This machine's own Debian sources for one release, as sources.list lines.

    python3 infra/smoke/apt_sources.py bookworm

infra/smoke.sh bootstraps its Debian base from the first line's mirror and gives the base all
the lines (the release, its updates and its security suite), so that no package registry's
address is written into the repository: the machine's configuration says where they are.
Reads /etc/apt/sources.list and /etc/apt/sources.list.d/ (one-line `.list` and deb822
`.sources` files); disabled entries are skipped.
"""

import sys
from pathlib import Path

APT = Path("/etc/apt")


def entries(apt: Path = APT) -> list[tuple[str, str, list[str]]]:
    """(URI, suite, components) of every enabled `deb` entry."""
    found = []
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in files:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                words = [w for w in words[1:] if not w.startswith("[") and not w.endswith("]")]
                found.append((words[0], words[1], words[2:]))
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    name, value = line.split(":", 1)
                    fields[name.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    found.append((uri, suite, fields.get("components", "main").split()))
    return found


def lines_for(release: str, apt: Path = APT) -> list[str]:
    """sources.list lines of the entries serving the release, the release's own first."""
    serving = [
        (suite != release, f"deb {uri} {suite} {' '.join(components)}")
        for uri, suite, components in entries(apt)
        if suite == release or suite.startswith((f"{release}-", f"{release}/"))
    ]
    return [line for _, line in sorted(serving, key=lambda entry: entry[0])]


def main(release: str) -> int:
    lines = lines_for(release)
    if not lines or lines[0].split()[2] != release:
        print(f"no apt source on this machine serves '{release}' itself", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
