import importlib

from django.db import migrations, models

CHAIN_HEAD_SQL = importlib.import_module(
    "governance.migrations.0009_audit_chain_head_function"
).CHAIN_HEAD_SQL

# An event is written unlinked (no prev_hash, hash or chain_position; its hashed text in
# hash_input) and linked into the chain by a constraint trigger deferred to its transaction's
# commit. The chain's lock is then held from that moment to the end of the commit, inside the
# server, instead of from the event's INSERT through every later statement of its transaction
# and the client's COMMIT: with 8 web processes and 8 workers serving 50 clients, the
# transactions waiting for that lock had been 24 backends on average.
#
# The chain's order is chain_position (the order of the commits), no longer the ids (the order of
# the INSERTs). Under READ COMMITTED each statement of a VOLATILE function takes a fresh
# snapshot, so the head read after the lock is the event that the lock's previous holder linked.
LINK_SQL = """
CREATE FUNCTION governance_audit_link() RETURNS trigger
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    head_hash varchar;
    head_position bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(418581342580);  -- governance.audit.AUDIT_CHAIN_LOCK
    SELECT hash, chain_position INTO head_hash, head_position
    FROM governance_auditevent WHERE chain_position IS NOT NULL
    ORDER BY chain_position DESC LIMIT 1;
    head_hash := COALESCE(head_hash, repeat('0', 64));
    UPDATE governance_auditevent SET
        prev_hash = head_hash,
        hash = encode(sha256(convert_to(
            split_part(NEW.hash_input, E'\\x1f', 1) || head_hash
            || split_part(NEW.hash_input, E'\\x1f', 2), 'UTF8')), 'hex'),
        chain_position = COALESCE(head_position, 0) + 1,
        hash_input = NULL
    WHERE id = NEW.id AND chain_position IS NULL;
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER governance_audit_link
    AFTER INSERT ON governance_auditevent
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION governance_audit_link();

-- The one UPDATE allowed: that link, which sets prev_hash, hash and chain_position once and
-- changes nothing else.
CREATE OR REPLACE FUNCTION governance_auditevent_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.chain_position IS NULL AND OLD.hash IS NULL
        AND NEW.chain_position IS NOT NULL AND NEW.hash IS NOT NULL AND NEW.hash_input IS NULL
        AND (NEW.id, NEW.actor_id, NEW.actor_label, NEW.action, NEW.target_type,
             NEW.target_id, NEW.details, NEW.ip, NEW.created_at)
        IS NOT DISTINCT FROM (OLD.id, OLD.actor_id, OLD.actor_label, OLD.action,
             OLD.target_type, OLD.target_id, OLD.details, OLD.ip, OLD.created_at) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit events are append-only (% of event % refused)', TG_OP, OLD.id;
END;
$$;

DROP FUNCTION IF EXISTS governance_audit_chain_head(bigint);
"""

UNLINK_SQL = (
    """
DROP TRIGGER IF EXISTS governance_audit_link ON governance_auditevent;
DROP FUNCTION IF EXISTS governance_audit_link();

CREATE OR REPLACE FUNCTION governance_auditevent_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only (% of event % refused)', TG_OP, OLD.id;
END;
$$;
"""
    + CHAIN_HEAD_SQL
)

# The events chained so far keep their order: their ids.
POSITIONS_SQL = """
ALTER TABLE governance_auditevent DISABLE TRIGGER governance_auditevent_append_only;
UPDATE governance_auditevent SET chain_position = id;
ALTER TABLE governance_auditevent ENABLE TRIGGER governance_auditevent_append_only;
"""


class Migration(migrations.Migration):
    dependencies = [("governance", "0009_audit_chain_head_function")]

    operations = [
        migrations.AddField(
            model_name="auditevent",
            name="chain_position",
            field=models.BigIntegerField(editable=False, null=True, unique=True),
        ),
        migrations.AddField(
            model_name="auditevent",
            name="hash_input",
            field=models.TextField(editable=False, null=True),
        ),
        migrations.AlterField(
            model_name="auditevent",
            name="hash",
            field=models.CharField(editable=False, max_length=64, null=True),
        ),
        migrations.AlterField(
            model_name="auditevent",
            name="prev_hash",
            field=models.CharField(editable=False, max_length=64, null=True),
        ),
        migrations.RunSQL(POSITIONS_SQL, migrations.RunSQL.noop),
        migrations.RunSQL(LINK_SQL, UNLINK_SQL),
    ]
