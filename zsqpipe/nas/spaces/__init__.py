"""Search spaces. ``nb201``: the NAS-Bench-201 cell space (5 ops x 6 edges, 15,625 cells)."""
