"""The click front end of trimdb; each command is a thin adapter over one library call."""
