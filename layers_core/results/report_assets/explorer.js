// The live explorer's controls (layers-and-logits serve): each prompt goes to the server, each
// answer is drawn by the report's renderer (renderReport, report.js). A newer request makes the
// page ignore older answers, and the server drops the older requests it has not started.
"use strict";
(function () {
  const token = new URLSearchParams(location.search).get("token") || "";
  const info = JSON.parse(document.getElementById("explorer-info").textContent);
  const client = Math.random().toString(36).slice(2) + Date.now().toString(36);
  const $ = (id) => document.getElementById(id);
  const prompt = $("prompt"), answer = $("answer"), lens = $("lens"), generate = $("generate");
  const status = $("status"), out = $("report");
  for (const name of info.lenses) lens.append(new Option(name + " lens", name));
  lens.value = info.default_lens;
  let sent = 0, timer = null;

  function request() {
    return { prompt: prompt.value, answer: answer.value.trim() || null, lens: lens.value,
             generate: Math.max(0, Math.min(info.max_generate, Number(generate.value) || 0)), client };
  }
  function post(path, body) {
    return fetch(path, { method: "POST", body: JSON.stringify(body),
                         headers: { "content-type": "application/json", authorization: "Bearer " + token } });
  }
  function say(text, state) {
    status.textContent = text;
    status.dataset.state = state;
  }
  async function run() {
    clearTimeout(timer);
    if (!prompt.value.trim()) return;
    const number = ++sent, body = request(), started = performance.now();
    say("reading every layer…", "busy");
    let response;
    try {
      response = await post("/api/lens", body);
    } catch (error) {
      if (number === sent) say("the server does not answer: is it still running?", "error");
      return;
    }
    if (number !== sent) return;  // a newer prompt is on its way
    if (!response.ok) {
      const reason = await response.json().catch(() => ({ error: response.statusText }));
      if (response.status !== 409) say(`${response.status}: ${reason.error}`, "error");
      return;
    }
    const data = await response.json();
    if (number !== sent) return;
    window.renderReport(data, out);
    out.dataset.prompt = body.prompt;
    out.dataset.lens = body.lens;
    say(`${Math.round(performance.now() - started)} ms, ${body.lens} lens`, "done");
  }
  async function download() {
    say("writing the files…", "busy");
    const response = await post("/api/download", request());
    if (!response.ok) {
      const reason = await response.json().catch(() => ({ error: response.statusText }));
      say(`${response.status}: ${reason.error}`, "error");
      return;
    }
    const link = Object.assign(document.createElement("a"), { href: URL.createObjectURL(await response.blob()),
                                                             download: "layers-and-logits.zip" });
    link.click();
    URL.revokeObjectURL(link.href);
    say("downloaded layers-and-logits.zip", "done");
  }
  const later = () => { clearTimeout(timer); timer = setTimeout(run, 500); };
  prompt.addEventListener("input", later);
  answer.addEventListener("input", later);
  prompt.addEventListener("keydown", (event) => { if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); run(); } });
  answer.addEventListener("keydown", (event) => { if (event.key === "Enter") run(); });
  lens.addEventListener("change", run);
  generate.addEventListener("change", run);
  $("run").addEventListener("click", run);
  $("download").addEventListener("click", download);
  if (prompt.value.trim()) run();
})();
