"""Mail room: identity that outbound and inbound share, with no I/O - addresses, Message-IDs,
VERP and unsubscribe tokens, enhanced status codes. Imports nothing but the standard library,
email-validator and mailflow.errors."""
