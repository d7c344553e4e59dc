// MedGemma playground: calls the seed API of this service. Model output is only ever written with textContent.
"use strict";

(() => {
  const doc = document.documentElement;
  const APP = doc.dataset.app;
  const API = `${doc.dataset.root || ""}/${encodeURIComponent(APP)}/v1`;
  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("ask"), token: $("token"), file: $("image"), imageBox: $("image-box"), preview: $("preview"),
    fileInfo: $("file-info"), clearImage: $("clear-image"), question: $("question"), system: $("system"),
    maxTokens: $("max-tokens"), temperature: $("temperature"), submit: $("submit"), stop: $("stop"),
    status: $("status"), error: $("error"), answer: $("answer"), answerModel: $("answer-model"),
    metricsBox: $("metrics-box"), metrics: $("metrics"), imagesBox: $("images-box"), images: $("images"),
    rawBox: $("raw-box"), raw: $("raw"), modelName: $("model-name"), modelState: $("model-state"),
    dicomUrl: $("dicom-url"), dicomCredential: $("dicom-credential"), givenBox: $("given-box"),
    givenSummary: $("given-summary"), given: $("given"),
    modelDevice: $("model-device"), loadBox: $("load-box"), loadProgress: $("load-progress"),
    loadText: $("load-text"), loadError: $("load-error"), demo: $("demo-warning"),
    format: $("format"), constraint: $("constraint"), thinkingOn: $("thinking-on"), padSquare: $("pad-square"),
    thinkingBox: $("thinking-box"), thinkingSummary: $("thinking-summary"), thinking: $("thinking"),
    structuredBox: $("structured-box"), structuredRows: $("structured-rows"), boxesBox: $("boxes-box"),
    boxesNote: $("boxes-note"), boxesFigure: $("boxes-figure"), boxesImage: $("boxes-image"),
  };
  let sentImage = null; // data URL of the PNG/JPEG sent with the last request: boxes are drawn on it
  const PLACEHOLDERS = {
    json_schema: '{"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}',
    choice: "yes\nno",
    regex: "(yes|no)",
    grammar: 'start: "yes" | "no"',
  };
  el.answer.dataset.deltas = "0";
  $("api-base").textContent = `${API}/`;

  const METRIC_LABELS = {
    query_duration_seconds: ["Total time", "s"],
    time_to_first_token_seconds: ["Time to first token", "s"],
    queue_wait_seconds: ["Queue wait", "s"],
    input_tokens: ["Input tokens", ""],
    output_tokens: ["Output tokens", ""],
    output_tokens_per_second: ["Output tokens / s", ""],
    replica_cpu_percent: ["Replica CPU", "%"],
    replica_memory_mb: ["Replica memory", "MB"],
    replica_gpu_utilization_percent: ["GPU utilisation", "%"],
    replica_gpu_memory_allocated_mb: ["GPU memory allocated", "MB"],
    replica_gpu_memory_reserved_mb: ["GPU memory reserved", "MB"],
    replica_gpu_memory_used_mb: ["GPU memory used", "MB"],
    replica_gpu_memory_total_mb: ["GPU memory total", "MB"],
  };

  class ApiError extends Error {
    constructor(status, body, retryAfter) {
      super(describeError(status, body || {}, retryAfter));
      this.status = status;
    }
  }

  function describeError(status, body, retryAfter) {
    const msg = body.error || body.message || "request failed";
    if (status === 401) return `${msg} (401). Enter the service's API token in the “API token” field.`;
    if (status === 429) return `The server is busy (429): ${msg}. Try again in ${retryAfter || body.retry_after_seconds || 1} s.`;
    if (status === 503 && body.loading_error) return `Model loading failed (503): ${body.loading_error}`;
    return `${msg} (${status})`;
  }

  const sleep = (ms, signal) => new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(t);
      reject(new DOMException("Stopped", "AbortError"));
    }, { once: true });
  });

  function authHeaders(extra = {}) {
    const token = el.token.value.trim();
    return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
  }

  // -- model state -----------------------------------------------------------------------------------------------
  function renderHealth(h) {
    const state = h.model_state || "unknown";
    el.modelName.textContent = h.model || APP;
    el.modelState.textContent = state;
    el.modelState.dataset.state = state;
    el.modelDevice.textContent = h.device ? `on ${h.device}` : "";
    el.demo.hidden = !String(h.model || "").includes("random-weight demo");
    el.loadBox.hidden = state !== "loading";
    if (state === "loading") {
      const p = h.progress || {};
      if (typeof p.fraction === "number") el.loadProgress.value = p.fraction;
      else el.loadProgress.removeAttribute("value"); // indeterminate
      const parts = [];
      if (p.phase) parts.push(p.phase);
      if (p.files_total) parts.push(`${p.files_loaded || 0}/${p.files_total} files`);
      if (typeof p.fraction === "number") parts.push(`${Math.round(p.fraction * 100)} %`);
      if (p.elapsed_seconds != null) parts.push(`${p.elapsed_seconds} s`);
      el.loadText.textContent = parts.join(" · ");
    }
    el.loadError.hidden = state !== "failed";
    el.loadError.textContent = state === "failed" ? `Model loading failed: ${h.loading_error || "unknown error"}` : "";
    return state;
  }

  async function fetchHealth(signal) {
    const res = await fetch(`${API}/health`, { headers: authHeaders(), signal, cache: "no-store" });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw new ApiError(res.status, body);
    return body;
  }

  let healthTimer = null;
  async function pollHealth() {
    clearTimeout(healthTimer);
    let next = 10000;
    try {
      if (renderHealth(await fetchHealth()) === "loading") next = 1000;
    } catch (e) {
      el.modelState.textContent = "unreachable";
      el.modelState.dataset.state = "failed";
      next = 5000;
    }
    healthTimer = setTimeout(pollHealth, next);
  }

  async function waitUntilReady(signal, retryAfter) {
    for (;;) {
      const h = await fetchHealth(signal);
      const state = renderHealth(h);
      if (state === "ready") return;
      if (state === "failed") throw new Error(`Model loading failed: ${h.loading_error || "unknown error"}`);
      await sleep(Math.min(Math.max(retryAfter || 1, 1), 2) * 1000, signal);
    }
  }

  // -- image -----------------------------------------------------------------------------------------------------
  let previewUrl = null;

  function mimeFor(file) {
    const name = file.name.toLowerCase();
    if (/\.(dcm|dicom)$/.test(name)) return "application/dicom"; // browsers often give "" for .dcm
    if (file.type && file.type !== "application/octet-stream") return file.type;
    if (name.endsWith(".png")) return "image/png";
    if (/\.jpe?g$/.test(name)) return "image/jpeg";
    return "application/octet-stream"; // the server recognises the format from the bytes
  }

  function showFile() {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    const file = el.file.files[0];
    el.imageBox.hidden = !file;
    el.preview.hidden = true;
    el.preview.removeAttribute("src");
    if (!file) return;
    const mime = mimeFor(file);
    const kb = (file.size / 1024).toFixed(1);
    if (mime === "image/png" || mime === "image/jpeg") {
      previewUrl = URL.createObjectURL(file);
      el.preview.src = previewUrl;
      el.preview.hidden = false;
      el.fileInfo.textContent = `${file.name} · ${mime} · ${kb} KB`;
    } else {
      el.fileInfo.textContent = `${file.name} · ${mime} · ${kb} KB (no preview: the server converts it)`;
    }
  }

  function readImage(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => {
        const url = String(reader.result);
        resolve(`data:${mimeFor(file)};base64${url.slice(url.indexOf(","))}`);
      };
      reader.onerror = () => reject(new Error(`Could not read ${file.name}`));
      reader.readAsDataURL(file);
    });
  }

  // -- generation ------------------------------------------------------------------------------------------------
  function answerShape() {
    const kind = el.format.value;
    const value = el.constraint.value;
    if (kind === "json_object") return { response_format: { type: "json_object" } };
    if (kind === "json_schema") {
      let schema;
      try {
        schema = JSON.parse(value);
      } catch (e) {
        throw new Error(`The schema is not valid JSON: ${e.message}`);
      }
      return { response_format: { type: "json_schema", json_schema: { name: "playground", schema } } };
    }
    if (kind === "choice") {
      return { structured_outputs: { choice: value.split("\n").map((s) => s.trim()).filter(Boolean) } };
    }
    if (kind === "regex" || kind === "grammar") return { structured_outputs: { [kind]: value } };
    return {};
  }

  function showFormat() {
    const kind = el.format.value;
    el.constraint.hidden = !(kind in PLACEHOLDERS);
    el.constraint.required = !el.constraint.hidden;
    el.constraint.placeholder = PLACEHOLDERS[kind] || "";
  }

  async function buildPayload() {
    const payload = { text: el.question.value, max_new_tokens: Number(el.maxTokens.value), stream: true };
    if (el.system.value.trim()) payload.system = el.system.value;
    const temperature = Number(el.temperature.value || 0);
    if (temperature > 0) payload.temperature = temperature; // the server turns sampling on
    Object.assign(payload, answerShape());
    if (!el.thinkingOn.checked) payload.include_thinking = false;
    sentImage = null;
    const file = el.file.files[0];
    if (file) {
      payload.image = await readImage(file);
      if (el.padSquare.checked) payload.pad_to_square = true;
      if (["image/png", "image/jpeg"].includes(mimeFor(file))) sentImage = payload.image;
    }
    const url = el.dicomUrl.value.trim();
    if (url) {
      payload.image_dicom = { dicom_source: url };
      const credential = el.dicomCredential.value.trim();
      if (credential) payload.image_dicom.access_credential = credential;
    }
    if (payload.image || payload.image_dicom) payload.image_previews = true; // to show what the model was given
    return payload;
  }

  function setStatus(text) { el.status.textContent = text; }

  function showError(text) {
    el.error.textContent = text;
    el.error.hidden = false;
  }

  function clearOutput() {
    el.error.hidden = true;
    el.error.textContent = "";
    el.answer.textContent = "";
    el.answer.dataset.deltas = "0";
    delete el.answer.dataset.final;
    el.answerModel.textContent = "";
    el.metrics.replaceChildren();
    el.images.replaceChildren();
    el.raw.textContent = "";
    el.given.replaceChildren();
    el.givenSummary.replaceChildren();
    el.metricsBox.hidden = el.imagesBox.hidden = el.rawBox.hidden = el.givenBox.hidden = true;
    el.thinking.textContent = "";
    el.thinkingSummary.textContent = "Thinking";
    el.thinkingBox.hidden = el.structuredBox.hidden = el.boxesBox.hidden = true;
    el.thinkingBox.open = false; // folded: the answer comes first
    el.structuredRows.replaceChildren();
    el.boxesFigure.querySelectorAll(".box").forEach((b) => b.remove());
    el.boxesImage.removeAttribute("src");
    el.boxesNote.textContent = "";
  }

  let controller = null;

  function setRunning(running) {
    el.submit.disabled = running;
    el.stop.disabled = !running;
    el.answer.setAttribute("aria-busy", String(running));
    el.form.setAttribute("aria-busy", String(running));
  }

  async function onSubmit(event) {
    event.preventDefault();
    if (controller) return;
    if (!el.form.reportValidity()) return;
    clearOutput();
    controller = new AbortController();
    setRunning(true);
    try {
      const payload = await buildPayload();
      await generate(payload, controller.signal);
    } catch (e) {
      if (e.name === "AbortError") setStatus("Stopped.");
      else {
        setStatus("Failed.");
        showError(e.message || String(e));
      }
    } finally {
      controller = null;
      setRunning(false);
    }
  }

  async function generate(payload, signal) {
    for (;;) {
      setStatus("Sending…");
      const res = await fetch(`${API}/generate`, {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(payload),
        signal,
      });
      const type = res.headers.get("Content-Type") || "";
      if (res.status === 200 && type.includes("text/event-stream")) return readStream(res);
      const body = await res.json().catch(() => ({}));
      if (res.status === 200) return showFinal(body, "");
      if (res.status !== 202) throw new ApiError(res.status, body, res.headers.get("Retry-After"));
      // 202: the model is loading. Show its progress, wait until it is ready, then send again.
      if (body.progress) renderHealth({ model_state: "loading", model: el.modelName.textContent, progress: body.progress });
      setStatus("The model is loading; your question is sent as soon as it is ready (Stop cancels).");
      await waitUntilReady(signal, body.retry_after_seconds);
    }
  }

  async function readStream(res) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let text = "";
    let deltas = 0;
    setStatus("Streaming…");
    for (;;) {
      const { value, done } = await reader.read(); // rejects with AbortError when stopped
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        const event = JSON.parse(data);
        if (event.status === "streaming") {
          if (event.thinking_delta) {
            el.thinking.textContent += event.thinking_delta;
            el.thinkingBox.hidden = false;
          }
          text += event.delta || "";
          deltas += 1;
          el.answer.textContent = text;
          el.answer.dataset.deltas = String(deltas);
        } else if (event.status === "success") {
          return showFinal(event, text);
        } else {
          throw new Error(`The answer stopped with an error: ${event.error || "unknown error"}`);
        }
      }
    }
    throw new Error("The stream ended before the final event.");
  }

  function showFinal(event, streamed) {
    el.answer.textContent = event.response ?? streamed;
    el.answer.dataset.final = "true";
    el.answerModel.textContent = event.model ? `Model: ${event.model}` : "";
    renderMetrics(event.compute_metrics || {});
    renderImages(event.images || []);
    renderGiven(event.images || [], event.image_sources || []);
    renderThinking(event);
    renderStructured(el.answer.textContent);
    renderBoxes(event);
    el.raw.textContent = JSON.stringify(event, (key, value) => (key === "preview" ? "(image)" : value), 2);
    el.rawBox.hidden = false;
    const finish = event.finish_reason ? ` Finish reason: ${event.finish_reason}.` : "";
    setStatus(`Done.${finish}`);
  }

  function addPair(dl, key, label, value) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = label;
    dd.textContent = value;
    dd.dataset.key = key;
    dl.append(dt, dd);
  }

  function renderMetrics(metrics) {
    el.metrics.replaceChildren();
    const known = Object.keys(METRIC_LABELS).filter((k) => k in metrics);
    for (const key of [...known, ...Object.keys(metrics).filter((k) => !(k in METRIC_LABELS))]) {
      const value = metrics[key];
      if (value == null) continue;
      const [label, unit] = METRIC_LABELS[key] || [key, ""];
      addPair(el.metrics, key, label, unit ? `${value} ${unit}` : String(value));
    }
    el.metricsBox.hidden = !el.metrics.children.length;
  }

  function describeValue(key, value) {
    if (key === "size" && Array.isArray(value)) return `${value[0]} × ${value[1]} px`;
    if (key === "window" && value && typeof value === "object") {
      return `centre ${value.center}, width ${value.width} (${value.source || "?"}, ${value.function || "linear"})`;
    }
    if (key === "frames" && value && typeof value === "object") {
      return `${(value.used || []).length} of ${value.total} used (index ${(value.used || []).join(", ")})`;
    }
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }

  function renderImages(images) {
    el.images.replaceChildren();
    images.forEach((info, i) => {
      const h = document.createElement("h4");
      h.textContent = `Image ${i + 1}`;
      const dl = document.createElement("dl");
      dl.className = "kv";
      for (const [key, value] of Object.entries(info || {})) {
        if (value != null && key !== "preview") addPair(dl, key, key.replace(/_/g, " "), describeValue(key, value));
      }
      el.images.append(h, dl);
    });
    el.imagesBox.hidden = !images.length;
  }

  function describeSource(src) {
    const parts = [`${src.modality || "image"} ${src.type || "source"} (${(src.kind || "").replace(/_/g, " ")})`];
    if (src.type === "slide") {
      parts.push(`level ${src.wsi_level} of ${src.wsi_levels}, ${src.level_size?.join(" × ")} px` +
        (src.magnification ? ` at ${src.magnification}×` : ""));
      parts.push(`${src.patch_count} of ${src.tissue_patches} tissue patches (seed ${src.seed})`);
    } else {
      parts.push(`${src.slices_sampled} images from ${src.instances_used} of ${src.instances_found} instances`);
      if (src.order_key) parts.push(`order: ${src.order_key.replace(/_/g, " ")}`);
      const w = src.windows;
      if (w?.kind === "ct_rgb") parts.push(`CT windows (HU) ${w.hu.map((x) => x.join("…")).join(", ")}`);
      else if (w?.kind === "minmax_volume") parts.push(`one min–max over the volume (${w.lo}…${w.hi})`);
      else if (w?.kind === "request") parts.push(`window centre ${w.center}, width ${w.width}`);
      const dropped = Object.entries(src.dropped || {}).map(([k, v]) => `${v} ${k.replace(/_/g, " ")}`);
      if (dropped.length) parts.push(`left out: ${dropped.join(", ")}`);
    }
    return parts.join(" · ");
  }

  function caption(info, i) {
    if (info.label) return info.label;
    if (info.patch) return `x ${info.patch.x}, y ${info.patch.y}`;
    return `Image ${i + 1}`;
  }

  // The images exactly as the model got them (small previews), in order: a strip of labelled slices, a grid of
  // patches, so a person can see at a glance whether the right series, order and window went in.
  function renderGiven(images, sources) {
    el.given.replaceChildren();
    el.givenSummary.replaceChildren();
    for (const src of sources) {
      const li = document.createElement("li");
      li.textContent = describeSource(src);
      el.givenSummary.append(li);
    }
    const shown = images.filter((info) => typeof info.preview === "string" && info.preview.startsWith("data:image/"));
    const patches = shown.length && shown.every((info) => info.patch);
    el.given.className = `given ${patches ? "grid" : "strip"}`;
    shown.forEach((info, i) => {
      const figure = document.createElement("figure");
      figure.setAttribute("role", "listitem");
      const img = document.createElement("img");
      img.src = info.preview;
      img.alt = `${caption(info, i)} as given to the model`;
      const figcaption = document.createElement("figcaption");
      figcaption.textContent = caption(info, i);
      figure.dataset.label = caption(info, i);
      figure.append(img, figcaption);
      el.given.append(figure);
    });
    el.givenBox.hidden = !shown.length && !sources.length;
  }

  function renderThinking(event) {
    if (typeof event.thinking !== "string") return;
    el.thinking.textContent = event.thinking;
    el.thinkingSummary.textContent = event.thinking_complete === false
      ? "Thinking (unfinished: the answer ran out of tokens inside it)" : "Thinking";
    el.thinkingBox.hidden = false;
  }

  // A JSON answer as rows of (field path, value), nested objects and arrays flattened: `location.side`, `items[0]`.
  function flatten(value, path, rows) {
    if (value !== null && typeof value === "object") {
      const entries = Array.isArray(value) ? value.map((v, i) => [`${path}[${i}]`, v])
        : Object.entries(value).map(([k, v]) => [path ? `${path}.${k}` : k, v]);
      if (!entries.length) rows.push([path || "(root)", Array.isArray(value) ? "[]" : "{}"]);
      for (const [p, v] of entries) flatten(v, p, rows);
    } else {
      rows.push([path || "(root)", typeof value === "string" ? value : JSON.stringify(value)]);
    }
    return rows;
  }

  function renderStructured(text) {
    let value;
    try {
      value = JSON.parse(text);
    } catch {
      return; // not JSON: the answer stays as text
    }
    if (value === null || typeof value !== "object") return;
    for (const [path, shown] of flatten(value, "", [])) {
      const tr = document.createElement("tr");
      const th = document.createElement("th");
      const td = document.createElement("td");
      th.scope = "row";
      th.textContent = path;
      td.textContent = shown;
      tr.append(th, td);
      el.structuredRows.append(tr);
    }
    el.structuredBox.hidden = false;
  }

  function renderBoxes(event) {
    if (!Array.isArray(event.boxes)) return;
    el.boxesBox.hidden = false;
    const size = (event.images && event.images[0] && event.images[0].size) || null;
    const notes = [];
    if (event.boxes_note) notes.push(event.boxes_note);
    if (!event.boxes.length && !event.boxes_note) notes.push("The answer holds no boxes.");
    if (event.boxes.length && (!sentImage || !size)) notes.push("Boxes are drawn on PNG and JPEG images only.");
    el.boxesNote.textContent = notes.join(" ");
    if (!sentImage || !size) {
      el.boxesFigure.hidden = true;
      return;
    }
    el.boxesFigure.hidden = false;
    el.boxesImage.src = sentImage; // the image as sent (unpadded): boxes are in its pixels
    const [w, h] = size;
    event.boxes.forEach((b, i) => {
      // Percentages of the original size, so the boxes follow the image at any displayed size.
      const div = document.createElement("div");
      div.className = "box";
      div.dataset.index = String(i);
      div.style.left = `${(b.x / w) * 100}%`;
      div.style.top = `${(b.y / h) * 100}%`;
      div.style.width = `${(b.width / w) * 100}%`;
      div.style.height = `${(b.height / h) * 100}%`;
      const label = document.createElement("span");
      label.className = "box-label";
      label.textContent = b.label ?? `box ${i + 1}`;
      div.append(label);
      el.boxesFigure.append(div);
    });
  }

  // -- wiring ----------------------------------------------------------------------------------------------------
  el.form.addEventListener("submit", onSubmit);
  el.stop.addEventListener("click", () => controller?.abort());
  el.file.addEventListener("change", showFile);
  el.format.addEventListener("change", showFormat);
  showFormat();
  el.clearImage.addEventListener("click", () => {
    el.file.value = "";
    showFile();
    el.file.focus();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && controller) controller.abort();
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && el.form.contains(e.target)) {
      e.preventDefault();
      el.form.requestSubmit();
    }
  });
  pollHealth();
})();
