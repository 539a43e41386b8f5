// The live-captioning page: create a session, follow its event stream, draw the charts.
// Nothing is fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const live = { config: null, session: null, source: null, series: { ttft: [], rss: [], state: [] } };
window.casaLive = live; // for the browser test and the curious

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(body.error ? body.error.message : `${response.status} ${response.statusText}`);
  }
  return body;
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
  if (live.source) live.source.close();
  live.source = null;
  running(false);
  setStatus(text, error);
}

function follow(session) {
  live.session = session.id;
  $("srt").href = `/live/sessions/${session.id}/captions.srt`;
  $("srt").setAttribute("aria-disabled", "false");
  const source = new EventSource(`/live/sessions/${session.id}/events`);
  live.source = source;
  source.addEventListener("start", () => setStatus(`captioning ${session.video} at ${session.fps} fps…`));
  source.addEventListener("frame", (e) => { $("frame").src = JSON.parse(e.data).image; });
  source.addEventListener("caption", (e) => {
    const c = JSON.parse(e.data);
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
  });
  source.addEventListener("warning", (e) => setStatus(`warning: ${JSON.parse(e.data).message}`, true));
  source.addEventListener("end", (e) => {
    const d = JSON.parse(e.data);
    const skipped = d.undecodable ? ` (${d.undecodable} undecodable source frames skipped)` : "";
    finish(`${d.reason}: ${d.frames} frames captioned${skipped}`, d.undecodable > 0);
  });
  source.addEventListener("failure", (e) => finish(JSON.parse(e.data).message, true));
  source.onerror = () => { if (live.source === source) finish("connection to the server lost", true); };
}

async function start() {
  const fps = parseFloat($("fps").value);
  const realtime = $("realtime").checked;
  const instruction = $("instruction").value.trim(); // empty: the captioner's own default
  const file = $("file").files[0];
  reset();
  running(true);
  try {
    let session;
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
    follow(session);
  } catch (error) {
    finish(error.message, true);
  }
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

async function init() {
  try {
    live.config = await api("/live/config");
  } catch (error) {
    setStatus(`cannot reach the server: ${error.message}`, true);
    return;
  }
  $("model").textContent = `model ${live.config.model}`;
  $("fps").max = live.config.max_fps;
  const select = $("video");
  for (const name of live.config.videos) select.append(new Option(name, name));
  if (!live.config.videos.length) {
    select.append(new Option(live.config.media_dir ? "(no videos in the media directory)" : "(no media directory)", ""));
  }
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", stop);
  drawCharts();
  setStatus("ready");
}

window.addEventListener("resize", drawCharts);
init();
