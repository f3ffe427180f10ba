"""File paths that come from data (training files, questions files) stay under their root."""

from __future__ import annotations

from pathlib import Path


class PathEscapeError(ValueError):
    """A data path that points outside its root (absolute, '..', or a symlink out)."""


def resolve_root(root):
    """A folder, or `easy-vqa:train` / `easy-vqa:test` for the installed dataset's images."""
    if isinstance(root, str) and root.startswith("easy-vqa:"):
        from ..vqa.easy_vqa import image_root

        return image_root(root.split(":", 1)[1])
    return root


def resolve_under_root(root, relative: str) -> Path:
    if root is None:
        raise PathEscapeError(f"image {relative!r} given but no image root (--image-root)")
    root_path = Path(resolve_root(root)).resolve()
    candidate = Path(relative)
    if candidate.is_absolute():
        raise PathEscapeError(f"absolute image path {relative!r} is not allowed; give paths relative to the image root")
    if ".." in candidate.parts:
        raise PathEscapeError(f"image path {relative!r} leaves the image root ('..')")
    resolved = (root_path / candidate).resolve()
    if not resolved.is_relative_to(root_path):
        raise PathEscapeError(f"image path {relative!r} resolves outside the image root (symlink)")
    return resolved
