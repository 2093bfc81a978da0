"""What runs the model: the batcher (admission control, the runner thread) and the inference backends behind one
protocol."""
