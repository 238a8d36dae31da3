from django.db import migrations, models
from django.db.models import Q

# Waiting for its commit: no link, its hashed text kept; linked: the reverse.
UNLINKED = Q(
    chain_position__isnull=True, prev_hash__isnull=True, hash__isnull=True, hash_input__isnull=False
)
LINKED = Q(
    chain_position__isnull=False,
    prev_hash__isnull=False,
    hash__isnull=False,
    hash_input__isnull=True,
)

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
    IF NEW.chain_position IS NOT NULL OR NEW.hash_input IS NULL THEN
        RAISE EXCEPTION 'audit event % was not written unlinked (governance.audit.audit_record)',
            NEW.id;
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'audit events are linked under READ COMMITTED only, not %',
            current_setting('transaction_isolation');
    END IF;
    PERFORM pg_advisory_xact_lock(418581342580);  -- the chain's lock: "audit" in ASCII
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
    WHERE id = NEW.id;
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER governance_audit_link
    AFTER INSERT ON governance_auditevent
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION governance_audit_link();

-- The one UPDATE allowed: that link, made from within the link trigger (an UPDATE that a
-- session sends itself runs this trigger at depth 1), which sets prev_hash, hash (the hash of
-- the event's text with that prev_hash) and chain_position once and changes nothing else.
CREATE OR REPLACE FUNCTION governance_auditevent_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND pg_trigger_depth() > 1
        AND OLD.chain_position IS NULL AND NEW.chain_position IS NOT NULL
        AND NEW.hash_input IS NULL
        AND NEW.hash = encode(sha256(convert_to(
            split_part(OLD.hash_input, E'\\x1f', 1) || NEW.prev_hash
            || split_part(OLD.hash_input, E'\\x1f', 2), 'UTF8')), 'hex')
        AND (NEW.id, NEW.actor_id, NEW.actor_label, NEW.action, NEW.target_type,
             NEW.target_id, NEW.details::text, NEW.ip, NEW.created_at)
        IS NOT DISTINCT FROM (OLD.id, OLD.actor_id, OLD.actor_label, OLD.action,
             OLD.target_type, OLD.target_id, OLD.details::text, OLD.ip, OLD.created_at) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit events are append-only (% of event % refused)', TG_OP, OLD.id;
END;
$$;

DROP FUNCTION IF EXISTS governance_audit_chain_head(bigint);
"""

# The events chained so far keep their order: their ids (each was given its id after it had
# taken the chain's lock).
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
        migrations.RunSQL(POSITIONS_SQL),
        migrations.AddConstraint(
            model_name="auditevent",
            constraint=models.CheckConstraint(
                condition=UNLINKED | LINKED, name="audit_event_linked_or_waiting"
            ),
        ),
        # Not reversible: events linked in commit order no longer follow their ids, which the
        # appends before this migration relied on.
        migrations.RunSQL(LINK_SQL),
    ]
