"""kubesight.probe."""
