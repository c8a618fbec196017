"""Consumers room: the consumer-group runtime and the long-running processes built on it."""

from .projection import Projection
from .runtime import ConsumerRunner

__all__ = ["ConsumerRunner", "Projection"]
