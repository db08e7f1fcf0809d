"""Data: records, templates, images, volumes, datasets and collators."""
