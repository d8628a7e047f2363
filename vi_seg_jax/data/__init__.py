"""BraTS data: layouts, label conventions, validation, preprocessing, sampling, splits."""
