"""Mail room: identity that outbound and inbound share - addresses, Message-IDs, VERP,
unsubscribe and tracking tokens, link rewriting, enhanced status codes, DNS record checks.
Pure decisions with no I/O of their own; the keys come from the caller (infra.vault)."""
