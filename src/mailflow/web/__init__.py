"""Web room: mailflow's HTTP side - one-click unsubscribe links (RFC 8058) and a health check."""
