"""What a run leaves under its storage root: storage I/O, checkpoints, result.json, the lease, the overview."""
