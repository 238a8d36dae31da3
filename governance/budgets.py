"""Daily and monthly budgets of tokens and cost: reserved before generation with the request's
maximum, settled with the real count after (or released when nothing was generated).

A reservation is one statement in the caller's transaction: it locks the budget rows in id
order, writes the reservation and its links, and holds the request in each row that has room.
PostgreSQL re-checks an UPDATE's WHERE clause against the row as the previous writer left it,
so concurrent requests can never together pass a limit; if any budget refuses, the holds taken
are given back in the same transaction (no other transaction saw them: the rows stay locked
until it ends, a refusal's too). Taking the rows in id order keeps two requests from
deadlocking. The holds are the reservation's last statements: each budget row stays locked
from its hold until the caller's transaction commits, and the same user's other
requests wait for it meanwhile. These statements run on every request, so they are plain SQL
(`genai_site.rows`).
"""

import datetime as dt
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

from django.contrib.auth.models import User
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from genai_site.rows import quote, row_insert_sql, row_stored, row_values
from governance.limits import AppliedLimit, Subject, user_limit
from governance.models import ApiKey, BudgetUsage, QuotaReservation, UsageLimit

Measure = Literal["tokens", "cost"]
_PERIOD_NAMES = {"day": "Daily", "month": "Monthly"}
_MICRO = Decimal("0.000001")


def cost_of(
    *, input_tokens: int, output_tokens: int, price_in: Decimal, price_out: Decimal
) -> Decimal:
    """What tokens cost at prices per 1,000 tokens, to a millionth."""
    cost = (Decimal(input_tokens) * price_in + Decimal(output_tokens) * price_out) / 1000
    return cost.quantize(_MICRO, rounding=ROUND_HALF_UP)


def period_start(period: str, now: dt.datetime) -> dt.date:
    today = now.astimezone(dt.UTC).date()
    return today if period == BudgetUsage.Period.DAY else today.replace(day=1)


def period_resets_at(period: str, start: dt.date) -> dt.datetime:
    if period == BudgetUsage.Period.DAY:
        end = start + dt.timedelta(days=1)
    else:
        end = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return dt.datetime.combine(end, dt.time(), tzinfo=dt.UTC)


class BudgetExceeded(Exception):
    def __init__(
        self,
        *,
        subject: Subject,
        period: str,
        measure: Measure,
        limit: int | Decimal,
        remaining: int | Decimal,
        requested: int | Decimal,
        resets_at: dt.datetime,
    ):
        self.subject = subject
        self.period = period
        self.measure = measure
        self.limit = limit
        self.remaining = remaining
        self.requested = requested
        self.resets_at = resets_at
        super().__init__(self.reason)

    @property
    def limit_name(self) -> str:
        return f"{self.subject.kind}.{self.measure}_per_{self.period}"

    @property
    def retry_after(self) -> int:
        return max(1, int((self.resets_at - timezone.now()).total_seconds()) + 1)

    @property
    def reason(self) -> str:
        kind = "token quota" if self.measure == "tokens" else "cost budget"
        whose = "" if self.subject.kind == "user" else f" of {self.subject.label}"
        if self.measure == "tokens":
            left, requested = f"{self.remaining:,} of {self.limit:,} tokens", f"{self.requested:,}"
        else:
            left = f"{money(Decimal(self.remaining))} of {money(Decimal(self.limit))}"
            requested = money(Decimal(self.requested))
        when = "today" if self.period == "day" else "this month"
        if self.period == "day":
            resets = f"at {self.resets_at:%H:%M} UTC"
        else:
            resets = f"on {self.resets_at:%Y-%m-%d} at {self.resets_at:%H:%M} UTC"
        return (
            f"{_PERIOD_NAMES[self.period]} {kind}{whose} reached: {left} left {when}, "
            f"this message needs up to {requested}. The quota resets {resets}."
        )


def _budgets(limit: UsageLimit) -> list[tuple[str, int | None, Decimal | None]]:
    """(period, token limit, cost limit) for each period with any limit set."""
    found = []
    for period, tokens, cost in (
        ("day", limit.tokens_per_day, limit.cost_per_day),
        ("month", limit.tokens_per_month, limit.cost_per_month),
    ):
        if tokens is not None or cost is not None:
            found.append((period, tokens, cost))
    return found


