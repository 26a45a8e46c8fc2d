"""Data layer: readers (sources), the evalseg pickle codec, the synthetic twin, the slice cache and splits."""
