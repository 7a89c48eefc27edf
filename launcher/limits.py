"""Bounds shared by the command line and the recipe, in a module that imports nothing (the command line
checks its arguments before torch is imported)."""

MAX_NODES = 4096      # past the largest Slurm partitions; an elastic run plans every world size up to its MAX
