// The live-captioning page: create a session, follow its event stream, draw the charts.
// Nothing is fetched from outside this server. Where the server needs an API key, the page
// asks for it (kept for this tab in sessionStorage) and sends it as `Authorization: Bearer`
// on every request; the event stream is read with fetch() for that reason (EventSource
// cannot send headers, and a key in the URL would end up in logs).
"use strict";

const $ = (id) => document.getElementById(id);
const live = { config: null, session: null, stream: null, series: { ttft: [], rss: [], state: [] } };
window.casaLive = live; // for the browser test and the curious
const KEY = "casa-api-key";

function authorized(options = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = { ...(options.headers || {}) };
  if (key) headers.Authorization = `Bearer ${key}`;
  return { ...options, headers };
}

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function failure(response) {
  const body = await response.json().catch(() => ({}));
  return new ApiError(body.error ? body.error.message : `${response.status} ${response.statusText}`, response.status);
}

async function api(url, options) {
  const response = await fetch(url, authorized(options));
  if (!response.ok) throw await failure(response);
  return response.json();
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function seconds(t) {
  const m = Math.floor(t / 60);
  return `${String(m).padStart(2, "0")}:${(t - 60 * m).toFixed(2).padStart(5, "0")}`;
}

// A line chart of `values` on a canvas: y from 0 to the largest value, the last value labelled.
function drawChart(canvas, values, color, digits) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, width, height);
  const left = 44, right = 8, top = 10, bottom = 20;
  const w = width - left - right, h = height - top - bottom;
  const max = Math.max(...values, 1e-9) * 1.1;
  ctx.strokeStyle = "#d8dce3";
  ctx.fillStyle = "#6b7380";
  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  for (let k = 0; k <= 2; k++) { // gridlines at 0, max/2, max
    const y = top + h - (h * k) / 2;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + w, y); ctx.stroke();
    ctx.fillText(((max * k) / 2).toFixed(digits), 2, y + 4);
  }
  ctx.fillText(`frame ${values.length}`, left + w - 60, height - 4);
  if (!values.length) return;
  const x = (i) => left + (values.length === 1 ? w / 2 : (w * i) / (values.length - 1));
  const y = (v) => top + h - (h * v) / max;
  ctx.strokeStyle = color;
  ctx.lineWidth = 2;
  ctx.beginPath();
  values.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
  ctx.stroke();
  ctx.fillStyle = color;
  values.forEach((v, i) => { ctx.beginPath(); ctx.arc(x(i), y(v), 2.5, 0, 2 * Math.PI); ctx.fill(); });
}

function drawCharts() {
  drawChart($("chart-ttft"), live.series.ttft, "#2f6fde", 1);
  drawChart($("chart-rss"), live.series.rss, "#8e44ad", 0);
  drawChart($("chart-state"), live.series.state, "#16a085", 1);
}

function reset() {
  live.series = { ttft: [], rss: [], state: [] };
  $("captions").replaceChildren();
  $("frame").removeAttribute("src");
  $("stats").textContent = "no frame yet";
  drawCharts();
}

function running(on) {
  $("start").disabled = on;
  $("stop").disabled = !on;
}

function finish(text, error = false) {
  if (live.stream) live.stream.abort();
  live.stream = null;
  running(false);
  setStatus(text, error);
}

// Server-sent events from a fetch() response: calls handle(kind, data) per event; ends with the stream.
async function readEvents(response, handle) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) handle(kind, JSON.parse(data));
    }
  }
}

function showCaption(c) {
  const item = document.createElement("li");
  const time = document.createElement("time");
  time.textContent = seconds(c.time);
  const text = document.createElement("span");
  text.textContent = c.text || "…";
  item.append(time, text);
  $("captions").append(item);
  item.scrollIntoView({ block: "nearest" });
  live.series.ttft.push(c.ttft_ms);
  live.series.rss.push(c.rss_bytes / 2 ** 20);
  live.series.state.push(c.cache_bytes / 2 ** 10);
  $("stats").textContent = `frame ${c.index + 1} at ${seconds(c.time)} · TTFT ${c.ttft_ms.toFixed(1)} ms · ` +
    `${c.tokens} tokens · state ${(c.cache_bytes / 2 ** 10).toFixed(1)} KiB · RSS ${(c.rss_bytes / 2 ** 20).toFixed(0)} MiB`;
  drawCharts();
}

