"""Builds the compiled extension cnpose_trt._C from csrc/ (metadata lives in pyproject.toml)."""

from setuptools import setup

setup()
