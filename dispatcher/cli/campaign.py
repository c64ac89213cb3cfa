"""``dispatcher campaign``: start, follow, pause, resume and cancel campaigns through the API."""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx

from dispatcher.cli.common import Commands
from dispatcher.cli.stack import STACK_FILE, StackInfo, stack_dir
from dispatcher.errors import DispatcherError
from dispatcher.pages import MAX_LIMIT, Page, walk

DEFAULT_API = "http://127.0.0.1:8000"


class CampaignCommandError(DispatcherError):
    """The API refused the request or could not be reached."""


def add_commands(commands: Commands) -> None:
    """Register ``dispatcher campaign ...`` on the CLI's subparsers."""
    campaign = commands.add_parser(
        "campaign",
        help="start, follow, pause, resume or cancel a campaign (through the HTTP API)",
        description=(
            "Campaign commands talk to the HTTP API: --api-url and --token, else "
            "DISPATCHER_API_URL and DISPATCHER_API_TOKEN, else the running local stack's "
            "(stack.json in --dir, DISPATCHER_DIR or .dispatcher), else http://127.0.0.1:8000."
        ),
    )
    campaign.add_argument("--api-url", help="base URL of the dispatcher API")
    campaign.add_argument("--token", help="bearer token for the API")
    campaign.set_defaults(handler=run)
    sub = campaign.add_subparsers(dest="campaign_command", required=True, metavar="COMMAND")
    _add_send(sub)
    show = sub.add_parser(
        "show",
        help="status and counts of a campaign",
        description="Print a campaign's status, counts and progress.",
    )
    show.add_argument("campaign_id", metavar="ID")
    show.add_argument("--user", required=True, help="the agent who owns the campaign")
    show.add_argument(
        "--follow", action="store_true", help="keep a live progress bar until the campaign finishes"
    )
    for action, text in (
        ("pause", "stop handing out recipients (in-flight ones finish)"),
        ("resume", "hand out the remaining recipients again"),
        ("cancel", "stop for good; unsent recipients' credits come back"),
    ):
        p = sub.add_parser(action, help=text, description=text.capitalize() + ".")
        p.add_argument("campaign_id", metavar="ID")
        p.add_argument("--user", required=True, help="the agent who owns the campaign")


def _add_send(sub: Commands) -> None:
    send = sub.add_parser(
        "send",
        help="start a campaign from a CSV of recipients",
        description=(
            "Start a campaign. The CSV needs columns id and email; every other column is a "
            "merge field (e.g. first_name, usable as {{ first_name }}). Command Email reserves "
            "one credit per valid recipient at once, or refuses the whole campaign; invalid "
            "addresses are listed and never charged."
        ),
    )
    send.add_argument("--user", required=True, help="the agent's user id")
    send.add_argument("--subject", required=True, help="subject template")
    send.add_argument("--html", required=True, type=Path, help="file with the HTML template")
    send.add_argument("--text", type=Path, help="file with the plain-text template")
    send.add_argument("--recipients", required=True, type=Path, help="CSV file of recipients")
    send.add_argument("--provider", choices=["command_email", "mailchimp"], default="command_email")
    send.add_argument("--name", help="a name for the campaign")
    send.add_argument("--from-name", help="display name of the sender")
    send.add_argument(
        "--key",
        help="idempotency key: running the same command again with it (say after a timeout) "
        "shows the campaign the first run made instead of sending a second one",
    )
    send.add_argument(
        "--send-at",
        metavar="TIME",
        help="schedule it: an ISO 8601 time with offset, or a local time in the agent's zone "
        "(e.g. 2026-12-01T09:00:00); beat starts it within a minute of that time",
    )
    send.add_argument("--follow", action="store_true", help="show a live progress bar")


def _client(args: argparse.Namespace) -> httpx.Client:
    url, token = (
        args.api_url or os.environ.get("DISPATCHER_API_URL"),
        (args.token or os.environ.get("DISPATCHER_API_TOKEN")),
    )
    directory = stack_dir(args)
    if (url is None or token is None) and (directory / STACK_FILE).is_file():
        info = StackInfo.load(directory)
        url, token = url or info.api_url, token or info.token
        print(f"using {info.describe(directory)}, API {url}", file=sys.stderr, flush=True)
    if token is None:
        raise CampaignCommandError("no API token: pass --token or set DISPATCHER_API_TOKEN")
    return httpx.Client(
        base_url=url or DEFAULT_API, timeout=600, headers={"Authorization": f"Bearer {token}"}
    )


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise CampaignCommandError(
            f"the API at {client.base_url} did not answer ({type(exc).__name__})"
        ) from None
    if response.is_error:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise CampaignCommandError(f"{response.status_code}: {detail}")
    return response.json()