async function follow(session) {
  live.session = session.id;
  $("srt").href = `/live/sessions/${session.id}/captions.srt`;
  $("srt").setAttribute("aria-disabled", "false");
  const stream = new AbortController();
  live.stream = stream;
  let ended = false;
  const handle = (kind, d) => {
    if (kind === "start") setStatus(`captioning ${session.video} at ${session.fps} fps…`);
    else if (kind === "frame") $("frame").src = d.image;
    else if (kind === "caption") showCaption(d);
    else if (kind === "warning") setStatus(`warning: ${d.message}`, true);
    else if (kind === "end") {
      ended = true;
      const skipped = d.undecodable ? ` (${d.undecodable} undecodable source frames skipped)` : "";
      finish(`${d.reason}: ${d.frames} frames captioned${skipped}`, d.undecodable > 0);
    } else if (kind === "failure") {
      ended = true;
      finish(d.message, true);
    }
  };
  try {
    const response = await fetch(`/live/sessions/${session.id}/events`, authorized({ signal: stream.signal }));
    if (!response.ok) throw await failure(response);
    await readEvents(response, handle);
    if (!ended && live.stream === stream) finish("connection to the server lost", true);
  } catch (error) {
    if (live.stream === stream) finish(error.name === "AbortError" ? "stopped" : error.message, true);
  }
}

// The SRT link is fetched with the key, then saved from memory (a plain link cannot send headers).
async function downloadSrt(event) {
  event.preventDefault();
  const link = $("srt");
  if (link.getAttribute("aria-disabled") === "true") return;
  try {
    const response = await fetch(link.href, authorized());
    if (!response.ok) throw await failure(response);
    const name = (response.headers.get("content-disposition") || "").match(/filename="([^"]+)"/);
    const save = document.createElement("a");
    save.href = URL.createObjectURL(await response.blob());
    save.download = name ? name[1] : "captions.srt";
    save.click();
    setTimeout(() => URL.revokeObjectURL(save.href), 1000);
  } catch (error) {
    setStatus(error.message, true);
  }
}

async function start() {
  if (!live.config) return; // not connected yet (or waiting for the API key)
  const fps = parseFloat($("fps").value);
  const realtime = $("realtime").checked;
  const instruction = $("instruction").value.trim(); // empty: the captioner's own default
  const file = $("file").files[0];
  reset();
  running(true);
  let session;
  try {
    if (file) { // an upload takes precedence over the list
      if (file.size > live.config.max_upload_bytes) {
        throw new Error(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MiB; the server accepts ` +
          `${(live.config.max_upload_bytes / 2 ** 20).toFixed(1)} MiB at most`);
      }
      setStatus(`uploading ${file.name}…`);
      const query = new URLSearchParams({ fps, realtime, filename: file.name });
      if (instruction) query.set("instruction", instruction);
      session = await api(`/live/uploads?${query}`, { method: "POST", body: file,
        headers: { "Content-Type": "application/octet-stream" } });
    } else {
      if (!$("video").value) throw new Error("choose a video or upload one");
      session = await api("/live/sessions", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ video: $("video").value, fps, realtime, instruction: instruction || null }) });
    }
  } catch (error) {
    finish(error.message, true);
    return;
  }
  follow(session);
}

async function stop() {
  if (!live.session) return;
  $("stop").disabled = true;
  try {
    const s = await api(`/live/sessions/${live.session}/stop`, { method: "POST" });
    finish(`stopped: ${s.frames} frames captioned`);
  } catch (error) {
    finish(error.message, true);
  }
}

function askForKey(message) {
  $("auth").hidden = false;
  setStatus(message, true);
  $("key").focus();
}

async function init() {
  try {
    live.config = await api("/live/config");
  } catch (error) {
    if (error.status === 401) askForKey(`this server needs an API key: ${error.message}`);
    else setStatus(`cannot reach the server: ${error.message}`, true);
    return;
  }
  $("auth").hidden = true;
  $("model").textContent = `model ${live.config.model}`;
  $("fps").max = live.config.max_fps;
  const select = $("video");
  select.replaceChildren();
  for (const name of live.config.videos) select.append(new Option(name, name));
  if (!live.config.videos.length) {
    select.append(new Option(live.config.media_dir ? "(no videos in the media directory)" : "(no media directory)", ""));
  }
  drawCharts();
  setStatus("ready");
}

function useKey() {
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  init();
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
$("srt").addEventListener("click", downloadSrt);
$("use-key").addEventListener("click", useKey);
$("key").addEventListener("keydown", (e) => { if (e.key === "Enter") useKey(); });
window.addEventListener("resize", drawCharts);
init();
