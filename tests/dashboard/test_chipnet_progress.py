"""A ChipNet job's page shows its long task's progress, as the worker's heartbeats carry it."""

from __future__ import annotations

import time

from tests.dashboard.conftest import Tab
from tests.dashboard.helpers import create_profiled_job
from tests.service.helpers import lease


def test_chipnet_progress_from_heartbeats_is_on_the_job_page(tab: Tab) -> None:
    srv = tab.server
    with srv.client(srv.admin_token) as c:
        spec = {"name": "chipnet-live", "compression": {"model": "resnet20", "data": "digits32-train",
                                                         "method": "channel_l1"},
                "objective": {"kind": "constrained", "budget": 0.5, "cost": "params"},
                "optimizer": {"engine": "chipnet", "chipnet": {"epochs": 5}}}
        job = create_profiled_job(c, spec, "channel_l1")
        task = None
        for _ in range(100):
            task = lease(c, worker="gpu0", kinds=["chipnet"])
            if task is not None:
                break
            time.sleep(0.05)
        assert task is not None and task["task"] == "chipnet" and task["trial"]["params"]["budget"] == 0.5, task
        r = c.post(f"/api/v1/trials/{task['trial']['id']}/heartbeat",
                   json={"lease_token": task["lease"]["token"], "progress": 0.4,
                         "message": "soft pruning epoch 2/5: loss 0.1234"})
        assert r.status_code == 200 and r.json()["lease"]["token"] == task["lease"]["token"], r.text
        shown = c.get(f"/api/v1/jobs/{job['id']}").json()["progress"]
        assert shown["state"] == "running" and shown["fraction"] == 0.4 and "epoch 2/5" in shown["message"]
        # nothing is proposed beside the one task
        assert c.get(f"/api/v1/jobs/{job['id']}/trials").json()["items"] == []
    tab.login(srv.admin_token)
    tab.goto(f"/jobs/{job['id']}")
    tab.wait_ready()
    page = tab.page
    page.wait_for_selector("#job-progress:not(.hidden)")
    text = page.inner_text("#job-progress-text")
    assert "ChipNet running" in text and "40%" in text and "epoch 2/5" in text, text
    assert page.get_attribute("#job-progress-bar", "style") == "width: 40%;"
    tab.assert_clean()
