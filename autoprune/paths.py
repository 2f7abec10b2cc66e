"""Where the built-in studies and search spaces are: package data of `autoprune`.

They ship inside the package (`autoprune/studies/*.yaml`, `autoprune/search_spaces/*.yaml`), so a
wheel install has them as an editable one does; in a checkout they are plain YAML files in
those folders, where users read and copy them (`autoprune studies --show NAME` prints one).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _package_dir(name: str) -> Path:
    """A folder of package data as a real path (wheels install unzipped, so it is one)."""
    return Path(str(resources.files("autoprune").joinpath(name)))


STUDIES_DIR = _package_dir("studies")
SPACES_DIR = _package_dir("search_spaces")


def resolve_yaml(name_or_path: str, folder: Path) -> Path | None:
    """A path as given if it exists, else `<folder>/<name>.yaml`; None if neither exists."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = folder / f"{name_or_path}.yaml"
    return candidate if candidate.exists() else None
