"""Tools on top of the library: plots, image metrics, image folders (optional dependencies)."""
