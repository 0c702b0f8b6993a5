#!/usr/bin/env python3
"""A stand-in for the `conda` executable, for tests/test_envs.py only.

No conda channel can be reached from the machines this project is tested on, so conda itself
cannot create an environment there. This script answers the calls Snakemake makes
(`conda info --json`, `conda --version`, `conda config --get channel_priority --json`,
`conda env create --file F --prefix P`, `conda clean`), and `bin/activate` beside it is what Snakemake sources
before each job. It creates an env as conda would, except that packages are not downloaded:

- the interpreter is this Python (the env's `python=X.Y` must match it);
- every declared package, conda or pip, and its dependencies (from their installed metadata) are
  linked into the env's site-packages from the Python that runs this script; nothing else is
  visible in the env, so a rule that imports a package its env does not declare fails;
- conda specs (`setuptools>=68`) must be satisfied by the linked version; a pip pin that differs
  from the linked version is reported on stderr (tests/test_envs.py checks pins separately).

The pip section is read as conda reads it. Snakemake then runs the env's post-deploy script.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent      # <prefix>/bin
PREFIX = HERE.parent


def _fail(msg: str) -> None:
    print(f"fake conda: {msg}", file=sys.stderr)
    sys.exit(1)


def _closure(names: list[str]) -> list[metadata.Distribution]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, out, stack = set(), [], list(names)
    while stack:
        name = canonicalize_name(stack.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            _fail(f"package {name!r} is not installed here, so it cannot be linked into the env")
        out.append(dist)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return out


def create(env_file: Path, prefix: Path) -> None:
    import yaml
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    spec = yaml.safe_load(env_file.read_text())
    if "conda-forge" not in spec.get("channels", []):
        _fail(f"{env_file}: no conda-forge channel")
    conda_deps, pip_lines = [], []
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            pip_lines += dep["pip"]
        else:
            conda_deps.append(dep)
    checks = []
    for dep in conda_deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", dep)
        name, constraint = m.group(1), m.group(2).strip()
        if name == "python":
            want = constraint.lstrip("=")
            have = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
            if not (have == want or have.startswith(want + ".")):
                _fail(f"{env_file}: python={want} asked, this interpreter is {have}")
            continue
        if constraint.startswith("=") and not constraint.startswith("=="):
            constraint = "==" + constraint.lstrip("=") + ".*"
        checks.append((name, SpecifierSet(constraint), True))
    for line in pip_lines:
        if line.startswith("-"):
            _fail(f"{env_file}: pip option line {line!r} is not supported here")
        req = Requirement(line)
        checks.append((req.name, req.specifier, False))

    dists = _closure([name for name, _, _ in checks])
    for name, specifier, strict in checks:
        version = metadata.version(name)
        if version.split("+")[0] not in specifier and version not in specifier:
            if strict:
                _fail(f"{env_file}: {name}{specifier} asked, {version} is installed here")
            print(f"fake conda: note: {name}{specifier} pinned, linking {version}", file=sys.stderr)

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    site = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    linked = 0
    for dist in dists:
        tops = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops):
            src = Path(dist.locate_file(top))
            dst = site / top
            if src.exists() and not dst.exists() and top != "__pycache__":
                dst.symlink_to(src)
                linked += 1
    (prefix / "conda-meta").mkdir(exist_ok=True)
    (prefix / "conda-meta" / "history").write_text(f"# created from {env_file}\n")
    print(f"fake conda: {prefix}: {len(dists)} distributions ({linked} entries) linked", file=sys.stderr)


def main(argv: list[str]) -> None:
    if argv == ["--version"]:
        print("conda 24.11.3")
    elif argv[:2] == ["info", "--json"]:
        print(json.dumps({"conda_prefix": str(PREFIX), "platform": "linux-64", "conda_version": "24.11.3"}))
    elif argv[:3] == ["config", "--get", "channel_priority"]:
        print(json.dumps({"get": {"channel_priority": "strict"}, "rc_path": "", "success": True, "warnings": []}))
    elif argv[:1] == ["clean"]:
        pass  # no package cache to clean
    elif argv[:2] == ["env", "create"]:
        opts = {}
        rest = argv[2:]
        for i, a in enumerate(rest):
            if a in ("--file", "-f", "--prefix", "-p"):
                opts[a.lstrip("-")[0]] = rest[i + 1]
        create(Path(opts["f"]), Path(opts["p"]))
        with open(os.environ.get("FAKE_CONDA_LOG", os.devnull), "a") as log:
            log.write(f"create {opts['f']} {opts['p']}\n")
    else:
        _fail(f"unsupported call: conda {' '.join(argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