@dataclass(frozen=True)
class _Hold:
    usage_id: int
    subject: Subject
    period: str
    tokens_limit: int | None
    cost_limit: Decimal | None


def _exceeded(hold: _Hold, *, tokens: int, cost: Decimal) -> BudgetExceeded:
    usage = BudgetUsage.objects.get(pk=hold.usage_id)
    resets_at = period_resets_at(hold.period, usage.period_start)
    if hold.tokens_limit is not None:
        left = hold.tokens_limit - usage.tokens_used - usage.tokens_reserved
        # Without a cost limit it was the tokens that refused, even if a settle has given some
        # back since this row was read.
        if left < tokens or hold.cost_limit is None:
            return BudgetExceeded(
                subject=hold.subject,
                period=hold.period,
                measure="tokens",
                limit=hold.tokens_limit,
                remaining=max(0, left),
                requested=tokens,
                resets_at=resets_at,
            )
    assert hold.cost_limit is not None  # a hold is made only for a budget with some limit
    left_cost = hold.cost_limit - usage.cost_used - usage.cost_reserved
    return BudgetExceeded(
        subject=hold.subject,
        period=hold.period,
        measure="cost",
        limit=hold.cost_limit,
        remaining=max(Decimal(0), left_cost),
        requested=cost,
        resets_at=resets_at,
    )


_HOLD_SQL = (
    f"UPDATE {quote(BudgetUsage._meta.db_table)} "
    "SET tokens_reserved = tokens_reserved + %(tokens)s, cost_reserved = cost_reserved + %(cost)s "
    "WHERE id = %(id)s"
)
_ROOM_TOKENS = " AND tokens_used + tokens_reserved + %(tokens)s <= %(tokens_limit)s"
_ROOM_COST = " AND cost_used + cost_reserved + %(cost)s <= %(cost_limit)s"


