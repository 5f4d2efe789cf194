"""Dataset factory for conversational image customization (CAFE) training data."""

__version__ = "0.1.0"
