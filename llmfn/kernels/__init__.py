"""Small C kernels for CPU decode (`*.c` here), compiled on first use by `build.load_library`."""