def _hold_take(hold: _Hold, *, tokens: int, cost: Decimal) -> bool:
    """Add the request to one budget row if it has room (PostgreSQL re-checks the condition
    against the row as the previous writer left it)."""
    sql = _HOLD_SQL
    sql += _ROOM_TOKENS if hold.tokens_limit is not None else ""
    sql += _ROOM_COST if hold.cost_limit is not None else ""
    params: dict[str, Any] = {
        "id": hold.usage_id,
        "tokens": tokens,
        "cost": cost,
        "tokens_limit": hold.tokens_limit,
        "cost_limit": hold.cost_limit,
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount == 1


def budget_reserve(
    *,
    user: User,
    limits: list[AppliedLimit],
    input_tokens: int,
    max_output_tokens: int,
    price_in: Decimal = Decimal(0),
    price_out: Decimal = Decimal(0),
    api_key: ApiKey | None = None,
) -> QuotaReservation:
    """Hold the request's maximum in every budget that applies, or raise BudgetExceeded and
    hold nothing. Never over-admits."""
    tokens = input_tokens + max_output_tokens
    cost = cost_of(
        input_tokens=input_tokens,
        output_tokens=max_output_tokens,
        price_in=price_in,
        price_out=price_out,
    )
    now = timezone.now()
    wanted = [
        _Wanted(applied.subject, period, period_start(period, now), tokens_limit, cost_limit)
        for applied in limits
        for period, tokens_limit, cost_limit in _budgets(applied.limit)
    ]
    reservation = QuotaReservation(
        user=user,
        api_key=api_key,
        tokens=tokens,
        cost=cost,
        price_input_per_1k=price_in,
        price_output_per_1k=price_out,
    )
    # Its own transaction when the caller has none; no savepoint when it has one: a budget
    # that refuses gives back, in this same transaction, what was already written.
    with transaction.atomic(savepoint=False):
        found, held = _reserve_and_hold(reservation, wanted, tokens=tokens, cost=cost)
        if None in found:
            # A period's first request for some budget: its row is created and linked, and
            # every row is held now, in id order.
            _usages_create_and_link(reservation, wanted, found)
            held = set()
        holds = sorted(
            (
                _Hold(usage_id, w.subject, w.period, w.tokens_limit, w.cost_limit)
                for w, usage_id in zip(wanted, found, strict=True)
                if usage_id is not None
            ),
            key=lambda h: h.usage_id,
        )
        # Rows the statement held are skipped. One it found without room is asked again
        # and refuses again (this transaction has it locked), naming the budget that refused.
        refused: _Hold | None = None
        for hold in holds:
            if hold.usage_id in held:
                continue
            if not _hold_take(hold, tokens=tokens, cost=cost):
                refused = hold
                break
            held.add(hold.usage_id)
        if refused is None:
            return row_stored(reservation)
        for usage_id in held:
            _usage_move(usage_id, tokens=-tokens, cost=-cost)
        with connection.cursor() as cursor:
            cursor.execute(_UNRESERVE_SQL, {"id": reservation.pk})
    raise _exceeded(refused, tokens=tokens, cost=cost)


@dataclass(frozen=True)
class _Wanted:
    """A budget the request must fit in, and the period it is counted in."""

    subject: Subject
    period: str
    start: dt.date
    tokens_limit: int | None
    cost_limit: Decimal | None

    def sql(self) -> tuple[str, list[Any]]:
        """The condition that finds its budget row."""
        column = quote(self.subject.kind + "_id")
        return f"({column} = %s AND period = %s AND period_start = %s)", [
            self.subject.pk,
            self.period,
            self.start,
        ]


_USAGES = QuotaReservation.usages.through._meta.db_table
_RESERVATION_INSERT, _RESERVATION_FIELDS = row_insert_sql(QuotaReservation)


def _reserve_and_hold(
    reservation: QuotaReservation, wanted: list[_Wanted], *, tokens: int, cost: Decimal
) -> tuple[list[int | None], set[int]]:
    """One statement: the reservation, linked to every wanted budget row there is, and, when
    every one is there, the hold on each that has room. Returns each wanted budget's row id
    (None where the period has none yet) and the ids of those held.

    The rows are locked first, in id order (as settling and every other reservation take
    them, so that none deadlocks), then each is held only if it has room, which PostgreSQL
    checks against the row as the previous writer left it: concurrent requests can never
    together pass a limit. The hold and the reservation are the last statements of the
    caller's transaction that touch the rows, which stay locked until it ends."""
    values = row_values(reservation, _RESERVATION_FIELDS)
    if not wanted:
        with connection.cursor() as cursor:
            cursor.execute(_RESERVATION_INSERT, values)
            reservation.pk = cursor.fetchone()[0]
        return [], set()
    conditions = [w.sql() for w in wanted]
    which = " ".join(f"WHEN {sql} THEN {i}" for i, (sql, _) in enumerate(conditions))
    room = ", ".join("(%s, %s::bigint, %s::numeric)" for _ in wanted)
    table = quote(BudgetUsage._meta.db_table)
    sql = (
        f"WITH found AS (SELECT id, CASE {which} END AS wanted FROM {table} "
        f"WHERE {' OR '.join(c for c, _ in conditions)} ORDER BY id FOR UPDATE), "
        f"room (wanted, tokens_limit, cost_limit) AS (VALUES {room}), "
        f"held AS (UPDATE {table} SET tokens_reserved = {table}.tokens_reserved + %s, "
        f"cost_reserved = {table}.cost_reserved + %s FROM found JOIN room USING (wanted) "
        f"WHERE {table}.id = found.id AND (SELECT count(*) FROM found) = %s "
        f"AND (room.tokens_limit IS NULL OR tokens_used + {table}.tokens_reserved + %s "
        "<= room.tokens_limit) "
        f"AND (room.cost_limit IS NULL OR cost_used + {table}.cost_reserved + %s "
        "<= room.cost_limit) "
        f"RETURNING {table}.id), "
        f"reservation AS ({_RESERVATION_INSERT}), "
        f"linked AS (INSERT INTO {quote(_USAGES)} (quotareservation_id, budgetusage_id) "
        "SELECT reservation.id, found.id FROM reservation, found) "
        "SELECT reservation.id, found.id, found.wanted, found.id IN (SELECT id FROM held) "
        "FROM reservation LEFT JOIN found ON true"
    )
    params: list[Any] = [p for _, condition in conditions for p in condition] * 2
    for i, w in enumerate(wanted):
        params += [i, w.tokens_limit, w.cost_limit]
    params += [tokens, cost, len(wanted), tokens, cost, *values]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    reservation.pk = rows[0][0]
    found: list[int | None] = [None] * len(wanted)
    held = set()
    for _, usage_id, i, is_held in rows:
        if usage_id is not None:
            found[i] = usage_id
            if is_held:
                held.add(usage_id)
    return found, held


def _usages_create_and_link(
    reservation: QuotaReservation, wanted: list[_Wanted], found: list[int | None]
) -> None:
    """Create the budget rows a period does not have yet, link them to the reservation, and
    fill their ids into `found`."""
    # Created in one order for every request, so that two first requests of a period that create
    # the same rows wait for each other instead of deadlocking.
    order = sorted(
        range(len(wanted)),
        key=lambda i: (wanted[i].subject.kind, wanted[i].subject.pk, wanted[i].period),
    )
    created = []
    for i in order:
        if found[i] is None:
            w = wanted[i]
            lookup: dict[str, Any] = {
                "period": w.period,
                "period_start": w.start,
                **w.subject.usage_filter,
            }
            usage, _ = BudgetUsage.objects.get_or_create(**lookup)
            found[i] = usage.pk
            created.append(usage.pk)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {quote(_USAGES)} (quotareservation_id, budgetusage_id) "
            "SELECT %s, unnest(%s::bigint[])",
            [reservation.pk, created],
        )


