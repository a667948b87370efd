"""qabox: turn a spare Linux box into a QA environment over SSH."""

__version__ = "0.1.0"
