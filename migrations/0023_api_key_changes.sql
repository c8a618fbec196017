-- API keys (src/mailflow/api/keycache.py): a web process keeps the rows of keys it verified for
-- a few seconds instead of reading them on every request. Revocation must still take effect at
-- once, in every process: whenever a key's row changes in a way that can refuse it (revoked,
-- scopes, networks, expiry, its hash) or goes away, the database itself says so on the channel
-- mailflow_api_keys with the key's id ('*': every key, after a TRUNCATE), delivered at commit.
-- A trigger rather than a call in the projection, so that no path (revocation, erasure, a
-- rebuild, a hand-written UPDATE) can forget it. last_used_at changes send nothing.

CREATE FUNCTION mailflow_api_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        PERFORM pg_notify('mailflow_api_keys', '*');
    ELSE
        PERFORM pg_notify('mailflow_api_keys', OLD.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_changed AFTER UPDATE ON api_keys FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.scopes IS DISTINCT FROM NEW.scopes
          OR OLD.networks IS DISTINCT FROM NEW.networks
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.id IS DISTINCT FROM NEW.id
          OR OLD.tenant IS DISTINCT FROM NEW.tenant)
    EXECUTE FUNCTION mailflow_api_key_changed();
CREATE TRIGGER api_keys_deleted AFTER DELETE ON api_keys FOR EACH ROW
    EXECUTE FUNCTION mailflow_api_key_changed();
CREATE TRIGGER api_keys_truncated AFTER TRUNCATE ON api_keys FOR EACH STATEMENT
    EXECUTE FUNCTION mailflow_api_key_changed();

CREATE TRIGGER api_key_hashes_changed AFTER UPDATE ON api_key_hashes FOR EACH ROW
    WHEN (OLD.hash IS DISTINCT FROM NEW.hash OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION mailflow_api_key_changed();
CREATE TRIGGER api_key_hashes_deleted AFTER DELETE ON api_key_hashes FOR EACH ROW
    EXECUTE FUNCTION mailflow_api_key_changed();
CREATE TRIGGER api_key_hashes_truncated AFTER TRUNCATE ON api_key_hashes FOR EACH STATEMENT
    EXECUTE FUNCTION mailflow_api_key_changed();