# A refused reservation is taken back, links and all, before anyone else could see it.
_UNRESERVE_SQL = (
    f"WITH unlinked AS (DELETE FROM {quote(_USAGES)} WHERE quotareservation_id = %(id)s) "
    f"DELETE FROM {quote(QuotaReservation._meta.db_table)} WHERE id = %(id)s"
)
_MOVE_SQL = (
    f"UPDATE {quote(BudgetUsage._meta.db_table)} SET "
    "tokens_reserved = tokens_reserved + %(reserved)s, tokens_used = tokens_used + %(used)s, "
    "cost_reserved = cost_reserved + %(cost_reserved)s, cost_used = cost_used + %(cost_used)s "
    "WHERE id = %(id)s"
)


def _usage_move(
    usage_id: int,
    *,
    tokens: int,
    cost: Decimal,
    used_tokens: int = 0,
    used_cost: Decimal = Decimal(0),
) -> None:
    """Add `tokens` and `cost` to one budget row's hold (negative to give them back) and the
    used figures to its use."""
    params: dict[str, Any] = {
        "id": usage_id,
        "reserved": tokens,
        "used": used_tokens,
        "cost_reserved": cost,
        "cost_used": used_cost,
    }
    with connection.cursor() as cursor:
        cursor.execute(_MOVE_SQL, params)


# The reservation closes only if it is still held, at its own prices (rounded half up to a
# millionth, as `cost_of` does), and its hold moves into use on every budget row it holds, in
# one statement. The rows are locked in id order, as reserving takes them, so a settle and a
# reservation over the same rows wait for each other instead of deadlocking.
_FINISH_SQL = (
    f"WITH closed AS (UPDATE {quote(QuotaReservation._meta.db_table)} "
    "SET status = %(status)s, settled_tokens = %(tokens)s, settled_cost = ROUND("
    "(%(input)s * price_input_per_1k + %(output)s * price_output_per_1k) * 0.001, 6) "
    "WHERE id = %(id)s AND status = 'held' RETURNING tokens, cost, settled_cost), "
    f"locked AS (SELECT id FROM {quote(BudgetUsage._meta.db_table)} WHERE id IN ("
    f"SELECT budgetusage_id FROM {quote(_USAGES)} WHERE quotareservation_id = %(id)s) "
    "ORDER BY id FOR UPDATE), "
    f"moved AS (UPDATE {quote(BudgetUsage._meta.db_table)} SET "
    "tokens_reserved = tokens_reserved - closed.tokens, tokens_used = tokens_used + %(tokens)s, "
    "cost_reserved = cost_reserved - closed.cost, cost_used = cost_used + closed.settled_cost "
    "FROM closed WHERE id IN (SELECT id FROM locked)) "
    "SELECT settled_cost FROM closed"
)


def _finish(
    reservation_id: int, status: str, input_tokens: int, output_tokens: int
) -> Decimal | None:
    """Close a held reservation and move its hold into use: the tokens counted, at the prices
    it was made with. Returns that cost, or None if it was already closed (or never was).
    The reservation's own `tokens` and `cost` never change."""
    params: dict[str, Any] = {
        "status": status,
        "input": input_tokens,
        "output": output_tokens,
        "tokens": input_tokens + output_tokens,
        "id": reservation_id,
    }
    with connection.cursor() as cursor:
        cursor.execute(_FINISH_SQL, params)
        row = cursor.fetchone()
    return None if row is None else Decimal(row[0])


