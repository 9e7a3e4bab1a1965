"""Models: sources, loading, the memory footprint, the loaded LensModel."""
