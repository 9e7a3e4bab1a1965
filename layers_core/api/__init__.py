"""The notebook door: sweep one prompt, sweep_set a prompt set."""
