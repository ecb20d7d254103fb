"""org.composefs.Repository image methods (composefs images from directories and dumpfiles)."""

from __future__ import annotations


class ImageMethods:
    """Mixin of RepositoryAPI implementing the image-building methods."""