def excluded(
    client: httpx.Client, campaign_id: str, user_id: str, kind: str
) -> Iterator[dict[str, Any]]:
    """Every recipient of ``user_id``'s campaign that is ``invalid`` or ``suppressed``, page
    by page."""
    path = f"/v1/campaigns/{campaign_id}/{kind}"

    def read(cursor: str | None) -> Page[dict[str, Any]]:
        params: dict[str, Any] = {"limit": MAX_LIMIT, "user_id": user_id}
        if cursor is not None:
            params["cursor"] = cursor
        page = _call(client, "GET", path, params=params)
        return Page(page["items"], page["next_cursor"])

    return walk(read)


def read_recipients(path: Path) -> list[dict[str, Any]]:
    """Recipients from a CSV with id and email columns; other columns are merge fields."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"id", "email"} - set(reader.fieldnames or [])
        if missing:
            raise CampaignCommandError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        return [
            {
                "id": row.pop("id"),
                "email": row.pop("email"),
                "fields": {k: v for k, v in row.items() if k},
            }
            for row in reader
        ]


def progress_line(view: dict[str, Any], rate: float | None) -> str:
    """One line: a bar, counts and the rate."""
    width = 30
    filled = int(view["progress"] * width)
    counts = view["counts"]
    line = (
        f"[{'#' * filled}{'-' * (width - filled)}] {view['progress'] * 100:5.1f}% "
        f"{view['done']:,}/{view['recipients']:,}  sent {counts['sent']:,}  "
        f"failed {counts['failed']:,}  unknown {counts['unknown']:,}  {view['status']}"
    )
    return line + (f"  {rate:,.0f}/s" if rate else "")


def follow(
    client: httpx.Client, campaign_id: str, user_id: str, out: TextIO | None = None
) -> dict[str, Any]:
    """Redraw the progress bar until ``user_id``'s campaign is no longer running."""
    out = out or sys.stdout
    tty = out.isatty()
    last_done, last_time, last_print = 0, time.monotonic(), 0.0
    while True:
        view: dict[str, Any] = _call(
            client, "GET", f"/v1/campaigns/{campaign_id}", params={"user_id": user_id}
        )
        now = time.monotonic()
        rate = (view["done"] - last_done) / (now - last_time) if now > last_time else None
        last_done, last_time = view["done"], now
        finished = view["status"] not in ("running", "reserving")
        if tty:
            out.write("\r" + progress_line(view, rate) + ("\n" if finished else ""))
            out.flush()
        elif finished or now - last_print > 5:
            out.write(progress_line(view, rate) + "\n")
            last_print = now
        if finished:
            return view
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    """Handle ``dispatcher campaign ...``; returns the exit code."""
    with _client(args) as client:
        command = args.campaign_command
        if command == "send":
            body = {
                "user_id": args.user,
                "provider": args.provider,
                "name": args.name,
                "from_name": args.from_name,
                "message": {
                    "subject": args.subject,
                    "html": args.html.read_text(encoding="utf-8"),
                    "text": args.text.read_text(encoding="utf-8") if args.text else None,
                },
                "idempotency_key": args.key,
                "send_at": args.send_at,
                # Last: the API reads the other members first, without decoding these twice.
                "recipients": read_recipients(args.recipients),
            }
            view = _call(client, "POST", "/v1/campaigns", json=body)
            if view.get("replayed"):
                print(f"campaign {view['id']} was made by an earlier run with this key")
            print(
                f"campaign {view['id']}: {view['recipients']:,} recipients, "
                f"{view['invalid']:,} invalid, {view['suppressed']:,} suppressed (not charged), "
                f"{view['status']}"
            )
            if view["invalid"]:
                for bad in excluded(client, view["id"], args.user, "invalid"):
                    print(f"  invalid: row {bad['index'] + 1} {bad['email']!r}: {bad['reason']}")
            if view["suppressed"]:
                for one in excluded(client, view["id"], args.user, "suppressed"):
                    print(f"  suppressed: {one['email']!r} ({one['reason']})")
            if view.get("send_at"):
                print(f"scheduled for {view['send_at']} (UTC)")
            elif args.follow:
                follow(client, view["id"], args.user)
            return 0
        if command == "show":
            view = (
                follow(client, args.campaign_id, args.user)
                if args.follow
                else _call(
                    client,
                    "GET",
                    f"/v1/campaigns/{args.campaign_id}",
                    params={"user_id": args.user},
                )
            )
            if not args.follow:
                print(progress_line(view, None))
            if view["failed_by_reason"]:
                reasons = ", ".join(f"{k} {v:,}" for k, v in view["failed_by_reason"].items())
                print(f"failed by reason: {reasons}")
            if view.get("detail"):
                print(f"note: {view['detail']}")
            return 0
        view = _call(
            client,
            "POST",
            f"/v1/campaigns/{args.campaign_id}/{command}",
            params={"user_id": args.user},
        )
        print(progress_line(view, None))
        return 0
