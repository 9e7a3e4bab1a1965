"""``layers-and-logits serve``: the explorer as a user meets it — a subprocess on 127.0.0.1 —
driven by headless Chromium, a bounded load test, hostile inputs and signals; the worker's
queue rules as a unit."""

from __future__ import annotations

import csv
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import RUN_PY
from layers_core.serve.worker import LensWorker, QueueFull, Superseded

NAME = "SmolLM2-135M-Instruct"
PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
URL_LINE = re.compile(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)")


class Server:
    """A ``serve`` subprocess: its ``process``, ``port`` and ``token``."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "layers_core", "serve", *args, "--device", "cpu"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in self.process.stdout:
            found = URL_LINE.search(line)
            if found:
                self.port, self.token = int(found.group(1)), found.group(2)
                break
        else:  # it ended without serving
            self.process.kill()
            raise AssertionError(f"no URL printed: {self.process.stderr.read()}")
        self.url = f"http://127.0.0.1:{self.port}/?token={self.token}"

    def call(self, method: str, path: str, body: bytes | str | None = None, token: str | None = "own",
             headers: dict | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        sent = dict(headers or {})
        if token is not None:
            sent["authorization"] = f"Bearer {self.token if token == 'own' else token}"
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        return response.status, response.read()

    def lens(self, **fields) -> tuple[int, dict]:
        status, body = self.call("POST", "/api/lens", json.dumps(fields))
        return status, json.loads(body)

    def rss_kb(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as handle:
            return int(next(line.split()[1] for line in handle if line.startswith("VmRSS")))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=30)
        finally:
            self.process.kill()
            self.process.stdout.close()
            self.process.stderr.close()


@pytest.fixture(scope="module")
def server(bundled_model_dir):
    served = Server(["--queue-size", "4"])
    try:
        yield served
    finally:
        assert served.stop() == 128 + signal.SIGTERM


@pytest.fixture(scope="module")
def run_records(bundled_model_dir, tmp_path_factory):
    """``run`` on the same prompt: the records the page must agree with."""
    out = tmp_path_factory.mktemp("run")
    subprocess.run([sys.executable, RUN_PY, "--out_dir", str(out), "--prompt", PROMPT, "--answer", "Berlin",
                    "--no-plots", "--quiet", "--device", "cpu"], check=True)
    with open(out / f"output-{NAME}-records.csv", newline="", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))
    with open(out / f"output-{NAME}-pure-next-token-arch.csv", newline="", encoding="utf-8") as handle:
        arch = list(csv.DictReader(handle))
    return records, arch


def _shown(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)[1:-1]


def test_the_page_reads_a_typed_prompt_as_run_does_switches_lens_and_pins(browser, server, run_records):
    from selenium.webdriver import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    records, arch = run_records
    browser.get(server.url)
    status = browser.find_element("id", "status")
    WebDriverWait(browser, 60).until(lambda _: status.get_attribute("data-state") == "done")  # the default prompt
    box = browser.find_element("id", "prompt")
    box.clear()
    box.send_keys(PROMPT)
    answer = browser.find_element("id", "answer")
    answer.clear()
    answer.send_keys("Berlin\n")
    report = browser.find_element("id", "report")
    WebDriverWait(browser, 60).until(lambda _: report.get_attribute("data-prompt") == PROMPT
                                     and status.get_attribute("data-state") == "done")
    assert "ms" in status.text
    cells = browser.find_elements("css selector", "#heatmap td.cell")
    assert len(cells) == len(records)
    row = next(r for r in records if r["layer"] == "24" and r["pos"] == "16")
    cell = browser.find_element("css selector", "#heatmap td.cell[data-layer='24'][data-pos='16']")
    ActionChains(browser).move_to_element(cell).perform()
    tip = browser.find_element("id", "tip")
    shown = [(r.find_element("css selector", ".tok").get_attribute("textContent"),
              float(r.find_element("css selector", ".prob").text))
             for r in tip.find_elements("css selector", "tr.tip-row")]
    expected = [(row[f"top{k}"], float(row[f"prob{k}"])) for k in range(1, 21) if row.get(f"prob{k}")]
    assert [t for t, _ in shown] == [_shown(t) for t, _ in expected]
    for (_, p), (_, q) in zip(shown, expected):
        assert p == pytest.approx(q, rel=1e-3, abs=1e-12)
    provenance = browser.find_element("id", "provenance").text
    assert "dtype: torch.float32" in provenance and "device: cpu" in provenance and "layers_core:" in provenance
    # the lens switch: the arch lens's last position as in run's arch CSV
    browser.find_element("css selector", "#lens option[value='arch']").click()
    WebDriverWait(browser, 60).until(lambda _: report.get_attribute("data-lens") == "arch"
                                     and status.get_attribute("data-state") == "done")
    cells = browser.find_elements("css selector", "#heatmap td.cell[data-pos='16']")
    last = {c.get_attribute("data-layer"): c.get_attribute("textContent") for c in cells}
    assert last == {r["layer"]: (_shown(r["top1"]) if r["top1"].strip() else "␣" * max(1, len(r["top1"])))
                    for r in arch}
    box = browser.find_element("id", "pin-input")
    box.send_keys(" Berlin\n")
    assert browser.find_element("id", "pin-status").get_attribute("data-token") == " Berlin"
    ranks = {c.get_attribute("data-layer"): c.get_attribute("data-rank") for c in cells}
    assert ranks == {r["layer"]: r["answer_rank"] for r in arch}
    ticks = [t.text for t in browser.find_elements("css selector", "svg.chart text.xtick")]
    assert "0" in ticks and "30" in ticks
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def _same_answer_rows(got: list[dict], want: list[dict]) -> bool:
    return [r["rank"] for r in got] == [r["rank"] for r in want] and all(
        g["p"] == pytest.approx(w["p"], rel=1e-4, abs=1e-9) for g, w in zip(got, want))


def test_200_requests_from_20_clients_are_answered_200_or_429_and_correct(server):
    prompts = {"The capital of France is": " Paris", "The capital of Italy is": " Rome",
               "The capital of Spain is": " Madrid", "Two plus two is": " four"}
    expected = {}
    for prompt, answer in prompts.items():
        status, data = server.lens(prompt=prompt, answer=answer.strip(), client="reference")
        assert status == 200
        expected[prompt] = data["answer_last"]
    rss_before = server.rss_kb()
    statuses, wrong = [], []
    lock = threading.Lock()

    def client(number: int) -> None:
        for k in range(10):
            prompt = list(prompts)[(number + k) % len(prompts)]
            status, data = server.lens(prompt=prompt, answer=prompts[prompt].strip(), client=f"load-{number}")
            with lock:
                statuses.append(status)
                if status == 200 and not _same_answer_rows(data["answer_last"], expected[prompt]):
                    wrong.append(prompt)
            if status == 429:
                time.sleep(1.0)  # a polite client backs off

    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(client, range(20), timeout=240))
    elapsed = time.monotonic() - started
    assert len(statuses) == 200 and set(statuses) <= {200, 429} and statuses.count(200) >= 10
    assert wrong == []
    growth = server.rss_kb() / rss_before - 1
    assert growth < 0.10, f"RSS grew {growth:.1%}"
    assert server.call("GET", "/api/info")[0] == 200
    print(f"load: {statuses.count(200)} × 200, {statuses.count(429)} × 429 in {elapsed:.1f} s; RSS {growth:+.1%}")


@pytest.mark.parametrize("case", ["no token", "wrong token", "path in a field", "unknown lens path",
                                  "10 MB body", "malformed JSON", "100k characters", "too many tokens",
                                  "not an object", "generate out of range"])
def test_hostile_requests_get_one_line_4xx_and_the_server_lives(server, case):
    body = {"no token": {"prompt": "hi"}, "wrong token": {"prompt": "hi"},
            "path in a field": {"prompt": "hi", "lens_path": "/etc/passwd"},
            "unknown lens path": {"prompt": "hi", "lens": "/etc/passwd"},
            "10 MB body": None, "malformed JSON": None, "100k characters": {"prompt": "a" * 100_000},
            "too many tokens": {"prompt": "word " * 3000}, "not an object": [1, 2],
            "generate out of range": {"prompt": "hi", "generate": 10_000}}[case]
    raw = (b"x" * 10_000_000 if case == "10 MB body" else b'{"prompt": "hi",' if case == "malformed JSON"
           else json.dumps(body).encode())
    token = None if case == "no token" else "wrong-token-of-enough-length" if case == "wrong token" else "own"
    status, answer = server.call("POST", "/api/lens", raw, token=token)
    expected = {"no token": 401, "wrong token": 401, "10 MB body": 413, "100k characters": 413,
                "too many tokens": 413, "malformed JSON": 400, "not an object": 400, "path in a field": 400}
    assert status == expected.get(case, 422)
    message = json.loads(answer)["error"]
    assert "\n" not in message and "Traceback" not in message and "root:" not in message  # no file was read
    assert server.call("GET", "/api/info")[0] == 200


def test_control_character_soup_is_read_not_fatal(server):
    soup = "".join(chr(c) for c in [*range(1, 32), 127, 0x202E, 0xFEFF, 0xD7FF, 0x85]) * 3
    status, data = server.lens(prompt=soup, answer="x")
    assert status == 200 and data["request"]["prompt"] == soup
    status, data = server.lens(prompt="a\x00b")
    assert status == 422 and "NUL" in data["error"]
    assert server.call("GET", "/", token=None)[0] == 401 and server.call("GET", "/api/info", token=None)[0] == 401


def test_the_download_holds_the_files_run_writes(server, tmp_path):
    import zipfile

    status, blob = server.call("POST", "/api/download", json.dumps({"prompt": PROMPT, "answer": "Berlin"}))
    assert status == 200
    (tmp_path / "r.zip").write_bytes(blob)
    names = set(zipfile.ZipFile(tmp_path / "r.zip").namelist())
    assert {f"output-{NAME}.json", f"output-{NAME}.html", f"output-{NAME}-records.csv",
            f"output-{NAME}-pure-next-token.csv", f"output-{NAME}-lens.png"} <= names


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_stop_it_cleanly(tiny_dirs, sig, code):
    served = Server([tiny_dirs["llama"]])
    try:
        assert served.lens(prompt="hello there", answer="x")[0] == 200
        pid = served.process.pid
        children = [int(c) for task in os.listdir(f"/proc/{pid}/task")
                    for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
    finally:
        code_seen = served.stop(sig)  # always: a failed test leaves no server behind
    assert code_seen == code
    for child in [pid, *children]:  # nothing of it left behind
        assert not os.path.exists(f"/proc/{child}")


def test_a_given_token_never_reaches_the_downloaded_files(tiny_dirs, tmp_path):
    import zipfile

    secret = "a-token-of-my-own-choosing-1234"
    served = Server([tiny_dirs["llama"], "--token", secret])
    try:
        assert served.token == secret
        status, blob = served.call("POST", "/api/download", json.dumps({"prompt": "hello there"}))
    finally:
        served.stop()
    assert status == 200
    (tmp_path / "r.zip").write_bytes(blob)
    with zipfile.ZipFile(tmp_path / "r.zip") as archive:
        texts = [archive.read(name) for name in archive.namelist()]
        argv = json.loads(archive.read("output-llama.json"))["provenance"]["argv"]
    assert "<token>" in argv and not any(secret.encode() in text for text in texts)


def test_binding_beyond_loopback_without_a_token_is_refused():
    done = subprocess.run([sys.executable, "-m", "layers_core", "serve", "--host", "0.0.0.0", "--no-token"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "without a token is refused" in done.stderr


def test_the_worker_drops_superseded_requests_and_refuses_a_full_queue():
    gate, computed = threading.Event(), []

    def compute(request):
        gate.wait(10)
        computed.append(request)
        return request

    worker = LensWorker(compute, queue_size=2)
    first = worker.submit("a", "a1")  # taken by the worker, waiting on the gate
    time.sleep(0.2)
    older, newer = worker.submit("a", "a2"), worker.submit("b", "b1")
    with pytest.raises(QueueFull):
        worker.submit("c", "c1")
    gate.set()
    assert first.result(10) == "a1" and newer.result(10) == "b1"
    latest = worker.submit("a", "a3")
    assert latest.result(10) == "a3" and older.result(10) == "a2"  # a2 was not superseded before it ran
    gate.clear()
    blocked = worker.submit("x", "x1")
    time.sleep(0.2)
    stale, fresh = worker.submit("a", "a4"), worker.submit("a", "a5")
    gate.set()
    with pytest.raises(Superseded):
        stale.result(10)
    assert fresh.result(10) == "a5" and blocked.result(10) == "x1"
    assert computed == ["a1", "a2", "b1", "a3", "x1", "a5"]
    assert worker.close()
