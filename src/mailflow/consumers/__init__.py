"""Consumers room: the consumer-group runtime and the long-running processes built on it."""

from mailflow.consumers.projection import Projection
from mailflow.consumers.runtime import ConsumerRunner

__all__ = ["ConsumerRunner", "Projection"]
