"""uv.lock installs on the machines edgeloop runs on (docs/architecture.md, "Reproducible
installs").

`uv lock` resolves for every environment in `[tool.uv] environments`, but it accepts a
package that has only an sdist: on a Pi that means compiling it, with a toolchain the Pi
does not have. These tests read the lock itself (no network) and check, for a target
machine, that every package an extra installs there has a wheel the machine can use.
"""

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import Marker
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]

# A Raspberry Pi 5 on Raspberry Pi OS Bookworm: CPython 3.11, glibc 2.36, aarch64.
PI5 = {"machine": "aarch64", "python": (3, 11, 2), "glibc": 36}
# A cloud node or CI runner: CPython 3.11 on x86_64 with a glibc of the same age.
CLOUD = {"machine": "x86_64", "python": (3, 11, 2), "glibc": 36}


def _environment(target: dict[str, Any]) -> dict[str, str]:
    major, minor, micro = target["python"]
    return {
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": target["machine"],
        "python_version": f"{major}.{minor}",
        "python_full_version": f"{major}.{minor}.{micro}",
        "extra": "",
    }


def _tags(target: dict[str, Any]) -> set[Tag]:
    machine, glibc = target["machine"], target["glibc"]
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(glibc, 4, -1)]
    platforms += [f"manylinux2014_{machine}", f"manylinux2010_{machine}"]
    platforms += [f"manylinux1_{machine}", f"linux_{machine}"]
    version = target["python"][:2]
    interpreter = f"cp{version[0]}{version[1]}"
    tags = set(cpython_tags(version, [interpreter, "abi3", "none"], platforms))
    return tags | set(compatible_tags(version, interpreter, platforms))


class _Lock:
    """The packages of uv.lock, looked up the way its dependency entries name them."""

    def __init__(self, path: Path) -> None:
        self.packages: list[dict[str, Any]] = tomllib.loads(path.read_text())["package"]

    def find(self, dep: dict[str, Any]) -> dict[str, Any]:
        """The package a dependency entry points at (by version where the lock forks)."""
        found = [
            p
            for p in self.packages
            if p["name"] == dep["name"] and dep.get("version", p["version"]) == p["version"]
        ]
        assert len(found) == 1, f"uv.lock: {dep} matches {len(found)} packages"
        return found[0]

    def closure(self, extra: str, env: dict[str, str]) -> Iterator[dict[str, Any]]:
        """Every package `pip install edgeloop[extra]` gets on a machine with `env`."""
        root = self.find({"name": "edgeloop"})
        todo = [*root["dependencies"], *root["optional-dependencies"][extra]]
        seen: set[tuple[str, str]] = set()
        while todo:
            dep = todo.pop()
            if "marker" in dep and not Marker(dep["marker"]).evaluate(env):
                continue
            package = self.find(dep)
            for sub_extra in dep.get("extra", []):
                todo += package.get("optional-dependencies", {}).get(sub_extra, [])
            key = (package["name"], package["version"])
            if key in seen:
                continue
            seen.add(key)
            if package["name"] != "edgeloop":
                yield package
            todo += package.get("dependencies", [])


def _has_wheel(package: dict[str, Any], tags: set[Tag]) -> bool:
    for wheel in package.get("wheels", []):
        _, _, _, wheel_tags = parse_wheel_filename(wheel["url"].rsplit("/", 1)[1])
        if wheel_tags & tags:
            return True
    return False


@pytest.mark.parametrize(
    ("extra", "target"),
    [("edge", PI5), ("all", CLOUD)],
    ids=["edge-on-pi5", "all-on-x86_64"],
)
def test_every_locked_package_has_a_wheel_for_the_target(
    extra: str, target: dict[str, Any]
) -> None:
    lock = _Lock(ROOT / "uv.lock")
    tags = _tags(target)
    packages = list(lock.closure(extra, _environment(target)))
    names = {canonicalize_name(p["name"]) for p in packages}
    # The closure walk itself works: the extra's own packages are in it.
    expected = {"edge": {"onnxruntime", "aiomqtt", "numpy"}, "all": {"torch", "faust-streaming"}}
    assert expected[extra] <= names
    if extra == "edge":
        assert not names & {"torch", "faust-streaming", "aiokafka"}, "a Pi installs edge only"
    missing = sorted(f"{p['name']}=={p['version']}" for p in packages if not _has_wheel(p, tags))
    assert not missing, (
        f"edgeloop[{extra}] on {target['machine']} needs to build these from source: "
        f"{missing}; pin a release with wheels (uv lock --upgrade-package NAME==VERSION)"
    )
