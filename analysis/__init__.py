"""laminar: what is learned from a run afterwards. Reads the files runs write; imports nothing from sim."""
