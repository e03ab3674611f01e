"""The dashboard end to end: a real daemon on a free port, real Docker sandboxes, and
Debian's Chromium driven by Playwright (fixtures in browser.py).

Every wait is a condition with a deadline; every sandbox made here is deleted in
``finally`` (the ``boxes`` fixture), and the daemon is stopped by pid.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest
from browser import artifacts_dir, needs_chromium, screenshot

from aiva import errors
from aiva.daemon import control, wire
from aiva.daemon.client import RemoteEngine, connect
from aiva.models import State

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route

pytestmark = pytest.mark.docker
T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0,
             every: float = 0.25) -> T:
    """``probe()`` until it returns something truthy, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Daemon:
    def __init__(self, port: int, pid: int, token: str) -> None:
        self.port, self.pid, self.token = port, pid, token
        self.base = f"http://127.0.0.1:{port}"

    def tcp(self, token: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, trust_env=False, timeout=30)


@pytest.fixture(scope="module")
def daemon(python_image: str) -> Iterator[Daemon]:
    port = _free_port()
    info = control.start(port, timeout=60)
    pid = int(info["pid"])
    try:
        assert info["running"] and info["port"] == port
        yield Daemon(port, pid, wire.token_path().read_text().strip())
    finally:
        control.stop()
        if control.is_daemon(pid):
            os.kill(pid, signal.SIGKILL)
    log = wire.log_path().read_text(errors="replace")
    assert "Traceback" not in log, log


@pytest.fixture
def remote(daemon: Daemon) -> Iterator[RemoteEngine]:
    with connect() as eng:
        yield eng


@pytest.fixture
def boxes() -> Iterator[list[str]]:
    """Names a test made; deleted afterwards by an in-process engine, pass or fail."""
    made: list[str] = []
    try:
        yield made
    finally:
        from aiva.engine import Engine

        eng = Engine()
        try:
            for name in made:
                if eng.exists(name):
                    eng.delete(name, volumes=True)
        finally:
            eng.close()


def _new(remote: RemoteEngine, boxes: list[str], prefix: str = "dash") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    boxes.append(name)
    sb = remote.create(name, remote.build_spec(cpus=1, memory="512MB"))
    assert sb.state == State.RUNNING
    return name


