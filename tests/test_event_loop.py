"""`--event-loop uvloop` (KServe's flag) is honoured by a single process too, where KServe's
own start() runs asyncio's loop whatever the flag says; `auto` (the default) keeps asyncio
there for its tail latency. `--workers` processes are uvicorn's: uvloop for `auto`."""

from __future__ import annotations

import asyncio

import pytest
import requests
import uvloop
from support import ORDINARY

from predictor.server import use_event_loop


@pytest.fixture
def restored_policy():
    policy = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(policy)


def test_uvloop_runs_on_uvloop(restored_policy):
    assert use_event_loop("uvloop") == "uvloop"

    async def running_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    assert isinstance(asyncio.run(running_loop()), uvloop.Loop)


@pytest.mark.parametrize("choice", ["auto", "asyncio"])
def test_auto_and_asyncio_keep_asyncios_loop(restored_policy, choice):
    assert use_event_loop(choice) == "asyncio"
    assert not isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)


def test_a_predictor_runs_on_asyncio_unless_told_uvloop(served, start_predictor, mlflow_server):
    assert "event loop: asyncio" in served.log()
    told = start_predictor(
        env={"MLFLOW_TRACKING_URI": mlflow_server.url}, args=["--event-loop", "uvloop"]
    )
    body = {"instances": [ORDINARY]}
    answer = requests.post(f"{told.url}/v1/models/fraud-detector:predict", json=body, timeout=10)
    assert answer.status_code == 200
    assert "event loop: uvloop" in told.log()
