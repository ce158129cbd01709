"""The commands a user runs beside training: `fgvr data`, `fgvr table` (from run dirs or W&B),
`fgvr viz`, `fgvr eval`, and the summary at the end of a sweep."""
