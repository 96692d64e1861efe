"""The house rules, checked: which package may import which, no competition knowledge in the
generic packages, no private Accelerate attributes, no test doubles in production code."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "dist_train"
# What each package may import from dist_train (besides itself). The data flow runs one way:
# sources -> shard set -> data -> model / task -> trainer, inference -> the commands.
BASE = {"errors", "system", "plugins", "trust"}
ALLOWED = {
    "trust": {"errors", "system"},
    "shardset": BASE,
    "data": BASE | {"shardset"},
    "model": BASE,
    "config": BASE,
    "tasks": BASE | {"shardset", "model", "config", "tasks"},
    "infer": BASE | {"shardset", "data", "model", "tasks"},
    "train": BASE | {"shardset", "data", "model", "tasks", "infer", "config"},
    "perf": BASE | {"shardset", "data", "model", "tasks", "infer", "config", "train"},
}
# Packages that must not know the competition (nor import the task that does).
GENERIC = ("shardset", "data", "model", "infer", "train", "config/sections.py", "config/parse.py", "tasks/base.py",
           "tasks/losses.py", "tasks/__init__.py")
MASK_WORDS = ("gender", "ImageID", "mask-eval", "mask_acc", "age_acc", "person_id", "MultiHead", "mask_tasks",
              'layout == "mask"', "labels as L")


def modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def package_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported(path: Path) -> set[str]:
    """dist_train modules `path` imports, as dotted names below dist_train."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(PKG).with_suffix("").parts
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = list(here[:-1])[: len(here) - node.level] if node.level > 1 else list(here[:-1])
                names = [".".join(["dist_train", *base, *([node.module] if node.module else [])])]
                names += [f"{names[0]}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n[len("dist_train."):] for n in names if n.startswith("dist_train.")}
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_data_flow(package):
    bad = []
    for path in modules():
        if package_of(path) != package:
            continue
        for name in imported(path):
            top = name.split(".")[0]
            if top != package and top not in ALLOWED[package] and top != "__version__":
                bad.append(f"{path.relative_to(PKG)} imports dist_train.{name}")
    assert not bad, "\n".join(bad)


def test_generic_packages_do_not_import_the_mask_task():
    bad = [f"{p.relative_to(PKG)} imports dist_train.{n}" for p in modules() if str(p.relative_to(PKG)).startswith(GENERIC)
           for n in imported(p) if n.startswith("tasks.mask")]
    assert not bad, "\n".join(bad)


def test_generic_packages_know_nothing_of_the_competition():
    bad = []
    for path in modules():
        rel = str(path.relative_to(PKG))
        if not rel.startswith(GENERIC):
            continue
        text = path.read_text()
        bad += [f"{rel}: {word!r}" for word in MASK_WORDS if word in text]
    assert not bad, "\n".join(bad)


def test_the_rule_checks_would_catch_a_violation(tmp_path, monkeypatch):
    """The checks above are not vacuous: a planted import and word are found (in a copy of the
    package's layout, never in the source tree another test may be reading)."""
    planted = tmp_path / "dist_train" / "train" / "_planted_for_test.py"
    planted.parent.mkdir(parents=True)
    planted.write_text('from dist_train.tasks.mask import labels as L\nfrom dist_train.report import draw_report\n'
                       'X = "gender"\n')
    monkeypatch.setattr(sys.modules[__name__], "PKG", planted.parent.parent)
    assert {"tasks.mask.labels", "report.draw_report"} <= imported(planted)
    with pytest.raises(AssertionError, match="imports dist_train.tasks.mask"):
        test_generic_packages_do_not_import_the_mask_task()
    with pytest.raises(AssertionError, match="imports dist_train.report"):
        test_imports_follow_the_data_flow("train")
    with pytest.raises(AssertionError, match="_planted_for_test.py: 'gender'"):
        test_generic_packages_know_nothing_of_the_competition()


def test_no_private_accelerate_attributes_and_no_mocks_in_production_code():
    bad = []
    for path in modules():
        text = path.read_text()
        for marker in ("acc._", "accelerator._", "unittest.mock", "from unittest import mock"):
            if marker in text:
                bad.append(f"{path.relative_to(PKG)}: {marker}")
    assert not bad, "\n".join(bad)


def test_module_and_function_sizes_stay_within_the_aims():
    """Modules under 400 lines, functions under 60: a reader holds each in their head."""
    too_long = []
    for path in modules():
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_long.append(f"{path.relative_to(PKG)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name}: "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "\n".join(too_long)


def test_plugins_are_loaded_by_whoever_needs_the_registries():
    """A fresh process that imports only generic code still finds the mask task's layouts and
    the task of a mask shard set: the registries load the plug-ins themselves."""
    import subprocess
    import sys

    code = ("from dist_train.shardset.sources import layouts; from dist_train.tasks import task_for; "
            "print([l.name for l in layouts()], task_for({'layout': 'mask'}).name, task_for({'layout': 'folder'}).name)")
    p = subprocess.run([sys.executable, "-c", code], cwd=PKG.parent, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["['mask',", "'mask-eval',", "'folder']", "mask", "classify"]
