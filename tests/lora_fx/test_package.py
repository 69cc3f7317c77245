"""The installed package: every module imports from any working directory.

``passes/`` and ``runtime/`` are installed as ``lora_fx.passes`` and ``lora_fx.runtime``. A module that
imports them by their folder names (``from runtime.x import ...``) still works when the current
directory is the checkout (pytest's, the Makefile's) and fails everywhere else, so this test imports
every module in a fresh interpreter whose working directory is elsewhere.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys

import lora_fx


def _module_names() -> list[str]:
    """Every module of the three installed trees (an editable install maps the last two from their
    folders, which walking ``lora_fx`` alone does not see)."""
    names = []
    for package in ("lora_fx", "lora_fx.passes", "lora_fx.runtime"):
        module = importlib.import_module(package)
        names.append(package)
        names += [info.name for info in pkgutil.walk_packages(module.__path__, package + ".")]
    return sorted(set(names))


def test_every_module_imports_outside_the_checkout(tmp_path):
    names = _module_names()
    assert {"lora_fx.runtime.onnx_torch", "lora_fx.passes.onnx.insert_lora", "lora_fx.cli"} <= set(names)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code, *names], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_module_imports_the_source_folders_by_their_own_names():
    """``runtime`` and ``passes`` are not top-level packages; a stray import of them is caught here
    even where the source folder happens to be importable."""
    root = os.path.dirname(os.path.dirname(lora_fx.__file__))
    bad = []
    for folder in ("lora_fx", "passes", "runtime", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        stripped = line.strip()
                        if stripped.startswith(("from runtime", "from passes", "import runtime", "import passes")):
                            bad.append(f"{os.path.relpath(path, root)}:{number}: {stripped}")
    assert not bad, "import lora_fx.runtime / lora_fx.passes instead:\n" + "\n".join(bad)


def test_every_package_folder_is_listed_for_the_wheel():
    """pyproject.toml lists packages by hand (the folders are mapped into lora_fx); a folder missing from
    that list is left out of a regular (non-editable) install."""
    import tomllib

    root = os.path.dirname(os.path.dirname(lora_fx.__file__))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    mapped = {"lora_fx": "lora_fx", "passes": "lora_fx.passes", "runtime": "lora_fx.runtime"}
    found = set()
    for folder, package in mapped.items():
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            if "__init__.py" in files:
                rel = os.path.relpath(dirpath, os.path.join(root, folder))
                found.add(package if rel == "." else package + "." + rel.replace(os.sep, "."))
    assert found == listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}; not folders: {sorted(listed - found)}"
