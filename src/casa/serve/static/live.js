// The live-captioning page: create a session, follow its event stream, draw the charts.
// A camera (getUserMedia) or screen (getDisplayMedia) session sends its frames from here: each
// one drawn into a canvas at the chosen rate and posted as a JPEG (one request per frame, at most
// one in flight: a frame due while the previous one is still being sent is skipped and counted);
// the server captions the newest frame whenever its model is free and drops the others.
// Nothing is fetched from outside this server. Where the server needs an API key, the page
// asks for it (kept for this tab in sessionStorage) and sends it as `Authorization: Bearer`
// on every request; the event stream is read with fetch() for that reason (EventSource
// cannot send headers, and a key in the URL would end up in logs).
"use strict";

const $ = (id) => document.getElementById(id);
const SERIES = () => ({ ttft: [], lag: [], dropped: [], rss: [], state: [] });
// sent: the index the server gave each frame posted from here (camera and screen sessions)
const live = { config: null, session: null, stream: null, capture: null, series: SERIES(), sent: [] };
window.casaLive = live; // for the browser test and the curious
const KEY = "casa-api-key";
const MAX_SIDE = 640; // pixels: a camera frame is scaled down to this before it is sent

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

// A line chart of `values` on a canvas: y from 0 to a little above the largest value (`counts`:
// to an even whole number, at least 2, so that the gridlines fall on whole numbers).
function drawChart(canvas, values, color, digits, counts = false) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, width, height);
  const left = 44, right = 8, top = 10, bottom = 20;
  const w = width - left - right, h = height - top - bottom;
  const peak = Math.max(...values, 1e-9);
  const max = counts ? Math.max(2, 2 * Math.ceil(peak / 2)) : peak * 1.1;
  ctx.strokeStyle = "#d8dce3";
  ctx.fillStyle = "#6b7380";
  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  for (let k = 0; k <= 2; k++) { // gridlines at 0, max/2, max (labelled once there is a value)
    const y = top + h - (h * k) / 2;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + w, y); ctx.stroke();
    if (values.length) ctx.fillText(((max * k) / 2).toFixed(digits), 2, y + 4);
  }
  const count = `${values.length} captions`;
  ctx.fillText(count, left + w - ctx.measureText(count).width, height - 4);
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
  drawChart($("chart-lag"), live.series.lag, "#d35400", 0);
  drawChart($("chart-dropped"), live.series.dropped, "#c0392b", 0, true);
  drawChart($("chart-rss"), live.series.rss, "#8e44ad", 0);
  drawChart($("chart-state"), live.series.state, "#16a085", 1);
}

function reset() {
  live.series = SERIES();
  live.sent = [];
  $("captions").replaceChildren();
  $("frame").removeAttribute("src");
  $("stats").textContent = "no frame yet";
  drawCharts();
}

// ------------------------------------------------------------------ camera and screen
async function openSource(source) {
  const media = navigator.mediaDevices;
  if (!media) throw new Error("this browser offers no camera or screen to this page (it needs https or localhost)");
  if (source === "screen") {
    if (!media.getDisplayMedia) throw new Error("this browser cannot share a screen");
    return media.getDisplayMedia({ video: true, audio: false });
  }
  return media.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
}

// Post a frame of `media` (a MediaStream) every 1/fps seconds to session `id`; `live.capture` holds
// the frames skipped (one was still in flight) and the capture time of each frame index not yet captioned.
async function startCapture(id, media, fps) {
  const video = $("camera");
  video.srcObject = media;
  video.hidden = false;
  $("frame").hidden = true;
  await video.play();
  const canvas = document.createElement("canvas");
  const capture = { media, canvas, timer: null, busy: false, skipped: 0, sentAt: new Map() };
  live.capture = capture;
  const post = async (blob, at) => {
    try {
      const response = await fetch(`/live/sessions/${id}/frames`, authorized({ method: "POST", body: blob,
        headers: { "Content-Type": "image/jpeg" } }));
      if (!response.ok) throw await failure(response);
      const answer = await response.json();
      live.sent.push(answer.index);
      capture.sentAt.set(answer.index, at);
    } catch (error) {
      if (live.capture === capture) { stopCapture(); setStatus(`sending frames: ${error.message}`, true); }
    } finally {
      capture.busy = false;
    }
  };
  const tick = () => {
    if (capture.busy || !video.videoWidth) { capture.skipped += 1; return; }
    const scale = Math.min(1, MAX_SIDE / Math.max(video.videoWidth, video.videoHeight));
    canvas.width = Math.round(video.videoWidth * scale);
    canvas.height = Math.round(video.videoHeight * scale);
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    capture.busy = true;
    const at = performance.now();
    capture.pendingAt = at;
    canvas.toBlob((blob) => (blob ? post(blob, at) : (capture.busy = false)), "image/jpeg", 0.8);
  };
  for (const track of media.getVideoTracks()) track.addEventListener("ended", stop); // sharing ended in the browser
  tick();
  capture.timer = setInterval(tick, 1000 / fps);
}

// Stop sending frames and release the camera; the last frame sent stays on show.
function stopCapture() {
  const capture = live.capture;
  if (!capture) return;
  live.capture = null;
  clearInterval(capture.timer);
  for (const track of capture.media.getTracks()) track.stop();
  if (capture.canvas.width) $("frame").src = capture.canvas.toDataURL("image/jpeg", 0.8);
  $("camera").srcObject = null;
  $("camera").hidden = true;
  $("frame").hidden = false;
}

function showSource() {
  $("controls").dataset.source = $("source").value;
  $("frame-title").textContent = $("source").value === "video" ? "Current frame" : `Your ${$("source").value}`;
}

