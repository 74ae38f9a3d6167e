"""Batch neural style transfer (Gatys et al.): a plain library; imports neither prefect nor boto3."""

__version__ = "0.1.0"
