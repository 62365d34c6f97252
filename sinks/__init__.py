"""kubesight.sinks."""
