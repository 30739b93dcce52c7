"""The ConvNeXtPose network in PyTorch (model) and its checkpoints (checkpoint): the build exports
it and the torch backend runs it. Needs torch; nothing below imports this room."""
