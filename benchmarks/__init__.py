"""Side-by-side benchmarks of the data path; each prints its ratios and writes a JSON file."""
