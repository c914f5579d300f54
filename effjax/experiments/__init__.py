"""Studies, sweeps and scaling-law tools."""
