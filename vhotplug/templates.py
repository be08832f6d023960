"""Skeleton XML documents from ``xml_templates/``, parsed with lxml.

Templates are valid XML with no placeholders; callers fill them through
XPath/element APIs. Installed, they live inside the package
(``vhotplug/xml_templates``, see pyproject.toml); in a source checkout they
are at the repository's top level.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from lxml import etree

from vhotplug import errors

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def template_dir() -> Path:
    """Where the templates are: inside the installed package, else the source tree."""
    packaged = Path(str(resources.files("vhotplug"))) / "xml_templates"
    if packaged.is_dir():
        return packaged
    source = Path(__file__).resolve().parent.parent / "xml_templates"
    if source.is_dir():
        return source
    raise errors.VhotplugError(f"XML templates not found (looked in {packaged} and {source}); reinstall vhotplug")


def load(name: str) -> etree._Element:
    """Parse template ``name`` (without ``.xml``) and return a fresh root element."""
    if not _NAME.match(name):
        raise ValueError(f"bad template name {name!r}")
    path = template_dir() / f"{name}.xml"
    if not path.is_file():
        raise errors.VhotplugError(f"XML template {name!r} missing from {path.parent}; reinstall vhotplug")
    parser = etree.XMLParser(remove_blank_text=True, remove_comments=True, resolve_entities=False, no_network=True)
    return etree.parse(str(path), parser).getroot()


def tostring(root: etree._Element) -> str:
    """Serialize as libvirt and humans like it: indented, no XML declaration."""
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode") + "\n"
