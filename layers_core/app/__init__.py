"""The shell door: flags, the runner, the launcher, threads."""
