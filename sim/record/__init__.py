"""What a run writes and measures about itself: the log format and its writer, summary.json, peak
memory and progress bars. Imports only data below it (and nothing heavy: analysis reads these formats)."""
