"""sera-ray: SeRA (Self-Reviewing and Alignment of LLMs using Implicit Reward Margins) on Ray."""

__version__ = "0.1.0"
