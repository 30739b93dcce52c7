"""The package version: a leaf, so that the build can record it without importing the package API."""

__version__ = "0.1.0"
