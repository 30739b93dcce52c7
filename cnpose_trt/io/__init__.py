"""Images in and out: loading and checking image files (preprocess, imageio_guard), the crops a
network takes (preprocess), synthetic people with ground truth (synthetic), drawing (draw), video
files (video). Imports spec, errors and ops."""
