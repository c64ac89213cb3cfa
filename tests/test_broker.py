"""The broker apart from the credit counters: ``BROKER_URL`` is read in one place by every
process, the API included, and the variables Celery would read on its own are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests.helpers import make_user
from tests.test_smartplan_e2e import send_body
from workers.app import create_app
from workers.names import QUEUES, SMARTPLAN
from workers.queue import CeleryTaskQueue
from workers.web import create_app as create_web

ROOT = Path(__file__).resolve().parent.parent


def test_celerys_own_broker_variable_stops_a_worker_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", SMARTPLAN],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "dispatcher: CELERY_BROKER_URL: is read by Celery on its own, so the workers would use "
        "it and the API would not; set BROKER_URL instead (every process reads it)"
    ]


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_the_api_publishes_where_the_workers_consume(
    settings: Settings, runtime: Runtime, redis_url: str, broker: str
) -> None:
    # Given BROKER_URL names RabbitMQ while REDIS_URL keeps the credit counters
    env = {"BROKER_URL": broker, "REDIS_URL": redis_url, "DATABASE_URL": settings.database_url}
    from_env = Settings.from_env({**env, "API_TOKENS": "test-token-123"}, env_file=None)
    worker_app = create_app(from_env)
    assert worker_app.conf.broker_url == broker
    # and the worker's queues are quorum queues
    assert {q.name: q.queue_arguments for q in worker_app.conf.task_queues} == {
        name: {"x-queue-type": "quorum"} for name in QUEUES
    }
    make_user(runtime)

    # When a producer posts a send to the API built from the same environment
    api = TestClient(create_web(from_env), headers={"Authorization": "Bearer test-token-123"})
    assert api.post("/v1/sends", json=send_body(1)).status_code == 202

    # Then its task waits on RabbitMQ, where the workers consume, and not on the Redis
    states = {q.name: q.messages for q in CeleryTaskQueue(worker_app).queues()}
    assert states == {"smartplan": 1, "campaign": 0, "system": 0}
    assert redis.Redis.from_url(redis_url).llen(SMARTPLAN) == 0
    # and /healthz checked the broker too
    health = api.get("/healthz")
    assert health.status_code == 200
    assert health.json()["broker"] == "ok"
