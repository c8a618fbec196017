-- A message sent again after its 250 was lost (the server was killed between the commit and
-- the reply) is the same bytes: it is recognised by (tenant, sha256) and not recorded twice.
CREATE INDEX inbound_messages_sha256 ON inbound_messages (tenant, sha256);
