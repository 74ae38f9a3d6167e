"""The lock files agree with each other, pin what the design pins, and are what this environment was installed from."""

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.utils import canonicalize_name

from nst_testing.paths import REPO

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\]+)")


def pins(name: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Package -> (version, sha256 hashes) of one lock file."""
    found: dict[str, tuple[str, frozenset[str]]] = {}
    package = None
    hashes: set[str] = set()
    for line in (REPO / name).read_text().splitlines():
        if match := PIN.match(line):
            if package:
                found[package] = (found[package][0], frozenset(hashes))
            package, hashes = canonicalize_name(match[1]), set()
            found[package] = (match[2], frozenset())
        elif package and (hashed := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            hashes.add(hashed[1])
    if package:
        found[package] = (found[package][0], frozenset(hashes))
    return found


def test_every_pin_has_a_hash_and_the_runtime_lock_is_a_subset_of_the_dev_lock() -> None:
    dev, runtime, installer = pins("requirements-dev.txt"), pins("requirements.txt"), pins("requirements-pip.txt")
    assert len(dev) > 100 and len(runtime) > 80
    for lock in (dev, runtime, installer):
        assert all(hashes for _, hashes in lock.values()), [p for p, (_, h) in lock.items() if not h]
    assert {p: v for p, (v, _) in runtime.items() if dev[p][0] != v} == {}
    assert installer == {"pip": dev["pip"]}


def test_the_lock_pins_the_versions_the_design_requires() -> None:
    for lock in (pins("requirements-dev.txt"), pins("requirements.txt")):
        assert lock["torch"][0] == "2.14.1" and lock["torchvision"][0] == "0.29.1"
        assert tuple(int(n) for n in lock["fastapi"][0].split(".")[:2]) < (0, 151)
        assert tuple(int(n) for n in lock["prefect"][0].split(".")[:2]) < (3, 9)


def test_this_environment_is_the_lock() -> None:
    """`make install` put exactly the locked versions here (nothing installed by hand, nothing newer)."""
    wrong = {}
    for package, (locked, _) in pins("requirements-dev.txt").items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            installed = None
        if installed != locked:
            wrong[package] = (locked, installed)
    assert wrong == {}


def test_pip_from_the_lock_is_installed_before_the_rest() -> None:
    for name, lock in (("Makefile", "requirements-dev.txt"), ("Dockerfile", "requirements.txt")):
        installs = re.findall(r"--require-hashes -r (\S+)", (REPO / name).read_text())
        assert [Path(path).name for path in installs] == ["requirements-pip.txt", lock], name
