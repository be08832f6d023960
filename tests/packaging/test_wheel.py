"""The built wheel carries xml_templates/ and an installed vhotplug reads them."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from tests.conftest import REPO
from vhotplug.lab import nested, xen


def test_wheel_ships_templates_and_they_are_used(tmp_path: Path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("vhotplug-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("vhotplug/xml_templates/")}
    expected = {p.name for p in (REPO / "xml_templates").glob("*.xml")}
    assert expected and shipped == expected
    # The boot files of the lab's hypervisor guests (the nested lab's L1, the Xen lab's dom0) are data files.
    boot = {n.removeprefix("vhotplug/lab/") for n in names if n.startswith("vhotplug/lab/")}
    assert set(nested.BOOT_FILES) | set(xen.BOOT_FILES) <= boot

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = env_dir / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", str(wheel)], check=True, capture_output=True, timeout=900)
    # Run from an empty directory so nothing in the source tree can be picked up.
    work = tmp_path / "elsewhere"
    work.mkdir()
    done = subprocess.run([str(env_dir / "bin" / "vhotplug"), "lab", "up", "--name", "vhl-wheel", "--print-xml"],
                          cwd=work, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "VHOTPLUG_LAB_DIR": str(tmp_path / "lab")})
    assert done.returncode == 0, done.stderr
    assert "<name>vhl-wheel</name>" in done.stdout and "pcie-root-port" in done.stdout
    located = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                              "from vhotplug.templates import template_dir; print(template_dir())"],
                             cwd=work, capture_output=True, text=True, check=True)
    assert str(env_dir) in located.stdout
