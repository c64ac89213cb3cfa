"""Agents: create, update and look up the users who own credits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dispatcher import validation
from dispatcher.credits import plans
from dispatcher.credits.periods import period_by_id, zone
from dispatcher.credits.subscriptions import roll_forward
from dispatcher.errors import InvalidInput, NotFound
from dispatcher.models import User
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

_UNSET: Any = object()


@dataclass(frozen=True)
class UserView:
    """A user as producers see it: never the MailChimp key."""

    id: str
    platform_email: str | None
    communications_email: str | None
    timezone: str
    plan: str
    mailchimp_connected: bool
    mailchimp_list_id: str | None
    postal_address: str | None = None


def upsert_user(
    rt: Runtime,
    user_id: str,
    *,
    platform_email: str | None = _UNSET,
    communications_email: str | None = _UNSET,
    timezone: str = _UNSET,
    plan: str = _UNSET,
    mailchimp_api_key: str | None = _UNSET,
    mailchimp_list_id: str | None = _UNSET,
    postal_address: str | None = _UNSET,
) -> tuple[UserView, bool]:
    """Create or update an agent; returns the user and whether it was created.

    Fields left out keep their value. ``plan`` is accepted only on creation: changing it is a
    subscription change. ``postal_address`` is shown in the footer of the agent's mail; a
    Command Email campaign needs one (None removes it).
    """
    changes = _checked_changes(
        user_id,
        platform_email=platform_email,
        communications_email=communications_email,
        timezone=timezone,
        plan=plan,
        mailchimp_api_key=mailchimp_api_key,
        mailchimp_list_id=mailchimp_list_id,
        postal_address=postal_address,
    )
    if changes.get("mailchimp_api_key") is not None:
        changes["mailchimp_api_key"] = rt.sealer.seal(changes["mailchimp_api_key"])
    try:
        return _upsert(rt, user_id, plan, changes)
    except IntegrityError:
        # A concurrent request created the same agent first (the row we locked did not
        # exist yet): this one updates what it made.
        return _upsert(rt, user_id, plan, changes)


def _upsert(rt: Runtime, user_id: str, plan: str, changes: dict[str, Any]) -> tuple[UserView, bool]:
    """One attempt at :func:`upsert_user`'s transaction."""
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        user = session.get(User, user_id, with_for_update=True)
        created = user is None
        if user is None:
            plan_name = plans.FREE if plan is _UNSET else plan
            plans.plan(rt.settings, plan_name, "plan")
            user = User(id=user_id, timezone="UTC", plan=plan_name, created_at=now, updated_at=now)
            session.add(user)
        elif plan is not _UNSET and plan != user.plan:
            raise InvalidInput("plan", "can only be set on creation; change it with a subscription")
        for name, value in changes.items():
            setattr(user, name, value)
        if created:
            session.flush()
            roll_forward(session, rt.settings, rt.gateway, user, now)  # the first grant
        elif "timezone" in changes and user.period is not None:
            # The current period keeps its id; it now ends at midnight in the new zone.
            user.period_end = period_by_id(user.period, user.timezone).end_utc
        if user.platform_email is None and user.communications_email is None:
            raise InvalidInput(
                "platform_email", "a user needs a platform_email or a communications_email"
            )
        user.updated_at = now
        session.flush()
        return view(user), created


def _checked_changes(user_id: str, **given: Any) -> dict[str, Any]:
    """The fields given (``_UNSET`` ones left out), each checked; :class:`InvalidInput` names
    every bad one. ``plan`` is checked against the catalog later, on creation only."""
    found = validation.Findings()
    found.check(validation.identifier, "user_id", user_id)
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not _UNSET}
    for name in ("platform_email", "communications_email"):
        if changes.get(name) is not None:
            changes[name] = found.check(validation.address, name, changes[name])
    if changes.get("postal_address") is not None:
        changes["postal_address"] = found.check(
            validation.postal_address, "postal_address", changes["postal_address"]
        )
    if "timezone" in changes:
        tz = found.check(
            validation.text, "timezone", changes["timezone"], max_len=validation.TIMEZONE_MAX
        )
        if tz is not None:
            found.check(zone, tz, "timezone")
    if "plan" in changes:
        found.check(validation.text, "plan", changes.pop("plan"), max_len=validation.PLAN_MAX)
    if changes.get("mailchimp_api_key") is not None:
        found.check(
            validation.header_text,
            "mailchimp.api_key",
            changes["mailchimp_api_key"],
            max_len=validation.MAILCHIMP_KEY_MAX,
        )
    if changes.get("mailchimp_list_id") is not None:
        found.check(
            validation.identifier,
            "mailchimp.list_id",
            changes["mailchimp_list_id"],
            max_len=validation.MAILCHIMP_LIST_MAX,
        )
    found.done()
    return changes


def get_user(session: Session, user_id: str) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound("user", user_id)
    return user


def view(user: User) -> UserView:
    return UserView(
        id=user.id,
        platform_email=user.platform_email,
        communications_email=user.communications_email,
        timezone=user.timezone,
        plan=user.plan,
        mailchimp_connected=bool(user.mailchimp_api_key),
        mailchimp_list_id=user.mailchimp_list_id,
        postal_address=user.postal_address,
    )


def reseal_secrets(rt: Runtime, batch: int = 200) -> int:
    """Seal every stored MailChimp API key again with the first of ``SECRET_KEYS`` (a key
    stored before sealing is sealed now); returns how many were sealed. Run it after putting a
    new key first, before dropping the old one."""
    done = 0
    last = ""
    while True:
        with rt.sessions.begin() as session:
            users = session.scalars(
                select(User)
                .where(User.id > last, User.mailchimp_api_key.is_not(None))
                .order_by(User.id)
                .limit(batch)
                .with_for_update()
            ).all()
            for user in users:
                assert user.mailchimp_api_key is not None
                user.mailchimp_api_key = rt.sealer.reseal(user.mailchimp_api_key)
        if not users:
            break
        done += len(users)
        last = users[-1].id
    log.info("stored secrets sealed with the first key: %d", done)
    return done
