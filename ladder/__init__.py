"""The ladder model: pure PyTorch, no Ray."""