def budget_settle(*, reservation_id: int, input_tokens: int, output_tokens: int) -> Decimal | None:
    """Count what the answer really used, at the prices of its reservation. Returns its cost,
    or None if the reservation was already settled or released."""
    return _finish(reservation_id, QuotaReservation.Status.SETTLED, input_tokens, output_tokens)


def budget_release(*, reservation_id: int) -> bool:
    """Give a held reservation back unused (the answer never started)."""
    return _finish(reservation_id, QuotaReservation.Status.RELEASED, 0, 0) is not None


_LOCK_RESERVATIONS_SQL = (
    f"SELECT id FROM {quote(QuotaReservation._meta.db_table)} "
    "WHERE id = ANY(%s) AND status = 'held' ORDER BY id FOR UPDATE"
)
_LOCK_USAGES_SQL = (
    f"SELECT id FROM {quote(BudgetUsage._meta.db_table)} WHERE id IN ("
    f"SELECT budgetusage_id FROM {quote(_USAGES)} WHERE quotareservation_id = ANY(%s)) "
    "ORDER BY id FOR UPDATE"
)


def budget_release_all(*, reservation_ids: list[int]) -> int:
    """Give several held reservations back in one transaction; returns how many were held.

    Locks are taken in the order every other writer takes them: the reservations first (a
    settle closes its reservation before it touches the budget rows), then all their budget
    rows together in id order (as reserving takes them). Released one by one, each would lock
    only its own rows, and two reservations' rows in the wrong order could deadlock against a
    reservation taking both."""
    if not reservation_ids:
        return 0
    with transaction.atomic(savepoint=False), connection.cursor() as cursor:
        cursor.execute(_LOCK_RESERVATIONS_SQL, [reservation_ids])
        held = [pk for (pk,) in cursor.fetchall()]
        if not held:
            return 0
        cursor.execute(_LOCK_USAGES_SQL, [held])
        return sum(budget_release(reservation_id=pk) for pk in held)


@dataclass(frozen=True)
class BudgetMeter:
    """One of a user's own budgets, as the chat page shows it."""

    period: str
    measure: Measure
    limit: int | Decimal
    used: int | Decimal
    reserved: int | Decimal
    resets_at: dt.datetime

    @property
    def remaining(self) -> int | Decimal:
        return max(0, self.limit - self.used - self.reserved)

    @property
    def label(self) -> str:
        when = "Today" if self.period == "day" else "This month"
        if self.measure == "tokens":
            return f"{when}: {self.remaining:,} of {self.limit:,} tokens left"
        left, limit = money(Decimal(self.remaining)), money(Decimal(self.limit))
        return f"{when}: {left} of {limit} left to spend"


def money(amount: Decimal) -> str:
    """At least two decimals, and no trailing zeros past them: 1.00, 0.9465, 0.000115."""
    exponent = amount.normalize().as_tuple().exponent
    places = max(2, -exponent) if isinstance(exponent, int) else 2
    return f"{amount:,.{places}f}"


def budget_meters(*, user: User) -> list[BudgetMeter]:
    """The user's own budgets (theirs or the default) with what is left of each now."""
    limit = user_limit(user=user)
    if limit is None:
        return []
    now = timezone.now()
    starts = {period: period_start(period, now) for period in ("day", "month")}
    usages = {
        u.period: u
        for u in BudgetUsage.objects.filter(
            Q(period="day", period_start=starts["day"])
            | Q(period="month", period_start=starts["month"]),
            user=user,
        )
    }
    meters = []
    for period, tokens_limit, cost_limit in _budgets(limit):
        usage = usages.get(period)
        resets_at = period_resets_at(period, starts[period])
        if tokens_limit is not None:
            meters.append(
                BudgetMeter(
                    period,
                    "tokens",
                    tokens_limit,
                    usage.tokens_used if usage else 0,
                    usage.tokens_reserved if usage else 0,
                    resets_at,
                )
            )
        if cost_limit is not None:
            meters.append(
                BudgetMeter(
                    period,
                    "cost",
                    cost_limit,
                    usage.cost_used if usage else Decimal(0),
                    usage.cost_reserved if usage else Decimal(0),
                    resets_at,
                )
            )
    return meters
