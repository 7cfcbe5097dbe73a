"""The FUSE shell: the only package that imports pyfuse3 and trio."""
