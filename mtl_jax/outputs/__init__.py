"""What a run leaves for people: metrics records, report, plots, the export, run comparisons."""
