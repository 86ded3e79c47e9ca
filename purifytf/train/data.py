"""The training recipes' data sources: :mod:`purifytf.data` (shared with evaluation), under their old path."""

from ..data import (
    NO_LABEL,
    ArrayData,
    ImageFolderData,
    load_array,
    open_data,
    read_idx,
    to_images,
    torchvision_dataset,
)

__all__ = ["ArrayData", "ImageFolderData", "NO_LABEL", "load_array", "open_data", "read_idx", "to_images",
           "torchvision_dataset"]
