"""kubesight.schemas."""