function historyText(history) {
  return history === "full" ? "full history" : `history: ${history.sink} sink + ${history.window} window tokens`;
}

function running(on) {
  $("start").disabled = on;
  $("stop").disabled = !on;
}

function finish(text, error = false) {
  stopCapture();
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
  live.series.lag.push(c.lag_ms);
  live.series.dropped.push(c.dropped);
  live.series.rss.push(c.rss_bytes / 2 ** 20);
  live.series.state.push(c.cache_bytes / 2 ** 10);
  let frames = `frame ${c.index + 1} at ${seconds(c.time)}`;
  const capture = live.capture;
  if (c.received !== undefined) { // a camera or screen: its frames dropped so far, and the round trip from here
    frames += ` · ${c.dropped_total} of ${c.received} dropped`;
    // its post may still be waiting for its answer (the caption came first): then it is the one in flight
    const at = capture && (capture.sentAt.get(c.index) ?? (capture.busy ? capture.pendingAt : undefined));
    if (at !== undefined) frames += ` · shown ${(performance.now() - at).toFixed(0)} ms after capture`;
    if (capture) for (const index of capture.sentAt.keys()) if (index <= c.index) capture.sentAt.delete(index);
  }
  $("stats").textContent = `${frames} · lag ${c.lag_ms.toFixed(0)} ms · TTFT ${c.ttft_ms.toFixed(1)} ms · ` +
    `${c.tokens} tokens · state ${(c.cache_bytes / 2 ** 10).toFixed(1)} KiB · RSS ${(c.rss_bytes / 2 ** 20).toFixed(0)} MiB`;
  drawCharts();
}

function endText(d) {
  let text = `${d.reason}: ${d.frames} frames captioned`;
  if (d.received !== undefined) {
    text += ` of ${d.received} received, ${d.dropped} dropped`;
    if (d.lag_ms && d.lag_ms.p95 !== undefined) text += `, lag p95 ${d.lag_ms.p95.toFixed(0)} ms`;
  }
  if (d.undecodable) text += ` (${d.undecodable} undecodable frames skipped)`;
  return text;
}

async function follow(session, media) {
  live.session = session.id;
  $("srt").href = `/live/sessions/${session.id}/captions.srt`;
  $("srt").setAttribute("aria-disabled", "false");
  const stream = new AbortController();
  live.stream = stream;
  let ended = false;
  const handle = (kind, d) => {
    if (kind === "start") {
      setStatus(`captioning ${session.video} at ${session.fps} fps (${historyText(d.history)})…`);
      if (media) startCapture(session.id, media, session.fps).catch((error) => finish(error.message, true));
    } else if (kind === "frame") $("frame").src = d.image;
    else if (kind === "caption") showCaption(d);
    else if (kind === "warning") setStatus(`warning: ${d.message}`, true);
    else if (kind === "end") {
      ended = true;
      finish(endText(d), d.undecodable > 0);
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
  const history = $("history").value;
  const source = $("source").value;
  const file = $("file").files[0];
  reset();
  running(true);
  let session, media = null;
  try {
    if (source !== "video") { // the camera (or screen) is asked for first: refused, no session is made
      setStatus(`asking for the ${source}…`);
      media = await openSource(source);
      session = await api("/live/sessions", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ source, fps, history, instruction: instruction || null }) });
    } else if (file) { // an upload takes precedence over the list
      if (file.size > live.config.max_upload_bytes) {
        throw new Error(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MiB; the server accepts ` +
          `${(live.config.max_upload_bytes / 2 ** 20).toFixed(1)} MiB at most`);
      }
      setStatus(`uploading ${file.name}…`);
      const query = new URLSearchParams({ fps, realtime, history, filename: file.name });
      if (instruction) query.set("instruction", instruction);
      session = await api(`/live/uploads?${query}`, { method: "POST", body: file,
        headers: { "Content-Type": "application/octet-stream" } });
    } else {
      if (!$("video").value) throw new Error("choose a video or upload one");
      session = await api("/live/sessions", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ video: $("video").value, fps, realtime, history, instruction: instruction || null }) });
    }
  } catch (error) {
    if (media) for (const track of media.getTracks()) track.stop();
    finish(error.name === "NotAllowedError" ? `the ${source} was refused: ${error.message}` : error.message, true);
    return;
  }
  follow(session, media);
}

// Stop sending frames, then stop the session. Its event stream still brings the captions made before
// the stop, then its end (which finishes the page); a stream that brings none is ended here.
async function stop() {
  if (!live.session) return;
  $("stop").disabled = true;
  stopCapture();
  const stream = live.stream;
  try {
    const s = await api(`/live/sessions/${live.session}/stop`, { method: "POST" });
    const stopped = () => finish(endText({ reason: "stopped", frames: s.frames, ...(s.counts || {}) }));
    if (!stream) stopped();
    else setTimeout(() => { if (live.stream === stream) stopped(); }, 3000);
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
  const media = navigator.mediaDevices;
  for (const option of $("source").options) { // what this browser cannot give is not offered
    if (option.value === "camera") option.disabled = !(media && media.getUserMedia);
    if (option.value === "screen") option.disabled = !(media && media.getDisplayMedia);
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
$("source").addEventListener("change", showSource);
$("stop").addEventListener("click", stop);
$("srt").addEventListener("click", downloadSrt);
$("use-key").addEventListener("click", useKey);
$("key").addEventListener("keydown", (e) => { if (e.key === "Enter") useKey(); });
window.addEventListener("resize", drawCharts);
init();
