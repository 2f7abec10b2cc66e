"""Where the built-in studies and search spaces are: the repository's top-level folders.

autoprune is installed editable (`pip install -e .`, README's commands), so the declarative
files stay plain YAML at the top of the repository, where users read and copy them.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
STUDIES_DIR = REPO_ROOT / "studies"
SPACES_DIR = REPO_ROOT / "search_spaces"


def resolve_yaml(name_or_path: str, folder: Path) -> Path | None:
    """A path as given if it exists, else `<folder>/<name>.yaml`; None if neither exists."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = folder / f"{name_or_path}.yaml"
    return candidate if candidate.exists() else None
