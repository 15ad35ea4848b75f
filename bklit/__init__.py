"""bklit: the real-time ingestion server of a privacy-friendly web analytics product."""

__version__ = "0.1.0"
