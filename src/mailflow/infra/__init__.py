"""Infra room: process plumbing that knows no domain - connections, embedded servers, migrations,
leader election, signals, health, and the one registry of advisory-lock keys."""
