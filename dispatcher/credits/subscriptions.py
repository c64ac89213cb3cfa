"""Plans over time: periods and grants per user, renewal (lazy and eager), upgrade, downgrade,
cancel, and the orders and receipts they make (rules R1, R2, R6 to R10)."""

from __future__ import annotations

import enum
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatcher.credits import plans
from dispatcher.credits.periods import Period, period_at, period_by_id
from dispatcher.credits.quota import THRESHOLDS, GrantRef
from dispatcher.delivery import system_mail
from dispatcher.errors import InvalidInput, NotFound
from dispatcher.models import Grant, GrantReason, Order, OrderKind, SystemEmailKind, User
from dispatcher.ports import Charge, PaymentGateway
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


class Action(enum.StrEnum):
    UPGRADE = "upgrade"
    DOWNGRADE = "downgrade"
    CANCEL = "cancel"


@dataclass(frozen=True)
class OrderView:
    number: str
    kind: str
    plan: str
    amount_cents: int
    credits: int
    recurring_cents: int
    period: str
    created_at: datetime


@dataclass(frozen=True)
class ChangeResult:
    action: str
    plan: str
    pending_plan: str | None
    order: OrderView | None


@dataclass(frozen=True)
class CreditsView:
    user_id: str
    plan: str
    period: str
    period_start: datetime  # in the user's zone
    period_end: datetime  # exclusive, in the user's zone
    total: int
    used: int
    remaining: int
    thresholds_notified: list[int]
    pending_downgrade: str | None


def next_period_id(period_id: str) -> str:
    year, month = (int(p) for p in period_id.split("-"))
    return f"{year + month // 12:04d}-{month % 12 + 1:02d}"


