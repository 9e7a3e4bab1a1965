"""Benchmark: the explorer's latency (``layers-and-logits serve``) against its floor.

``venv/bin/python 001_layers_and_logits/bench_serve.py [--requests 30] [--tokens 30] [--browser]``

The server runs as a subprocess on 127.0.0.1 with the bundled model on the CPU (as a user starts
it); a prompt of ``--tokens`` tokens (with an answer, so attribution runs too) is sent again and
again, alternating with the floor in this process, one at a time (never both at once):

- ``floor_s``: ``lc.sweep(...).report_data()`` in this process: the same lens work and the
  same page data, no HTTP, no queue, no JSON;
- ``served_s``: POST ``/api/lens`` until the JSON answer is parsed here.

With ``--browser``, headless Chromium also types the prompt ``--requests`` times into the page
and reads the page's own time (request, JSON and drawing: what a user waits for). The last line
printed is one JSON object: medians and 95th percentiles, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WORDS = ("The capital of Germany is Berlin, the capital of France is Paris, and the capital of Italy, "
         "which lies on the Tiber, is called").split()


def prompt_of(tokenizer, tokens: int) -> str:
    """A sentence of exactly ``tokens`` tokens (BOS included where the tokenizer adds one)."""
    words = []
    while True:
        for word in WORDS:
            words.append(word)
            text = " ".join(words)
            if len(tokenizer(text)["input_ids"]) >= tokens:
                return text


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _browser_times(url: str, prompt: str, count: int) -> list[float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from conftest import _browser_paths

    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(url)
        status = driver.find_element("id", "status")
        WebDriverWait(driver, 120).until(lambda _: status.get_attribute("data-state") == "done")
        times = []
        for index in range(count):
            box = driver.find_element("id", "prompt")
            text = prompt if index % 2 else prompt + " "  # a changed prompt each time
            driver.execute_script("arguments[0].value = arguments[1]", box, text)
            driver.find_element("id", "run").click()
            WebDriverWait(driver, 120).until(lambda _: status.get_attribute("data-state") == "done"
                                             and driver.find_element("id", "report").get_attribute("data-prompt")
                                             == text)
            times.append(float(status.text.split()[0]) / 1000)
        return times
    finally:
        driver.quit()


def bench(requests: int, tokens: int, browser: bool) -> dict:
    from test_serve import Server

    import layers_core as lc
    from layers_core.pipeline.sweep import SweepSettings

    lm = lc.load(None, device="cpu", dtype="float32")
    lm.threads = threads = len(os.sched_getaffinity(0))  # fixed on both sides: each would see the other busy
    prompt = prompt_of(lm.bridge.tokenizer, tokens)
    settings = SweepSettings(attribution=True)
    server = Server(["--threads", str(threads)])
    try:
        for _ in range(2):  # warm-up, both sides
            assert server.lens(prompt=prompt, answer="Rome")[0] == 200
            lc.sweep(lm, prompt, "Rome", control=False, settings=settings).report_data()
        floor, served = [], []
        for _ in range(requests):
            started = time.perf_counter()
            lc.sweep(lm, prompt, "Rome", control=False, settings=settings).report_data()
            floor.append(time.perf_counter() - started)
            started = time.perf_counter()
            status, _ = server.lens(prompt=prompt, answer="Rome")
            served.append(time.perf_counter() - started)
            assert status == 200
        page = _browser_times(server.url, prompt, requests) if browser else []
    finally:
        server.stop()
    row = {"model": lm.source.clean_name, "prompt_tokens": len(lm.bridge.tokenizer(prompt)["input_ids"]),
           "requests": requests, "threads": threads, "floor_median_s": statistics.median(floor),
           "floor_p95_s": percentile(floor, 0.95), "served_median_s": statistics.median(served),
           "served_p95_s": percentile(served, 0.95)}
    row["ratio"] = row["served_median_s"] / row["floor_median_s"]
    if page:
        row.update(page_median_s=statistics.median(page), page_p95_s=percentile(page, 0.95))
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--browser", action="store_true", help="also time the page in headless Chromium")
    args = parser.parse_args()
    print(json.dumps(bench(args.requests, args.tokens, args.browser)))


if __name__ == "__main__":
    main()
