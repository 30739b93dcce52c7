"""Engines at run time: load_engine reads an engine file and its sidecar and asks the backend
registry for the Engine. Never imports torch or the build."""
