"""Training: the shared loop (train, distill, pu-train), in-memory data, device-side augmentation."""
