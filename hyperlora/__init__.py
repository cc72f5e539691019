"""HyperLoRA: continual learning with hypernetwork-generated LoRA (package initialised in the core commit)."""
