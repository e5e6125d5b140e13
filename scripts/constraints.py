"""Print constraints.txt: the exact versions installed in this environment of vpsrelay's
runtime dependencies and theirs (the test tools left out), one `name==version` a line.

    .venv/bin/python scripts/constraints.py > constraints.txt

Run it in a virtualenv where vpsrelay is installed (`pip install -e .`, as scripts/test
does), after upgrading what you mean to upgrade; then run the tests and commit the file.
`scripts/serve`, `scripts/test` and the Dockerfile install with `-c constraints.txt`.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement

HEADER = """\
# The exact runtime set vpsrelay is tested with (its dependencies and theirs, no test tools).
# Installs use it: pip install -c constraints.txt -e .   (scripts/serve, scripts/test, Dockerfile)
# Regenerate, in a venv with vpsrelay installed:
#   .venv/bin/python scripts/constraints.py > constraints.txt
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str) -> dict[str, str]:
    """{canonical name: installed version} of everything `root` needs at run time."""
    found: dict[str, str] = {}
    pending: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        if (canonical(name), extras) in seen:
            continue
        seen.add((canonical(name), extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            sys.exit(f"constraints.py: {name} is required but not installed here")
        if canonical(name) != canonical(root):
            found[canonical(name)] = dist.version
        for line in dist.requires or ():
            requirement = Requirement(line)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if requirement.marker is None or any(
                requirement.marker.evaluate(environment) for environment in environments
            ):
                pending.append((requirement.name, frozenset(requirement.extras)))
    return found


def main() -> None:
    pins = closure("vpsrelay")
    sys.stdout.write(HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins)))


if __name__ == "__main__":
    main()
