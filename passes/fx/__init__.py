"""Passes on ``torch.fx`` GraphModules captured with ``torch.export``."""
