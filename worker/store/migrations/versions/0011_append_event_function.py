"""PostgreSQL: an append is one round trip (``pushworker_append_event``).

An append used to read (``pushworker_append_state``: the lane's lock, the stream's last seq, the
lane's head, the job's repository, the id) and then insert, two round trips with the lane's lock
held across the recorder's Python in between. This function does both: the recorder sends the
event's canonical form cut where the values only the database knows go (``chain.canonical_parts``:
the id, the previous hash, the job's repository, the seq, the time), and the function puts them
in, hashes (SHA-256, as ``chain.chain_hash`` does), inserts and returns what it filled in. The
recorder recomputes the hash from what came back before its transaction commits, so a function
that hashed differently from ``worker.store.chain`` would fail the append, never store an event that
does not verify. Nothing already stored changes: what is hashed is version 2, unchanged.

The time is the database's clock, read under the lane's lock and never earlier than the lane's
previous event, so that within a lane the time follows the id on one clock for the whole fleet
(the recorder's own way reads the worker's clock under the lock).

It answers nothing (and inserts nothing) where the recorder's own way is needed: a lane with no
event yet (it links to a retention checkpoint or the lanes' root) and a job repository outside
Docker's repository alphabet (its JSON is then the recorder's to write). SQLite: nothing to do.

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

#: Each statement of a PL/pgSQL function takes its own snapshot in READ COMMITTED, so what is
#: read after the lock sees every event committed by the lane's previous holder. Parameters,
#: variables and output columns are prefixed: PL/pgSQL would otherwise take ``lane`` or
#: ``repository`` for a column and a variable at once.
APPEND_EVENT_FUNCTION = """
CREATE FUNCTION pushworker_append_event(
    p_class integer, p_lane integer, p_stream text, p_job_id text, p_type text, p_step text,
    p_registry_id integer, p_attempt integer, p_actor text, p_payload json, p_repository text,
    p_repository_json text, p_outcome text, p_trace_id text, p_part0 text, p_part1 text,
    p_part2 text, p_part3 text, p_part4 text, p_part5 text
) RETURNS TABLE (
    o_id bigint, o_seq integer, o_prev_hash varchar, o_repository varchar, o_time timestamptz,
    o_hash varchar
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_head varchar;
    v_head_time timestamptz;
    v_repository varchar;
    v_repository_json text;
    v_seq integer;
    v_id bigint;
    v_time timestamptz;
    v_hash varchar;
BEGIN
    PERFORM pg_advisory_xact_lock(p_class, p_lane);
    SELECT e.hash, e.time INTO v_head, v_head_time
        FROM events e WHERE e.lane = p_lane ORDER BY e.id DESC LIMIT 1;
    IF v_head IS NULL THEN
        RETURN;
    END IF;
    IF p_repository_json IS NOT NULL THEN
        v_repository := p_repository;
        v_repository_json := p_repository_json;
    ELSE
        SELECT j.repository INTO v_repository FROM push_jobs j WHERE j.id = p_job_id;
        IF v_repository IS NULL THEN
            v_repository_json := 'null';
        ELSIF v_repository ~ '^[a-z0-9._/-]+$' THEN
            v_repository_json := '"' || v_repository || '"';
        ELSE
            RETURN;
        END IF;
    END IF;
    SELECT coalesce(max(e.seq), 0) + 1 INTO v_seq FROM events e WHERE e.stream = p_stream;
    v_id := nextval('events_id_seq');
    -- Read under the lane's lock, and never before the lane's previous event: within a lane
    -- the time follows the id.
    v_time := greatest(clock_timestamp(), v_head_time);
    v_hash := encode(sha256(convert_to(
        p_part0 || v_id || p_part1 || v_head || p_part2 || v_repository_json || p_part3
        || v_seq || p_part4
        || to_char(v_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || p_part5,
        'UTF8')), 'hex');
    INSERT INTO events (
        id, stream, seq, job_id, time, type, step, registry_id, attempt, actor, payload,
        repository, outcome, prev_hash, hash, lane, trace_id
    ) VALUES (
        v_id, p_stream, v_seq, p_job_id, v_time, p_type, p_step, p_registry_id, p_attempt,
        p_actor, p_payload, v_repository, p_outcome, v_head, v_hash, p_lane, p_trace_id
    );
    RETURN QUERY SELECT v_id, v_seq, v_head, v_repository, v_time, v_hash;
END
$$
"""

_SIGNATURE = (
    "integer, integer, text, text, text, text, integer, integer, text, json, text, text, "
    "text, text, text, text, text, text, text, text"
)


def _postgres() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def upgrade() -> None:
    if _postgres():
        op.execute(APPEND_EVENT_FUNCTION)


def downgrade() -> None:
    if _postgres():
        op.execute(f"DROP FUNCTION IF EXISTS pushworker_append_event({_SIGNATURE})")
