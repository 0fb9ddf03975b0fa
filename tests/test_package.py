"""Packaging: cheap import, valid manifest, every contribution resolves to real code."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


def test_import_is_light():
    """napari reads the manifest at start-up: importing the package must not pull torch or Qt."""
    code = (
        "import sys, napari_mobilesam\n"
        "heavy = [m for m in ('torch', 'napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6',"
        " 'magicgui', 'openvino', 'segment_anything', 'timm') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing napari_mobilesam imported: {out.stdout.strip()}"


def test_lazy_public_names_resolve():
    import napari_mobilesam

    for name in napari_mobilesam.__all__:
        assert getattr(napari_mobilesam, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute"):
        napari_mobilesam.does_not_exist  # noqa: B018


def test_npe2_validate_cli():
    out = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-mobilesam"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


@pytest.fixture(scope="module")
def manifest():
    from npe2 import PluginManifest

    return PluginManifest.from_distribution("napari-mobilesam")


def test_manifest_metadata(manifest):
    assert manifest.name == "napari-mobilesam"
    assert manifest.display_name
    assert manifest.contributions.sample_data, "the plugin must contribute sample data"


def test_every_command_resolves_to_a_callable(manifest):
    for cmd in manifest.contributions.commands or []:
        assert cmd.id.startswith("napari-mobilesam."), cmd.id
        assert cmd.python_name, f"{cmd.id} has no python_name"
        module, _, attr = cmd.python_name.partition(":")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        assert callable(obj), f"{cmd.python_name} is not callable"


def test_contributions_point_at_declared_commands(manifest):
    """npe2 does not check dangling command ids in widgets, samples and menus: we do."""
    declared = {c.id for c in manifest.contributions.commands or []}
    referenced = [s.command for s in manifest.contributions.sample_data or []]
    referenced += [w.command for w in manifest.contributions.widgets or []]
    for items in (manifest.contributions.menus or {}).values():
        referenced += [getattr(i, "command", None) for i in items if getattr(i, "command", None)]
    dangling = sorted(set(referenced) - declared)
    assert not dangling, f"contributions reference undeclared commands: {dangling}"


def test_menu_ids_are_napari_menus(manifest):
    from napari._app_model.constants import MenuId

    known = {m.value for m in MenuId.contributables()}
    for menu_id in manifest.contributions.menus or {}:
        assert menu_id in known, f"{menu_id!r} is not a menu napari lets plugins contribute to"
