-- Sending domains (src/mailflow/outbound/domains.py): the domains a tenant sends from, the DKIM
-- key mailflow generated for each, and what the last DNS check found of the records to publish
-- (SPF, DKIM, DMARC, the return path's MX).
--
-- sending_domains is the `sending_domains` inline projection of SendingDomainAdded,
-- SendingDomainChecked and SendingDomainRemoved. The DKIM private key is in the vault (the
-- secrets table, owner `sending-domain:<domain>`); this row holds its id, the public key (public
-- by nature: it is what DNS publishes) and its fingerprint. One tenant sends from a domain.

CREATE TABLE sending_domains (
    tenant           text NOT NULL,
    domain           text NOT NULL,            -- lower case, IDNA A-labels (xn--...), no final dot
    dkim_selector    text NOT NULL,
    dkim_secret      uuid NOT NULL,            -- the DKIM private key, in the vault (secrets table)
    dkim_public_key  text NOT NULL,            -- base64 SubjectPublicKeyInfo, as in the DKIM record's p=
    dkim_fingerprint text NOT NULL,            -- vault.dkim_fingerprint of the public key
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'verified', 'failing')),
    last_check       jsonb,                    -- the last check's verdict per record (RecordCheck.to_dict())
    last_checked_at  timestamptz,
    created_at       timestamptz NOT NULL,
    PRIMARY KEY (tenant, domain)
);
CREATE UNIQUE INDEX sending_domains_domain ON sending_domains (domain);
CREATE INDEX sending_domains_due ON sending_domains (last_checked_at NULLS FIRST);

ALTER TABLE sending_domains ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON sending_domains USING (tenant = current_setting('mailflow.tenant', true))
    WITH CHECK (tenant = current_setting('mailflow.tenant', true));
