"""What a run leaves under its storage root: the layout (every name and rule), storage I/O,
checkpoints, result.json, the lease, the overview."""
