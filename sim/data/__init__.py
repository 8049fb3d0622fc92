"""The bottom room: images from disk (every supported layout), their augmented views and the
step-addressed feed of batches. Imports nothing else of sim but sim.errors."""
