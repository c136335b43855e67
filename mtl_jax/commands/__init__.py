"""The command-line programs: scripts/*.py and the mtl-* console scripts run these."""
