"""kubesight.streams."""
