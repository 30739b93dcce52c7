"""The operations on arrays, the front end of the compiled cnpose_trt._C: decode (decoding), crop and
normalise (cropping), the box and camera geometry (geometry), RootNet's k and root mapping (rootnet),
and the interop with device arrays (arrays, _device). Imports spec and errors only."""
