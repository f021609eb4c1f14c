"""Turn an image dataset into a searchable feature cache (see dashboard/cache_format.py for the layout)."""

__version__ = "0.1.0"
