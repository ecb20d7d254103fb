"""Composefs EROFS images: writer (V0/V1/V2), reader/validation and C-style dump."""

from cfsd.core.erofs.format import ErofsError
from cfsd.core.erofs.reader import Image, collect_objects, erofs_to_filesystem
from cfsd.core.erofs.writer import (
    select_c_version,
    validate_filesystem,
    write_image,
    write_image_to,
)

__all__ = [
    "ErofsError", "Image", "collect_objects", "erofs_to_filesystem", "select_c_version",
    "validate_filesystem", "write_image", "write_image_to",
]