def _cli_url() -> str:
    """What `aiva dashboard` prints, run as a separate process."""
    env = {k: v for k, v in os.environ.items() if k != "AIVA_NO_DAEMON"}
    out = subprocess.run([sys.executable, "-m", "aiva.cli.main", "dashboard"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _row(page: Page, name: str, state: str | None = None) -> Any:
    sel = f'li.sandbox[data-name="{name}"]'
    return page.locator(sel + (f'[data-state="{state}"]' if state else ""))


# ---------------------------------------------------------------------- auth, no browser


def test_ui_is_served_without_the_token_but_the_api_is_not(daemon: Daemon) -> None:
    with daemon.tcp() as bare:
        root = bare.get("/", follow_redirects=False)
        assert root.status_code in (302, 307) and root.headers["location"] == "/ui/"
        for path, kind in (("/ui/", "text/html"), ("/ui/app.js", "javascript"),
                           ("/ui/style.css", "text/css")):
            r = bare.get(path)
            assert r.status_code == 200, path
            assert kind in r.headers["content-type"], (path, r.headers["content-type"])
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            assert daemon.token not in r.text
        assert "Token needed" in bare.get("/ui/").text
        # only GET of the static files is open: the API, other methods and docs are not
        for method, path in (("GET", "/v1/overview"), ("GET", "/v1/sandboxes"),
                             ("GET", "/openapi.json"), ("GET", "/docs"),
                             ("POST", "/ui/"), ("HEAD", "/ui/"), ("GET", "/uix")):
            r = bare.request(method, path)
            assert r.status_code == 401, (method, path, r.status_code)
    with daemon.tcp(daemon.token) as authed:
        overview = authed.get("/v1/overview")
        assert overview.status_code == 200
        assert set(overview.json()) == {"now", "interval", "sandboxes"}
        paths = authed.get("/openapi.json").json()["paths"]
    for route in ("/v1/overview", "/v1/sandboxes/{name}/metrics/history"):
        assert route in paths, route
    assert not any(p.startswith("/ui") for p in paths)


def test_cli_prints_the_url_with_the_token_in_the_fragment(daemon: Daemon) -> None:
    url = urlsplit(_cli_url())
    assert (url.scheme, url.hostname, url.port, url.path) == ("http", "127.0.0.1",
                                                               daemon.port, "/ui/")
    assert url.query == "" and url.fragment == f"token={daemon.token}"


# ---------------------------------------------------------------------- the page


@needs_chromium
def test_without_a_token_the_page_says_so(daemon: Daemon, page: Page) -> None:
    from playwright.sync_api import expect

    page.goto(f"{daemon.base}/ui/")
    notice = page.locator("#token-needed")
    expect(notice).to_be_visible(timeout=15_000)
    expect(notice).to_contain_text("Token needed")
    expect(notice).to_contain_text("aiva dashboard")
    expect(page.locator("#app")).to_be_hidden()
    status = page.evaluate("fetch('/v1/overview').then(r => r.status)")
    assert status == 401
    # a wrong token is refused too, and said so
    page.goto(f"{daemon.base}/ui/#token=not-the-token")
    expect(page.locator("#token-why")).to_contain_text("refused", timeout=15_000)
    assert page.evaluate("sessionStorage.getItem('aiva.token')") is None
    # pasting the right one opens the dashboard
    page.fill("#token-input", daemon.token)
    page.click("#token-save")
    expect(page.locator("#app")).to_be_visible(timeout=15_000)
    expect(notice).to_be_hidden()


@needs_chromium
def test_lists_sandboxes_and_stops_one(daemon: Daemon, remote: RemoteEngine,
                                       boxes: list[str], page: Page) -> None:
    from playwright.sync_api import expect

    a, b = _new(remote, boxes), _new(remote, boxes)
    page.goto(_cli_url())
    for name in (a, b):
        expect(_row(page, name, "running")).to_be_visible(timeout=20_000)
        expect(_row(page, name).locator(".backend")).to_have_text("docker")
    assert "token" not in page.url  # the fragment left the address bar ...
    assert page.evaluate("sessionStorage.getItem('aiva.token')") == daemon.token  # ... for here
    api_names = {sb.name for sb in remote.list_all()}
    page_names = set(page.locator("li.sandbox").evaluate_all(
        "items => items.map(i => i.dataset.name)"))
    assert page_names == api_names

    _row(page, a).click()
    expect(page.locator("#d-name")).to_have_text(a)
    expect(page.locator('[data-fact="uptime"]')).to_have_text(re.compile(r"^\d+[smhd]"),
                                                              timeout=10_000)
    page.locator('#detail button[data-action="stop"]').click()
    expect(_row(page, a, "stopped")).to_be_visible(timeout=60_000)
    expect(page.locator("#d-state")).to_have_text("stopped")
    expect(page.locator('#detail button[data-action="start"]')).to_be_enabled()
    assert remote.status(a).state == State.STOPPED
    assert remote.status(b).state == State.RUNNING
    expect(_row(page, b, "running")).to_be_visible()


@needs_chromium
def test_charts_events_and_logs_render(daemon: Daemon, remote: RemoteEngine,
                                       boxes: list[str], page: Page) -> None:
    from playwright.sync_api import expect

    name = _new(remote, boxes)
    remote.exec(name, ["sh", "-c", "echo hello-from-the-dashboard-test"])
    with daemon.tcp(daemon.token) as api:
        def samples() -> list[Any]:
            r = api.get(f"/v1/sandboxes/{name}/metrics/history")
            assert r.status_code == 200, r.text
            got: list[Any] = r.json()["samples"]
            return got if len(got) >= 2 else []

        history = wait_for("two metrics samples from the daemon's sampler", samples, 60)
        assert history[-1]["mem_total"] > 0 and history[0]["ts"] <= history[-1]["ts"]
        row = next(r for r in api.get("/v1/overview").json()["sandboxes"]
                   if r["name"] == name)
        assert row["state"] == "running" and row["uptime"] is not None
    page.goto(_cli_url())
    _row(page, name, "running").click()
    for chart in ("#chart-cpu", "#chart-mem"):
        # polled from here: the page's CSP forbids the eval wait_for_function would need
        points = page.locator(chart)
        wait_for(f"{chart} to draw two samples",
                 lambda pts=points: int(pts.get_attribute("data-points") or 0) >= 2,
                 timeout=20)
        expect(page.locator(f"{chart} path.line")).to_have_count(1)
        d = page.locator(f"{chart} path.line").get_attribute("d") or ""
        assert d.startswith("M") and d.count("L") >= 1
    expect(page.locator("#mem-now")).to_contain_text("of")
    expect(page.locator('#events li[data-kind="created"]')).to_have_count(1, timeout=10_000)
    expect(page.locator('#events li[data-kind="command"]').first).to_be_visible()
    expect(page.locator("#logs")).to_contain_text("hello-from-the-dashboard-test",
                                                  timeout=10_000)
    shot = screenshot(page, "dashboard")
    assert shot.stat().st_size > 10_000


@needs_chromium
def test_snapshot_and_delete_with_confirmation(daemon: Daemon, remote: RemoteEngine,
                                               boxes: list[str], page: Page) -> None:
    from playwright.sync_api import expect

    name = _new(remote, boxes)
    page.goto(_cli_url())
    _row(page, name, "running").click()
    page.locator('#detail button[data-action="snapshot"]').click()
    expect(page.locator("#d-message")).to_contain_text("saved", timeout=120_000)
    assert len(remote.snapshots(name)) == 1

    page.locator('#detail button[data-action="delete"]').click()
    dialog = page.locator("dialog#confirm")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text(name)
    page.click("#confirm-cancel")
    expect(dialog).to_be_hidden()
    assert remote.status(name).state == State.RUNNING  # cancel deleted nothing

    page.locator('#detail button[data-action="delete"]').click()
    page.check("#confirm-volumes")
    page.click("#confirm-ok")
    expect(_row(page, name)).to_have_count(0, timeout=60_000)
    with pytest.raises(errors.SandboxNotFound):
        remote.status(name)


@needs_chromium
def test_desktop_tabs_switch_the_iframe(daemon: Daemon, remote: RemoteEngine,
                                        boxes: list[str], page: Page) -> None:
    """The desktop endpoint is answered by the browser here (its contract:
    200 {url, port, password}, or 404/409), so this checks the page alone."""
    from playwright.sync_api import expect

    a, b, plain = (_new(remote, boxes, p) for p in ("deska", "deskb", "plain"))
    ports = {a: 46001, b: 46002}
    asked: list[str] = []

    def desktop(route: Route) -> None:
        name = route.request.url.split("/sandboxes/")[1].split("/")[0]
        asked.append(name)
        if name in ports:
            port = ports[name]
            route.fulfill(status=200, content_type="application/json", body=json.dumps({
                "url": f"http://127.0.0.1:{port}/vnc.html?autoconnect=1&resize=scale"
                       f"&password=pw{port}", "port": port, "password": f"pw{port}"}))
        else:
            route.fulfill(status=404, content_type="application/json", body=json.dumps(
                {"error": {"type": "NotADesktop", "message": f"{name} has no desktop",
                           "hint": None, "attrs": {}}}))

    def vnc(route: Route) -> None:
        port = urlsplit(route.request.url).port
        route.fulfill(status=200, content_type="text/html",
                      body=f"<title>vnc</title><body style='background:#fff'>"
                           f"<h1 id=screen>desktop on {port}</h1>")

    def overview(route: Route) -> None:  # a and b are desktop sandboxes, as far as the page knows
        got = route.fetch().json()
        for row in got["sandboxes"]:
            row["desktop"] = row["name"] in ports
        route.fulfill(json=got)

    page.route("**/v1/overview", overview)
    page.route("**/v1/sandboxes/*/desktop", desktop)
    page.context.route("http://127.0.0.1:4600*/vnc.html*", vnc)
    page.goto(_cli_url())
    expect(page.locator("#desktop-count")).to_have_text("2", timeout=20_000)
    assert plain not in asked  # a sandbox without a desktop is never asked (no 404s)
    expect(_row(page, a).locator(".desktop-pill")).to_be_visible()
    expect(_row(page, plain).locator(".desktop-pill")).to_have_count(0)

    page.click("#view-desktops")
    tabs = page.locator("#desktop-tabs .tab")
    expect(tabs).to_have_count(2)
    frame = page.locator("#desktop-frame")
    expect(frame).to_be_visible()
    expect(frame).to_have_attribute("data-sandbox", a)
    expect(page.frame_locator("#desktop-frame").locator("#screen")).to_have_text(
        f"desktop on {ports[a]}", timeout=10_000)
    page.click(f'#desktop-tabs .tab[data-desktop="{b}"]')
    expect(frame).to_have_attribute("data-sandbox", b)
    assert (frame.get_attribute("src") or "").startswith(f"http://127.0.0.1:{ports[b]}/")
    expect(page.frame_locator("#desktop-frame").locator("#screen")).to_have_text(
        f"desktop on {ports[b]}", timeout=10_000)
    screenshot(page, "dashboard-desktops")

    # a desktop sandbox that stops leaves the tabs
    remote.stop(a)
    expect(tabs).to_have_count(1, timeout=20_000)
    expect(frame).to_have_attribute("data-sandbox", b)


# ---------------------------------------------------------------------- a real desktop


GRAB = ("ffmpeg -v error -y -f x11grab -i :0 -frames:v 1 /tmp/screen.png"
        " && test -s /tmp/screen.png")


def _colours(png: bytes) -> tuple[tuple[int, int, int], float, int]:
    """The most common colour, its share of the pixels, and how many colours there are."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    counts = img.getcolors(maxcolors=img.width * img.height) or []
    count, top = max(counts)
    return top, count / (img.width * img.height), len(counts)


def _close(a: tuple[int, int, int], b: tuple[int, int, int], tol: int = 16) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_a_real_desktop_shows_xfce_in_the_novnc_view(
        daemon: Daemon, remote: RemoteEngine, boxes: list[str], page: Page,
        desktop_image: str) -> None:
    """Two real desktop sandboxes: the view connects to each through noVNC (password from
    the API), shows the XFCE desktop the sandbox itself draws, and a wrong password is
    refused. The screenshots are kept as test artifacts."""
    from playwright.sync_api import expect

    names = []
    for prefix in ("xfce-a", "xfce-b"):
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        boxes.append(name)
        sb = remote.create(name, remote.build_spec(template="desktop", cpus=1, memory="1GB"))
        assert sb.state == State.RUNNING and sb.spec.desktop
        names.append(name)
    a, b = names
    page.goto(_cli_url())
    expect(page.locator("#desktop-count")).to_have_text("2", timeout=30_000)
    page.click("#view-desktops")
    page.click(f'#desktop-tabs .tab[data-desktop="{a}"]')
    frame = page.locator("#desktop-frame")
    expect(frame).to_have_attribute("data-sandbox", a)
    vnc = page.frame_locator("#desktop-frame")
    expect(vnc.locator("html.noVNC_connected")).to_have_count(1, timeout=30_000)

    # what the sandbox's own X server shows, grabbed inside it
    remote.exec(a, GRAB, env={"DISPLAY": ":0"})
    guest_png = remote.read_file(a, "/tmp/screen.png")
    (artifacts_dir() / "desktop-guest.png").write_bytes(guest_png)
    guest_top, guest_share, guest_colours = _colours(guest_png)
    assert guest_share > 0.3 and guest_colours > 50, "the guest's screen is not a desktop"

    def shows_the_guest_desktop() -> bytes | None:
        shot = frame.screenshot()
        top, share, colours = _colours(shot)
        return shot if _close(top, guest_top) and share > 0.3 and colours > 50 else None

    shot = wait_for("the noVNC view to show the sandbox's desktop", shows_the_guest_desktop,
                    timeout=60, every=1.0)
    (artifacts_dir() / "desktop-novnc.png").write_bytes(shot)
    screenshot(page, "dashboard-real-desktop")

    # switching to the other desktop connects to it
    page.click(f'#desktop-tabs .tab[data-desktop="{b}"]')
    expect(frame).to_have_attribute("data-sandbox", b)
    info_b = remote.desktop(b)
    assert (frame.get_attribute("src") or "").startswith(f"http://127.0.0.1:{info_b.port}/")
    expect(vnc.locator("html.noVNC_connected")).to_have_count(1, timeout=30_000)
    wait_for("the second desktop to show", shows_the_guest_desktop, timeout=60, every=1.0)

    # the VNC password is really asked for
    other = page.context.new_page()
    try:
        other.goto(info_b.url.replace(info_b.password, "wrongpw1").replace("&reconnect=1", ""))
        expect(other.locator("#noVNC_status")).to_contain_text("rejected", timeout=30_000)
        expect(other.locator("html.noVNC_connected")).to_have_count(0)
    finally:
        other.close()


# ---------------------------------------------------------------------- tasks


@needs_chromium
def test_tasks_view_approves_and_rejects_held_tasks(daemon: Daemon, page: Page) -> None:
    """Tasks made straight in ``awaiting_approval`` (no sandbox, no scheduler run): the
    Tasks view lists them and its buttons write the decision to the store. The daemon's
    scheduler then ends them ``failed`` (their held sandbox does not exist), keeping the
    decision; so the reject reason is checked in the answer of the POST."""
    from playwright.sync_api import expect

    from aiva.tasks.models import Task, TaskState, TaskStateError
    from aiva.tasks.store import TaskStore

    tag = uuid.uuid4().hex[:6]
    store = TaskStore()
    held = [store.add(Task(command=["true"], name=f"dash-{tag}-{n}", approve=True,
                           state=TaskState.awaiting_approval)) for n in ("a", "b")]
    a, b = held
    try:
        with daemon.tcp() as bare:
            assert bare.get("/v1/tasks").status_code == 401
        with daemon.tcp(daemon.token) as authed:
            listed = authed.get("/v1/tasks", params={"state": "awaiting_approval"})
            assert listed.status_code == 200
            assert {a.id, b.id} <= {t["id"] for t in listed.json()}
            assert authed.get("/v1/tasks/t-00000000").status_code == 404
            assert authed.get("/v1/eval", params={"by": "template"}).status_code == 200

        page.goto(_cli_url())
        expect(page.locator("#app")).to_be_visible(timeout=15_000)
        page.click("#view-tasks")
        expect(page.locator("#panel-tasks")).to_be_visible()
        row_a = page.locator(f'tr.task[data-id="{a.id}"][data-state="awaiting_approval"]')
        row_b = page.locator(f'tr.task[data-id="{b.id}"][data-state="awaiting_approval"]')
        expect(row_a).to_have_count(1, timeout=15_000)
        expect(row_b).to_have_count(1)
        expect(row_a.locator("button[data-action=approve]")).to_be_visible()
        expect(row_a.locator("button[data-action=cancel]")).to_be_visible()
        expect(page.locator('#eval-summary [data-eval="success_rate"]')).not_to_have_text("")
        screenshot(page, "dashboard-tasks")

        row_a.locator("button[data-action=approve]").click()
        wait_for("the approval in the store", lambda: store.get(a.id).decision == "approve",
                 timeout=15)
        expect(page.locator(f'tr.task[data-id="{a.id}"] button[data-action=approve]')
               ).to_have_count(0, timeout=15_000)

        row_b.locator("button[data-action=reject]").click()
        dialog = page.locator("dialog#reject")
        expect(dialog).to_be_visible()
        expect(dialog).to_contain_text(b.id)
        page.fill("#reject-reason", "wrong approach")
        with page.expect_response(lambda r: r.url.endswith(f"/v1/tasks/{b.id}/reject")
                                  ) as answer:
            page.click("#reject-ok")
        expect(dialog).to_be_hidden()
        assert answer.value.status == 200
        body = answer.value.json()
        assert (body["decision"], body["reason"]) == ("reject", "rejected: wrong approach")
        wait_for("the rejection in the store", lambda: store.get(b.id).decision == "reject",
                 timeout=15)
        after = store.get(b.id)
        assert after.reason == "rejected: wrong approach" or after.state == TaskState.failed
        # deciding twice is refused with the store's error (409)
        with daemon.tcp(daemon.token) as authed:
            again = authed.post(f"/v1/tasks/{b.id}/approve")
            assert again.status_code == 409, again.text
    finally:
        for task in held:
            try:
                store.cancel(task.id)
            except TaskStateError:
                pass  # the scheduler already ended it
        store.close()


@needs_chromium
def test_landing_view_events_and_limits(daemon: Daemon, remote: RemoteEngine,
                                        boxes: list[str], page: Page) -> None:
    """The page opens on the first sandbox (no click), says "Loading…" until the daemon
    answers, names the command of each command event, shows a CPU limit only where one
    is enforced, and asks no plain sandbox for a desktop (no 404 in the console)."""
    from playwright.sync_api import expect

    limited = _new(remote, boxes, "lim")  # 1 CPU
    host = os.cpu_count() or 1
    free_name = f"free-{uuid.uuid4().hex[:6]}"
    boxes.append(free_name)
    remote.create(free_name, remote.build_spec(cpus=host, memory="512MB"))
    remote.exec(limited, ["sh", "-c", "echo landing-test"])
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if r.url.endswith("/desktop") else None)
    calls = {"overview": 0}

    def first_fails(route: Route) -> None:
        calls["overview"] += 1
        if calls["overview"] == 1:
            route.abort()
        else:
            route.continue_()

    page.route("**/v1/overview", first_fails)
    page.goto(_cli_url())
    expect(page.locator("#loading")).to_be_visible(timeout=10_000)
    expect(page.locator("#loading")).to_be_hidden(timeout=20_000)
    first = page.locator("li.sandbox").first.get_attribute("data-name")
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#d-name")).to_have_text(first or "")
    _row(page, limited).click()
    cmd = page.locator('#events li[data-kind="command"]').first
    expect(cmd).to_contain_text("$ sh -c 'echo landing-test' → exit 0 in", timeout=10_000)
    expect(page.locator('[data-fact="cpus"]')).to_have_text("1")
    _row(page, free_name).click()
    expect(page.locator('[data-fact="cpus"]')).to_have_text(f"no limit ({host} on this host)")
    expect(page.locator("#cpu-now")).to_contain_text(f"(no limit: {host} host CPUs)",
                                                     timeout=30_000)
    assert asked == []


@needs_chromium
def test_tasks_table_on_a_narrow_screen(daemon: Daemon, page: Page) -> None:
    """Ids and sandbox names stay on one line, every cell of a row ends on the same line,
    and Approve, Reject and Cancel all show, at 1100 px. The page is given one held task
    (the daemon's own scheduler would end a made-up held task while the test looks)."""
    from playwright.sync_api import expect

    from aiva.tasks.models import Task, TaskState

    page.set_viewport_size({"width": 1100, "height": 800})
    t = Task(command=["python3", "-m", "pytest", "-q", "tests/test_everything.py"],
             approve=True, state=TaskState.awaiting_approval,
             sandbox="pool-python-3f9a-with-a-long-name",
             reason="waiting for a person to look at the diff before it lands")
    page.route("**/v1/tasks", lambda route: route.fulfill(json=[t.model_dump(mode="json")]))
    page.goto(_cli_url())
    page.click("#view-tasks")
    row = page.locator(f'tr.task[data-id="{t.id}"]')
    expect(row).to_be_visible(timeout=15_000)
    one_line = row.locator("td.col-priority").bounding_box()
    assert one_line is not None
    boxes_ = [row.locator(f"td.{c}").bounding_box() for c in
              ("col-id", "col-sandbox", "col-reason", "col-actions", "col-state")]
    for box in boxes_:
        assert box is not None
        assert abs((box["y"] + box["height"]) - (one_line["y"] + one_line["height"])) < 1.5
    for c in ("col-id", "col-sandbox"):
        lines = row.locator(f"td.{c}").evaluate(  # distinct tops of the text's boxes
            "td => { const r = document.createRange(); r.selectNodeContents(td); "
            "return new Set([...r.getClientRects()].map(x => Math.round(x.top))).size; }")
        assert lines == 1, f"{c} wraps onto {lines} lines"
    screenshot(page, "dashboard-tasks-narrow")
    card = page.locator(".table-card").bounding_box()
    assert card is not None
    for action in ("approve", "reject", "cancel"):
        button = row.locator(f"button[data-action={action}]")
        expect(button).to_be_visible()
        b = button.bounding_box()
        assert b is not None and b["x"] + b["width"] <= card["x"] + card["width"] + 1
