from django.db import migrations

# Takes the chain's lock (held to the end of the transaction) and returns the newest event's
# hash. Each statement of a VOLATILE function takes a fresh snapshot under READ COMMITTED, so
# the read after the lock sees the event of the transaction that held it before.
CHAIN_HEAD_SQL = """
CREATE FUNCTION governance_audit_chain_head(lock_key bigint) RETURNS varchar
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    RETURN COALESCE(
        (SELECT hash FROM governance_auditevent ORDER BY id DESC LIMIT 1), repeat('0', 64)
    );
END;
$$;
"""

DROP_CHAIN_HEAD_SQL = "DROP FUNCTION IF EXISTS governance_audit_chain_head(bigint);"


class Migration(migrations.Migration):
    dependencies = [("governance", "0008_api_key_allowed_models")]

    operations = [migrations.RunSQL(CHAIN_HEAD_SQL, DROP_CHAIN_HEAD_SQL)]