def lock_user(session: Session, user_id: str) -> User:
    """The user row, locked for the rest of the transaction (PostgreSQL: FOR UPDATE; SQLite
    transactions are already serialised by BEGIN IMMEDIATE)."""
    user = session.scalar(
        select(User)
        .where(User.id == user_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if user is None:
        raise NotFound("user", user_id)
    return user


def grant_ref(user: User) -> GrantRef:
    """The Redis reference of the user's current grant."""
    assert user.period is not None
    return GrantRef.of(user.id, period_by_id(user.period, user.timezone), user.grant_seq)


def current_grant(session: Session, user: User) -> Grant:
    grant = session.scalar(
        select(Grant).where(
            Grant.user_id == user.id, Grant.period == user.period, Grant.seq == user.grant_seq
        )
    )
    if grant is None:
        raise NotFound("grant", f"{user.id}:{user.period}:{user.grant_seq}")
    return grant


def roll_forward(
    session: Session, settings: Settings, gateway: PaymentGateway, user: User, now: datetime
) -> list[str]:
    """Start every period from the user's current one up to the one containing ``now``.

    Each new period applies a pending downgrade, charges a paid plan (one renewal order per
    period, ever) and grants the plan's credits. The caller holds the user's lock. Returns the
    ids of receipt emails to enqueue after the commit.
    """
    target = period_at(now, user.timezone)
    if user.period is not None and user.period >= target.id:
        return []
    first = user.period is None
    ids = [target.id] if first else []
    if not first:
        assert user.period is not None
        pid = next_period_id(user.period)
        while pid <= target.id:
            ids.append(pid)
            pid = next_period_id(pid)
    emails: list[str] = []
    for pid in ids:
        period = period_by_id(pid, user.timezone)
        plan = plans.plan(settings, user.pending_plan or user.plan)
        user.plan, user.pending_plan = plan.name, None
        if plan.paid and not first:
            _, email = _charge(session, settings, gateway, user, plan, OrderKind.RENEWAL, pid, now)
            if email:
                emails.append(email)
        _grant(session, user, plan, period, 1, GrantReason.PERIOD_START, now)
        log.info(
            "period started user=%s period=%s plan=%s credits=%d",
            user.id,
            pid,
            plan.name,
            plan.monthly_credits,
        )
    return emails


def _grant(
    session: Session,
    user: User,
    plan: plans.Plan,
    period: Period,
    seq: int,
    reason: GrantReason,
    now: datetime,
) -> Grant:
    grant = Grant(
        user_id=user.id,
        period=period.id,
        seq=seq,
        plan=plan.name,
        total=plan.monthly_credits,
        reason=reason,
        notified=0,
        created_at=now,
    )
    session.add(grant)
    user.period, user.grant_seq, user.period_end = period.id, seq, period.end_utc
    user.updated_at = now
    session.flush()
    return grant


def _charge(
    session: Session,
    settings: Settings,
    gateway: PaymentGateway,
    user: User,
    plan: plans.Plan,
    kind: OrderKind,
    period_id: str,
    now: datetime,
) -> tuple[Order, str | None]:
    """Charge ``plan`` and record the order; returns it and its receipt email's id."""
    number = f"CE-{now:%Y%m%d}-{secrets.token_hex(4).upper()}"
    renewal_key = f"{user.id}:{period_id}" if kind is OrderKind.RENEWAL else None
    charge_id = gateway.charge(
        Charge(
            user_id=user.id,
            amount_cents=plan.price_cents,
            description=f"Command Email {plan.name} plan ({kind.value}, {period_id})",
            reference=renewal_key or number,
        )
    )
    order = Order(
        number=number,
        user_id=user.id,
        kind=kind,
        plan=plan.name,
        amount_cents=plan.price_cents,
        credits=plan.monthly_credits,
        recurring_cents=plan.price_cents,
        period=period_id,
        renewal_key=renewal_key,
        charge_id=charge_id,
        created_at=now,
    )
    session.add(order)
    session.flush()
    log.info(
        "order %s user=%s kind=%s plan=%s amount_cents=%d",
        number,
        user.id,
        kind.value,
        plan.name,
        plan.price_cents,
    )
    email = system_mail.queue_email(
        session,
        settings,
        user,
        SystemEmailKind.RECEIPT,
        "receipt",
        {
            "order": order,
            "plan_label": plan_label(plan),
            "amount": money(order.amount_cents),
            "recurring": money(order.recurring_cents),
            "order_date": now.astimezone(period_at(now, user.timezone).start.tzinfo).strftime(
                "%B %d, %Y"
            ),
        },
        now,
        order_id=order.id,
    )
    return order, (email.id if email else None)


def money(cents: int) -> str:
    return f"${cents // 100:,}.{cents % 100:02d}"


def plan_label(plan: plans.Plan) -> str:
    if not plan.paid:
        return f"free plan ({plan.monthly_credits:,} sends a month)"
    return f"{plan.name} plan ({plan.monthly_credits:,} sends a month)"


def ensure_current(rt: Runtime, user_id: str, known: User | None = None) -> tuple[User, GrantRef]:
    """The user and their current grant, starting new periods first when due (lazy renewal).

    ``known`` is the user as the caller just read it (detached): when its period is current,
    nothing is read again."""
    now = rt.clock.now()
    if known is not None and known.id == user_id:
        user = known
    else:
        with rt.reads() as session:
            found = session.get(User, user_id)
            if found is None:
                raise NotFound("user", user_id)
            session.expunge(found)
        user = found
    if user.period is not None and user.period >= period_at(now, user.timezone).id:
        return user, grant_ref(user)
    with rt.sessions.begin() as session:
        user = lock_user(session, user_id)
        emails = roll_forward(session, rt.settings, rt.gateway, user, now)
        session.flush()
        session.expunge(user)
    system_mail.enqueue_system_emails(rt, emails)
    return user, grant_ref(user)


def renew_due(rt: Runtime, limit: int = 500) -> int:
    """Eager renewal (beat): start the new period of every user whose period has ended."""
    now = rt.clock.now()
    with rt.reads() as session:
        due = session.scalars(
            select(User.id).where(User.period_end <= now).order_by(User.period_end).limit(limit)
        ).all()
    for user_id in due:
        ensure_current(rt, user_id)
    if due:
        log.info("renewal sweep started new periods for %d users", len(due))
    return len(due)


def change(rt: Runtime, user_id: str, action: str, plan_name: str | None = None) -> ChangeResult:
    """Upgrade (now, charged, full new credits), downgrade (at the next period) or cancel
    (free plan now, free credits exactly)."""
    try:
        act = Action(action)
    except ValueError:
        raise InvalidInput("action", "must be upgrade, downgrade or cancel") from None
    if act is not Action.CANCEL and not plan_name:
        raise InvalidInput("plan", f"a plan is required to {act.value}")
    now = rt.clock.now()
    emails: list[str] = []
    order: Order | None = None
    with rt.sessions.begin() as session:
        user = lock_user(session, user_id)
        emails += roll_forward(session, rt.settings, rt.gateway, user, now)
        current = plans.plan(rt.settings, user.plan)
        period = period_by_id(user.period or period_at(now, user.timezone).id, user.timezone)
        if act is Action.CANCEL:
            if not current.paid:
                raise InvalidInput("action", "the user is already on the free plan")
            free = plans.plan(rt.settings, plans.FREE)
            user.plan, user.pending_plan = free.name, None
            _grant(session, user, free, period, user.grant_seq + 1, GrantReason.CANCEL, now)
        else:
            assert plan_name is not None
            new = plans.plan(rt.settings, plan_name)
            if act is Action.UPGRADE:
                if new.monthly_credits <= current.monthly_credits:
                    raise InvalidInput(
                        "plan",
                        f"{new.name!r} is not larger than the current "
                        f"plan {current.name!r}; use downgrade",
                    )
                order, email = _charge(
                    session, rt.settings, rt.gateway, user, new, OrderKind.UPGRADE, period.id, now
                )
                emails += [email] if email else []
                user.plan, user.pending_plan = new.name, None
                _grant(session, user, new, period, user.grant_seq + 1, GrantReason.UPGRADE, now)
            else:
                if new.monthly_credits >= current.monthly_credits:
                    raise InvalidInput(
                        "plan",
                        f"{new.name!r} is not smaller than the current "
                        f"plan {current.name!r}; use upgrade",
                    )
                user.pending_plan = new.name
                user.updated_at = now
        result = ChangeResult(
            action=act.value,
            plan=user.plan,
            pending_plan=user.pending_plan,
            order=_order_view(order) if order else None,
        )
    log.info(
        "subscription %s user=%s plan=%s pending=%s",
        act.value,
        user_id,
        result.plan,
        result.pending_plan,
    )
    system_mail.enqueue_system_emails(rt, emails)
    return result


def _order_view(order: Order) -> OrderView:
    return OrderView(
        number=order.number,
        kind=order.kind.value,
        plan=order.plan,
        amount_cents=order.amount_cents,
        credits=order.credits,
        recurring_cents=order.recurring_cents,
        period=order.period,
        created_at=order.created_at,
    )


def orders(rt: Runtime, user_id: str) -> list[OrderView]:
    with rt.reads() as session:
        rows = session.scalars(
            select(Order).where(Order.user_id == user_id).order_by(Order.id)
        ).all()
        return [_order_view(o) for o in rows]


def order(rt: Runtime, user_id: str, number: str) -> OrderView:
    """One of the user's orders by its number (another user's is not found)."""
    with rt.reads() as session:
        row = session.scalar(select(Order).where(Order.user_id == user_id, Order.number == number))
        if row is None:
            raise NotFound("order", number)
        return _order_view(row)


def credits(rt: Runtime, user_id: str) -> CreditsView:
    """The user's current grant: plan, period in their zone, total, used, remaining."""
    user, ref = ensure_current(rt, user_id)
    used, total = rt.quota.balance(ref)
    with rt.reads() as session:
        grant = current_grant(session, user)
        notified = grant.notified
    period = period_by_id(ref.period, user.timezone)
    return CreditsView(
        user_id=user.id,
        plan=user.plan,
        period=period.id,
        period_start=period.start,
        period_end=period.end,
        total=total,
        used=used,
        remaining=max(total - used, 0),
        thresholds_notified=[t for t in THRESHOLDS if t <= notified],
        pending_downgrade=user.pending_plan,
    )
