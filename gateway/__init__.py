"""The gateway: DICOM in, validated series, preprocessing, inference backends, results out."""
