"""API room: the HTTP gateway under /api/v1 - authentication, problem+json, request ids,
idempotency, and one router per service (campaign service, infra service). Handlers call the
same domain functions as the CLI, so the two cannot disagree. See docs/api.md."""
