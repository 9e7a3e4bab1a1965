// The interactive report of layers_core: drawn from the JSON in #report-data, no library.
"use strict";
// renderReport(data, root) draws a page's data into root: the static report calls it once on
// the JSON in #report-data, the live explorer (layers-and-logits serve) on each answer.
(function () {
  let data, root, vocab;
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child instanceof Node ? child : String(child));
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    return node;
  }
  // about `count` round numbers from one at or below lo to one at or above hi
  function niceTicks(lo, hi, count = 5) {
    const span = hi - lo || 1, raw = span / count, power = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * power).find((m) => m >= raw) || raw;
    const ticks = [];
    const first = Math.floor(lo / step + 1e-9) * step, last = Math.ceil(hi / step - 1e-9) * step;  // enclosing lo..hi
    for (let v = first; v <= last + step * 1e-9; v += step) ticks.push(+v.toPrecision(12) + 0);
    return ticks;
  }
  // x ticks at round layers under a chart (class xtick: the browser tests read them)
  function layerTicks(box, X, n, y) {
    for (const layer of niceTicks(0, n, Math.min(6, Math.max(1, n))).filter((v) => Number.isInteger(v))) {
      box.append(svg("line", { x1: X(layer), x2: X(layer), y1: y, y2: y + 3, stroke: "#888" }));
      const t = svg("text", { x: X(layer), y: y + 12, "font-size": 9, "text-anchor": "middle", class: "xtick" });
      t.textContent = String(layer);
      box.append(t);
    }
  }
  const fmt = (p) => (p === null || p === undefined ? "–" : Number(p).toPrecision(4));
  const show = (text) => JSON.stringify(text).slice(1, -1);  // spaces and newlines made visible

  // ---- line charts: one metric per layer, one line per lens ----
  function lineChart(title, series, key, log) {
    const width = 330, height = 190, left = 46, bottom = 22, top = 16;
    const box = svg("svg", { width, height, class: "chart" });
    const text = svg("text", { x: left, y: 12, "font-size": 11 });
    text.textContent = title + (log ? " (log)" : "");
    box.append(text);
    // x is the row's depth (layer; a read after attention half a layer before its block's): a
    // lens with half-steps and one without share one axis
    const depth = (row, i) => (row.depth ?? i);
    const points = [];
    for (const rows of Object.values(series)) rows.forEach((row, i) => {
      const v = row[key];
      if (v !== null && v !== undefined && (!log || v > 0)) points.push([depth(row, i), v]);
    });
    if (!points.length) return box;
    const n = Math.max(...Object.values(series).flatMap((rows) => rows.map(depth))) || 1;
    const ys = points.map((p) => (log ? Math.log10(p[1]) : p[1]));
    let lo = Math.min(...ys), hi = Math.max(...ys);
    if (hi === lo) { hi += 1; lo -= log ? 1 : 0; }
    const X = (i) => left + (i / n) * (width - left - 8);
    const Y = (v) => top + (1 - ((log ? Math.log10(v) : v) - lo) / (hi - lo)) * (height - top - bottom);
    for (const label of [hi, lo]) {
      const y = top + (1 - (label - lo) / (hi - lo)) * (height - top - bottom);
      const t = svg("text", { x: 2, y: y + 4, "font-size": 9, class: "ytick" });
      t.textContent = log ? "1e" + label.toFixed(0) : label.toPrecision(3);
      box.append(t);
    }
    box.append(svg("line", { x1: left, x2: width - 8, y1: height - bottom, y2: height - bottom, stroke: "#bbb" }));
    layerTicks(box, X, n, height - bottom);
    Object.entries(series).forEach(([lens, rows], index) => {
      const path = rows.map((row, i) => [depth(row, i), row[key]]).filter(([, v]) => v !== null && v !== undefined && (!log || v > 0))
        .map(([i, v], j) => (j ? "L" : "M") + X(i).toFixed(1) + " " + Y(v).toFixed(1)).join(" ");
      box.append(svg("path", { d: path, fill: "none", stroke: COLORS[index % COLORS.length], "stroke-width": 1.5,
                               "data-lens": lens }));
    });
    return box;
  }
  function charts(series) {
    const legend = el("div", { class: "legend" });
    Object.keys(series).forEach((lens, i) => legend.append(el("span", { style: "color:" + COLORS[i % COLORS.length] }, "━ " + lens + " lens")));
    return el("div", {}, legend, el("div", { class: "charts" },
      lineChart("entropy (bits)", series, "entropy", false), lineChart("p(answer)", series, "p_answer", true),
      lineChart("answer rank", series, "answer_rank", true), lineChart("KL to final (bits)", series, "kl_to_final_bits", false)));
  }

  // ---- the diagnostics in words ----
  function diagnostics(d) {
    const list = el("ul", { class: "diag" });
    const m = d.milestones;
    const say = (text, cls) => list.append(el("li", cls ? { class: cls } : {}, text));
    say(`Lens: ${d.norm}. The answer first reaches rank 1 at layer ${m.first_rank_le_1 ?? "— (never)"}` +
        `, rank ≤ 5 at ${m.first_rank_le_5 ?? "—"}; it stays rank 1 from layer ${m.L_semantic_stable ?? "— (it does not stay)"}.`);
    say(`Copy collapse (the model echoing a prompt token): ${m.L_copy ?? "none"}. KL to the final distribution first ≤ 1 bit at layer ${m["first_kl_below_1.0"] ?? "—"}.`);
    if (d.last_layer_kl_bits !== undefined && d.last_layer_kl_bits !== null)
      say(`Last-layer check: the lens reproduces the model within ${Number(d.last_layer_kl_bits).toExponential(2)} bits ` +
          `(tolerance ${d.last_layer_tolerance_bits}) — ${d.last_layer_passed ? "passed" : "FAILED"}.`, d.last_layer_passed ? "ok" : "bad");
    if (d.norm_only_semantic) say("At a sampled layer the answer is rank 1 only after normalisation (the raw residual ranks it lower): read that layer with care.", "bad");
    if (d.control) say(`Control: ${d.control}.`);
    return list;
  }

  // ---- the heatmap: hover a cell for its top-k, pin a token to see its rank everywhere ----
  // a word typed without a leading space follows the prompt as --answer does: the answer's own
  // text pins the answer's token; another word takes the answer's joining (" Paris" after a word)
  function typedToken(text, answer, typing) {
    if (text === "" || /^\s/.test(text) || !typing) return text === "" ? null : text;
    if (answer && text.trim() === typing.text) return answer;
    const order = typing.join === "space" ? [" " + text, text] : [text, " " + text];
    return order.find((t) => vocab.includes(t)) ?? order[0];
  }

  function heatmapView(heat, answer, answerLast, typing) {
    const tip = document.getElementById("tip") || document.body.appendChild(el("div", { id: "tip" }));
    const status = el("span", { id: "pin-status" });
    const input = el("input", { id: "pin-input", list: "vocab-list", placeholder: "a token, e.g. \" Berlin\"" });
    const datalist = el("datalist", { id: "vocab-list" }, ...vocab.map((t) => el("option", { value: t })));
    const table = el("table", { class: "heat", id: "heatmap" });
    const cells = [];
    const last = heat.positions.length - 1;
    for (let r = heat.layers.length - 1; r >= 0; r--) {  // the last layer on top, as the layers stack
      const tr = el("tr", {}, el("th", {}, heat.layers[r]));
      heat.cells[r].forEach((cell, c) => {
        const td = el("td", { class: "cell", "data-layer": heat.layers[r], "data-pos": heat.positions[c] });
        td.addEventListener("mouseenter", (event) => showTip(event, r, c));
        td.addEventListener("mouseleave", () => { tip.style.display = "none"; });
        td.addEventListener("click", () => pin(vocab[cell[1][0]]));
        cells.push([td, r, c]);
        tr.append(td);
      });
      table.append(tr);
    }
    table.append(el("tr", {}, el("th", {}, "layer"), ...heat.tokens.map((t, c) => el("th", { class: "pos" }, heat.positions[c] + " " + show(t)))));
    function rankIn(r, c, token) {
      const cell = heat.cells[r][c];
      if (c === last && token === answer && answerLast && answerLast[r]) return answerLast[r].rank;
      const k = cell[1].indexOf(vocab.indexOf(token));
      return k >= 0 ? k + 1 : null;  // beyond the recorded top-k
    }
    function showTip(event, r, c) {
      const [entropy, ids, probs] = heat.cells[r][c];
      const rows = ids.map((id, k) => el("tr", { class: "tip-row" }, el("td", {}, String(k + 1)),
        el("td", { class: "tok", onclick: () => pin(vocab[id]) }, show(vocab[id])), el("td", { class: "prob" }, fmt(probs[k]))));
      let line = "";
      if (answer) {
        const rank = rankIn(r, c, answer);
        const exact = c === last && answerLast ? answerLast[r] : null;
        line = `answer ${show(answer)}: ` + (exact ? `rank ${exact.rank}, p ${fmt(exact.p)}` :
          rank ? `rank ${rank}, p ${fmt(probs[rank - 1])}` : `not in the top ${ids.length}`);
      }
      tip.replaceChildren(el("div", {}, `layer ${heat.layers[r]}, position ${heat.positions[c]} ${show(heat.tokens[c])}`),
        el("div", { class: "entropy" }, `entropy ${fmt(entropy)} bits`), el("div", { class: "answer" }, line),
        el("table", {}, ...rows));
      tip.style.display = "block";
      tip.style.left = Math.min(event.clientX + 12, window.innerWidth - 260) + "px";
      tip.style.top = Math.min(event.clientY + 12, window.innerHeight - 200) + "px";
    }
    function paint(token) {
      for (const [td, r, c] of cells) {
        const [, ids, probs] = heat.cells[r][c];
        if (token === null) {
          const top1 = vocab[ids[0]] ?? "";
          td.textContent = top1.trim() === "" ? "␣".repeat(top1.length || 1) : show(top1);  // blank tokens made visible
          td.dataset.rank = "";
          const alpha = Math.min(1, probs[0] || 0);
          td.style.background = `rgba(31,119,180,${alpha.toFixed(3)})`;
          td.style.color = alpha > 0.55 ? "#fff" : "#222";
        } else {
          const rank = rankIn(r, c, token);
          td.textContent = rank ? String(rank) : ">" + ids.length;
          td.dataset.rank = rank ? String(rank) : "";
          const alpha = rank ? 1 / Math.sqrt(rank) : 0;
          td.style.background = rank ? `rgba(214,39,40,${alpha.toFixed(3)})` : "#f4f4f4";
          td.style.color = alpha > 0.55 ? "#fff" : "#222";
        }
      }
    }
    function pin(token) {
      input.value = token === null ? "" : token;
      paint(token);
      status.textContent = token === null ? "cells: top-1 token, coloured by its probability" :
        `cells: the rank of ${show(token)} (">k": beyond the recorded top-k)`;
      status.dataset.token = token === null ? "" : token;
    }
    input.addEventListener("keydown", (event) => { if (event.key === "Enter") pin(typedToken(input.value, answer, typing)); });
    pin(null);  // open on the probabilities: the answer's ranks are a click away
    return el("div", {}, el("div", { id: "controls" }, "Pin a token: ", input, datalist,
      el("button", { onclick: () => pin(typedToken(input.value, answer, typing)) }, "pin"),
      answer ? el("button", { id: "pin-answer", onclick: () => pin(answer) }, "answer " + show(answer)) : "",
      el("button", { id: "pin-top1", onclick: () => pin(null) }, "top-1"), status), el("div", { class: "scroll" }, table));
  }

  // ---- a continuation: each token coloured by the layer where it got decided ----
  const RULES = { commit: "top-1 through the last layer", top5: "first in the top 5", p_half: "first p > 0.5" };
  function depthColor(layer, n) {  // early (blue) → late (red); never: grey
    if (layer === null || layer === undefined) return "#ddd";
    const f = n ? layer / n : 0;
    return `hsl(${(220 - 220 * f).toFixed(0)},70%,${(78 - 18 * f).toFixed(0)}%)`;
  }
  function stripView(strip) {
    const lenses = Object.keys(strip.lenses);
    let lens = lenses[0], rule = "commit";
    const layerNames = strip.lenses[lens][0].top.map((_, layer) => String(layer));  // block outputs, 0 = embeddings
    const n = layerNames.length - 1;
    const tip = document.getElementById("tip") || document.body.appendChild(el("div", { id: "tip" }));
    const text = el("div", { id: "continuation-strip", class: "strip" });
    const column = el("div", { id: "continuation-column" });
    const ruleButtons = Object.entries(RULES).map(([key, label]) =>
      el("button", { "data-rule": key, onclick: () => { rule = key; paint(); } }, label));
    const lensSelect = el("select", { id: "strip-lens", onchange: () => { lens = lensSelect.value; paint(); } },
      ...lenses.map((name) => el("option", { value: name }, name + " lens")));
    const legend = el("div", { class: "strip-legend" }, "layer 0 ",
      ...[0, 0.25, 0.5, 0.75, 1].map((f) => el("span", { class: "swatch", style: "background:" + depthColor(f * n, n) }, " ")),
      ` ${n}; grey: never`);
    function showTip(event, token) {
      const rows = token.top.map((ids, layer) => el("tr", {}, el("td", {}, layerNames[layer]),
        ...ids.slice(0, 3).map((id, k) => el("td", { class: vocab[id] === token.token ? "own" : "" }, show(vocab[id]) + " " + fmt(token.probs[layer][k]))))).reverse();
      tip.replaceChildren(el("div", {}, `position ${token.pos}: ${show(token.token)}, final p ${fmt(token.p_final)}`),
        el("div", {}, `${RULES.commit}: ${token.commit ?? "never"}; top 5 from ${token.top5 ?? "never"}; p > 0.5 from ${token.p_half ?? "never"}`),
        el("table", {}, ...rows));
      tip.style.display = "block";
      tip.style.left = Math.min(event.clientX + 12, window.innerWidth - 320) + "px";
      tip.style.top = Math.min(event.clientY + 12, window.innerHeight - 300) + "px";
    }
    function open(token) {  // that position's column of the lens heatmap: each layer's top-5
      const rows = token.top.map((ids, layer) => {
        const alpha = Math.min(1, token.probs[layer][0] || 0);
        return el("tr", {}, el("th", {}, layerNames[layer]), ...ids.map((id, k) => el("td", {
          class: "cell" + (vocab[id] === token.token ? " own" : ""), "data-layer": layerNames[layer], "data-k": k + 1,
          style: k ? "" : `background:rgba(31,119,180,${alpha.toFixed(3)});color:${alpha > 0.55 ? "#fff" : "#222"}`,
        }, show(vocab[id]) + " " + fmt(token.probs[layer][k]))));
      }).reverse();
      column.dataset.pos = String(token.pos);
      column.replaceChildren(el("h3", {}, `Position ${token.pos} → ${show(token.token)}: top 5 at every layer (${lens} lens)`),
        el("table", { class: "heat column" }, ...rows));
    }
    function paint() {
      for (const button of ruleButtons) button.classList.toggle("on", button.dataset.rule === rule);
      text.replaceChildren(...strip.lenses[lens].map((token) => {
        const layer = token[rule];
        const span = el("span", { class: "tok", "data-pos": token.pos, "data-layer": layer ?? "",
                                  style: "background:" + depthColor(layer, n) }, token.token);
        span.addEventListener("mouseenter", (event) => showTip(event, token));
        span.addEventListener("mouseleave", () => { tip.style.display = "none"; });
        span.addEventListener("click", () => open(token));
        return span;
      }));
    }
    paint();
    return el("div", {}, el("div", { class: "strip-controls" }, "Colour by the layer where the token is ", ...ruleButtons,
      lenses.length > 1 ? lensSelect : "", legend), text, column);
  }

  // ---- one prompt ----
  function provenance(facts) {
    if (!facts) return "";
    const labels = { model_path: "model", model_source: "source", gguf_sha256: "GGUF sha256", dtype: "dtype", device: "device",
                     started_at: "run", torch_version: "torch", transformers_version: "transformers",
                     transformer_lens_version: "TransformerLens", layers_core_version: "layers_core" };
    return el("div", { id: "provenance", class: "provenance" }, ...Object.entries(facts).map(([key, value]) =>
      el("span", { "data-key": key }, el("b", {}, (labels[key] || key) + ": "), value)));
  }

  function promptReport() {
    root.append(el("h1", {}, data.title), provenance(data.provenance), diagnostics(data.diagnostics));
    root.append(el("h2", {}, "Lens heatmap"), heatmapView(data.heatmap, data.answer, data.answer_last, data.typing));
    if (data.continuation) root.append(el("h2", {}, `Continuation (${data.continuation.source.replace("_", "-")}): where each token got decided`),
      stripView(data.continuation));
    root.append(el("h2", {}, "Per layer, every lens of the run"), charts(data.curves));
    if (data.attribution) root.append(el("h2", {}, "Which block wrote the answer (direct logit attribution)"), attributionChart(data.attribution));
  }

  function attributionChart(rows) {
    const width = 700, height = 220, left = 52, top = 10, bottom = 40;
    const box = svg("svg", { width, height, class: "chart", id: "attribution" });
    const tip = document.getElementById("tip") || document.body.appendChild(el("div", { id: "tip" }));
    const values = rows.map((r) => r.logit).concat([0]);  // the drawn bars only
    const ticks = niceTicks(Math.min(...values), Math.max(...values), 4);
    const lo = Math.min(ticks[0], ...values), hi = Math.max(ticks[ticks.length - 1], ...values);
    const n = Math.max(...rows.map((r) => r.layer)) + 1;
    const X = (layer) => left + (layer + 0.5) / n * (width - left - 8);
    const Y = (v) => top + (1 - (v - lo) / (hi - lo || 1)) * (height - top - bottom);
    const colors = { embed: "#888", attn: "#1f77b4", mlp: "#ff7f0e", norm_bias: "#9467bd" };
    const offset = { embed: 0, attn: -0.2, mlp: 0.2, norm_bias: 0 };
    const barWidth = Math.max(2, (width - left) / n * 0.35);
    for (const v of ticks) {
      box.append(svg("line", { x1: left, x2: width - 8, y1: Y(v), y2: Y(v), stroke: "#eee" }));
      const t = svg("text", { x: left - 4, y: Y(v) + 3, "font-size": 9, "text-anchor": "end", class: "ytick" });
      t.textContent = String(v);
      box.append(t);
    }
    const name = { embed: "embedding", attn: "attention", mlp: "MLP", norm_bias: "final norm bias" };
    for (const r of rows) {
      const x = X(r.layer + offset[r.component]) - barWidth / 2;
      const bar = svg("rect", { x, width: barWidth, y: Math.min(Y(r.logit), Y(0)), height: Math.max(0.5, Math.abs(Y(r.logit) - Y(0))),
                                fill: colors[r.component], "data-component": r.component, "data-layer": r.layer });
      bar.addEventListener("mouseenter", (event) => {
        tip.replaceChildren(el("div", {}, `${name[r.component] || r.component} of block ${r.layer}: ${Number(r.logit).toFixed(3)} to the answer logit`),
          el("div", {}, `running sum ${Number(r.cumulative).toFixed(3)}`));
        tip.style.display = "block";
        tip.style.left = Math.min(event.clientX + 12, window.innerWidth - 320) + "px";
        tip.style.top = event.clientY + 12 + "px";
      });
      bar.addEventListener("mouseleave", () => { tip.style.display = "none"; });
      box.append(bar);
    }
    box.append(svg("line", { x1: left, x2: width, y1: Y(0), y2: Y(0), stroke: "#000", "stroke-width": 0.5 }));
    layerTicks(box, (layer) => X(layer), n - 1, height - bottom);
    const yLabel = svg("text", { x: 2, y: top + 8, "font-size": 9 });
    yLabel.textContent = "logit";
    const legend = svg("text", { x: left, y: height - 6, "font-size": 10 });
    legend.textContent = "block (x); bars: embed (grey), attention (blue), MLP (orange) parts of the answer logit; hover for values";
    box.append(yLabel, legend);
    return box;
  }

  // ---- a set's per-layer curves: the mean over prompts with its bootstrap band ----
  function bandCharts(curves) {
    const wrap = el("div", { class: "charts", id: "layer-curves" });
    const probabilities = Object.keys(curves).filter((c) => !["entropy", "answer_rank", "kl_to_final_bits"].includes(c));
    const panels = (probabilities.length ? [probabilities] : []).concat(
      ["entropy", "answer_rank", "kl_to_final_bits"].filter((c) => c in curves).map((c) => [c]));
    for (const columns of panels) {
      const width = 330, height = 190, left = 46, bottom = 22, top = 16;
      const log = columns[0] === "answer_rank";
      const box = svg("svg", { width, height, class: "chart" });
      const rows = columns.flatMap((c) => curves[c].filter((r) => r.mean !== null));
      const values = rows.flatMap((r) => [r.low, r.high, r.mean]).filter((v) => v !== null && (!log || v > 0)).map((v) => (log ? Math.log10(v) : v));
      const n = Math.max(1, ...rows.map((r) => r.layer));
      let lo = Math.min(...values), hi = Math.max(...values);
      if (!values.length) { lo = 0; hi = 1; }
      if (hi === lo) hi += 1;
      const X = (layer) => left + (layer / n) * (width - left - 8);
      const Y = (v) => top + (1 - ((log ? Math.log10(Math.max(v, 1e-300)) : v) - lo) / (hi - lo)) * (height - top - bottom);
      const title = svg("text", { x: left, y: 12, "font-size": 11 });
      title.textContent = (log ? "answer rank (log)" : columns.length > 1 || probabilities.includes(columns[0]) ? "probability" : columns[0]) +
        " — " + columns.map((c) => c + " n=" + Math.max(0, ...curves[c].map((r) => r.n))).join(", ");
      box.append(title);
      columns.forEach((column, index) => {
        const shown = curves[column].filter((r) => r.mean !== null);
        if (!shown.length) return;
        const color = COLORS[index % COLORS.length];
        const band = shown.map((r) => X(r.layer).toFixed(1) + "," + Y(r.high).toFixed(1))
          .concat(shown.slice().reverse().map((r) => X(r.layer).toFixed(1) + "," + Y(r.low).toFixed(1)));
        box.append(svg("polygon", { points: band.join(" "), fill: color, "fill-opacity": 0.18, stroke: "none", "data-column": column }));
        const path = shown.map((r, j) => (j ? "L" : "M") + X(r.layer).toFixed(1) + " " + Y(r.mean).toFixed(1)).join(" ");
        box.append(svg("path", { d: path, fill: "none", stroke: color, "stroke-width": 1.5, "data-column": column }));
      });
      for (const label of [hi, lo]) {
        const t = svg("text", { x: 2, y: top + (1 - (label - lo) / (hi - lo)) * (height - top - bottom) + 4, "font-size": 9, class: "ytick" });
        t.textContent = log ? "1e" + label.toFixed(0) : label.toPrecision(3);
        box.append(t);
      }
      layerTicks(box, X, n, height - bottom);
      wrap.append(box);
    }
    return wrap;
  }

  // ---- a prompt set: sortable table, a prompt's view, milestone distributions ----
  function setReport() {
    root.append(el("h1", {}, data.title), provenance(data.provenance));
    const columns = data.columns;
    const table = el("table", { class: "summary", id: "prompt-table" });
    const head = el("tr", {});
    let order = data.summary.map((_, i) => i), sortKey = null, ascending = true;
    columns.forEach((column) => head.append(el("th", { "data-column": column, onclick: () => sort(column) }, column)));
    const body = el("tbody", {});
    table.append(el("thead", {}, head), body);
    const detail = el("div", { id: "detail" });
    function compare(a, b) {
      const x = data.summary[a][sortKey], y = data.summary[b][sortKey];
      if (x === y) return a - b;
      if (x === null || x === "" || x === undefined) return 1;
      if (y === null || y === "" || y === undefined) return -1;
      return (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y))) * (ascending ? 1 : -1);
    }
    function sort(column) {
      ascending = sortKey === column ? !ascending : true;
      sortKey = column;
      order = data.summary.map((_, i) => i).sort(compare);
      fill();
    }
    function fill() {
      body.replaceChildren(...order.map((i) => {
        const row = data.summary[i];
        return el("tr", { class: "prompt", "data-prompt-id": row.prompt_id, onclick: (event) => open(row.prompt_id, event.currentTarget) },
          ...columns.map((c) => el("td", { "data-column": c }, row[c] === null || row[c] === undefined ? "" :
            typeof row[c] === "string" ? show(row[c]) : String(row[c]))));
      }));
    }
    function open(id, tr) {
      for (const other of body.querySelectorAll("tr.selected")) other.classList.remove("selected");
      if (tr) tr.classList.add("selected");
      const prompt = data.prompts[id];
      if (!prompt) return;
      const top = el("table", { class: "topk" }, ...prompt.top.map((ids, layer) => el("tr", {}, el("td", {}, "layer " + layer),
        ...ids.map((t, k) => el("td", {}, show(vocab[t]) + " " + fmt(prompt.probs[layer][k]))))));
      detail.replaceChildren(el("h2", {}, "Prompt " + id), charts(prompt.curves), el("h2", {}, "Last position, top-5 per layer"), top);
      if (prompt.heatmap) detail.append(el("h2", {}, "Lens heatmap (--records)"), heatmapView(prompt.heatmap, null, null, null));
    }
    fill();
    root.append(el("div", { class: "summary-wrap" }, table), detail);
    if (data.layer_curves) root.append(el("h2", {}, "Per-layer curves over the set (mean, 95% bootstrap band)"), bandCharts(data.layer_curves));
    root.append(el("h2", {}, "Milestones as fractions of depth (one dot per prompt, | the median)"), milestoneStrips());
    if (data.comparison) root.append(el("h2", {}, "Models side by side (median and quartiles of the depth fraction)"), comparisonPanels(data.comparison));
    if (data.summary.length) open(data.summary[0].prompt_id, body.firstChild);
  }

  // one strip per milestone (per model in a comparison): dots at equal depth stack up, | the
  // median, and how many prompts reach the milestone at all
  function milestoneStrips() {
    const width = 640, rowHeight = 34, left = 150, right = 90;
    const keys = data.milestones.filter((key) => data.columns.includes(key));
    const models = data.columns.includes("model") ? [...new Set(data.summary.map((row) => row.model))] : [null];
    const strips = keys.flatMap((key) => models.map((model) => [key, model]));
    const box = svg("svg", { width, height: rowHeight * strips.length + 24, id: "milestones" });
    const X = (f) => left + f * (width - left - right);
    strips.forEach(([key, model], i) => {
      const y = 18 + i * rowHeight;
      const rows = data.summary.filter((row) => model === null || row.model === model);
      const label = svg("text", { x: 0, y: y + 4, "font-size": 11 });
      label.textContent = model === null ? key : key.replace("_fraction", "") + " · " + String(model).split("/").pop().slice(0, 14);
      box.append(label, svg("line", { x1: left, x2: width - right, y1: y, y2: y, stroke: "#ccc" }));
      const fractions = rows.map((row) => row[key]).filter((v) => typeof v === "number")
        .map((v) => (key.endsWith("_fraction") ? v : v / data.n_layers)).sort((a, b) => a - b);
      const stacks = new Map();
      for (const f of fractions) {
        const bucket = Math.round(X(f) / 5);  // dots within 5 px share a column
        const k = stacks.get(bucket) || 0;
        stacks.set(bucket, k + 1);
        const dy = (k % 2 ? 1 : -1) * Math.ceil(k / 2) * 4;
        box.append(svg("circle", { cx: X(f), cy: y + Math.max(-14, Math.min(14, dy)), r: 2.2, fill: "#1f77b4", "fill-opacity": 0.6,
                                   "data-key": key }));
      }
      if (fractions.length) {
        const median = fractions[Math.floor((fractions.length - 1) / 2)];
        box.append(svg("line", { x1: X(median), x2: X(median), y1: y - 12, y2: y + 12, stroke: "#d62728", "stroke-width": 2,
                                 class: "median", "data-key": key, "data-model": model ?? "" }));
      }
      const count = svg("text", { x: width - right + 6, y: y + 4, "font-size": 10, class: "reached", "data-key": key,
                                  "data-model": model ?? "" });
      count.textContent = `${fractions.length} / ${rows.length} reached`;
      box.append(count);
    });
    const axisY = 18 + strips.length * rowHeight - 12;
    for (const f of [0, 0.25, 0.5, 0.75, 1]) {
      const t = svg("text", { x: X(f), y: axisY, "font-size": 9, "text-anchor": "middle", class: "xtick" });
      t.textContent = String(f);
      box.append(t);
    }
    return box;
  }

  function comparisonPanels(stats) {
    const wrap = el("div", { class: "charts", id: "comparison" });
    const models = Object.keys(stats);
    const milestones = Object.keys(stats[models[0]] || {});
    for (const key of milestones) {
      const width = 260, height = 30 + 22 * models.length, left = 110;
      const box = svg("svg", { width, height, class: "chart" });
      const title = svg("text", { x: 4, y: 12, "font-size": 11 });
      title.textContent = key;
      box.append(title);
      models.forEach((model, i) => {
        const s = stats[model][key], y = 28 + i * 22;
        const label = svg("text", { x: 4, y: y + 4, "font-size": 10 });
        label.textContent = model.slice(0, 16);
        box.append(label);
        if (s.median === null) return;
        const X = (f) => left + f * (width - left - 10);
        box.append(svg("line", { x1: X(s.q1), x2: X(s.q3), y1: y, y2: y, stroke: COLORS[i % COLORS.length], "stroke-width": 6, "stroke-opacity": 0.4 }));
        box.append(svg("circle", { cx: X(s.median), cy: y, r: 4, fill: COLORS[i % COLORS.length] }));
      });
      wrap.append(box);
    }
    return wrap;
  }

  function renderReport(pageData, rootNode) {
    data = pageData;
    root = rootNode;
    vocab = data.vocab;
    root.replaceChildren();
    if (data.kind === "set") setReport(); else promptReport();
  }
  window.renderReport = renderReport;
  const embedded = document.getElementById("report-data");
  if (embedded) renderReport(JSON.parse(embedded.textContent), document.getElementById("report"));
})();
