// The EAT page: pick or record audio, draw its log-mel spectrogram (computed here, in the browser),
// send it to /predict (tags, per-window timeline, sound events) and draw the answers. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const RATE = 16000, FRAME = 400, SHIFT = 160, FFT = 512, MELS = 128, MAX_COLUMNS = 4000;
let modelInfo = null;

function authHeaders() {
  const key = $("key").value.trim();
  sessionStorage.setItem("eat-key", key);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: the status says enough */ }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function setStatus(text) { $("status").textContent = text; }
function showError(text) { $("error").textContent = text; $("error").hidden = !text; }

async function loadModel() {
  try {
    modelInfo = await api("v1/model");
    $("model").textContent = `${modelInfo.model_name}: ${modelInfo.num_classes} classes, ` +
      `${modelInfo.window_s.toFixed(2)} s windows, on ${modelInfo.provider}`;
    $("hop").max = modelInfo.window_s;
    if (!$("hop").dataset.touched) $("hop").value = Math.min(1, modelInfo.window_s / 2).toFixed(2);
  } catch (err) {
    modelInfo = null;
    $("model").textContent = `The model's description is not available: ${err.message}`;
  }
}

// ---- log-mel spectrogram ------------------------------------------------------------------------
function fftPower(frame) {  // frame: Float64Array(FFT) -> power of bins 0..FFT/2
  const re = frame, im = new Float64Array(FFT);
  for (let i = 1, j = 0; i < FFT; i++) {  // bit reversal
    let bit = FFT >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) { [re[i], re[j]] = [re[j], re[i]]; }
  }
  for (let size = 2; size <= FFT; size <<= 1) {
    const step = -2 * Math.PI / size;
    for (let start = 0; start < FFT; start += size) {
      for (let k = 0; k < size / 2; k++) {
        const c = Math.cos(step * k), s = Math.sin(step * k);
        const a = start + k, b = a + size / 2;
        const tr = re[b] * c - im[b] * s, ti = re[b] * s + im[b] * c;
        re[b] = re[a] - tr; im[b] = im[a] - ti; re[a] += tr; im[a] += ti;
      }
    }
  }
  const power = new Float64Array(FFT / 2 + 1);
  for (let k = 0; k <= FFT / 2; k++) power[k] = re[k] * re[k] + im[k] * im[k];
  return power;
}

function melFilters() {  // triangular filters, 20 Hz to Nyquist, on the mel scale (as Kaldi's fbank)
  const mel = (f) => 1127 * Math.log(1 + f / 700);
  const lo = mel(20), hi = mel(RATE / 2), bins = FFT / 2 + 1;
  const filters = [];
  for (let m = 0; m < MELS; m++) {
    const left = lo + (hi - lo) * m / (MELS + 1), centre = left + (hi - lo) / (MELS + 1);
    const right = centre + (hi - lo) / (MELS + 1), weights = new Float64Array(bins);
    for (let k = 0; k < bins; k++) {
      const f = mel(k * RATE / FFT);
      weights[k] = f > left && f < right ? (f <= centre ? (f - left) / (centre - left) : (right - f) / (right - centre)) : 0;
    }
    filters.push(weights);
  }
  return filters;
}

function logMel(samples) {  // Float32Array at 16 kHz -> array of Float64Array(MELS), one per 10 ms
  const frames = samples.length < FRAME ? 0 : 1 + Math.floor((samples.length - FRAME) / SHIFT);
  const stride = Math.max(1, Math.ceil(frames / MAX_COLUMNS));  // long clips: every stride-th frame
  const filters = melFilters(), window = new Float64Array(FRAME), columns = [];
  for (let i = 0; i < FRAME; i++) window[i] = 0.5 - 0.5 * Math.cos(2 * Math.PI * i / (FRAME - 1));
  for (let t = 0; t < frames; t += stride) {
    const frame = new Float64Array(FFT);
    for (let i = 0; i < FRAME; i++) frame[i] = samples[t * SHIFT + i] * window[i];
    const power = fftPower(frame), column = new Float64Array(MELS);
    for (let m = 0; m < MELS; m++) {
      let energy = 0;
      for (let k = 0; k < power.length; k++) energy += filters[m][k] * power[k];
      column[m] = Math.log(Math.max(energy, 1e-10));
    }
    columns.push(column);
  }
  return columns;
}

const COLOURS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];  // inferno-like
function colour(x) {
  const pos = Math.min(Math.max(x, 0), 1) * (COLOURS.length - 1), i = Math.min(Math.floor(pos), COLOURS.length - 2);
  const f = pos - i;
  return COLOURS[i].map((c, j) => Math.round(c + f * (COLOURS[i + 1][j] - c)));
}

async function drawSpectrogram(blob) {
  const context = new OfflineAudioContext(1, 1, RATE);  // decodes and resamples to 16 kHz
  const decoded = await context.decodeAudioData(await blob.arrayBuffer());
  const samples = new Float32Array(decoded.length);
  for (let c = 0; c < decoded.numberOfChannels; c++) {
    const channel = decoded.getChannelData(c);
    for (let i = 0; i < samples.length; i++) samples[i] += channel[i] / decoded.numberOfChannels;
  }
  const columns = logMel(samples), canvas = $("spectrogram");
  if (!columns.length) return;
  let top = -Infinity;
  for (const column of columns) for (const v of column) top = Math.max(top, v);
  const floor = top - 16;  // ~70 dB of range
  canvas.width = columns.length;
  canvas.height = MELS;
  const g = canvas.getContext("2d"), image = g.createImageData(columns.length, MELS);
  columns.forEach((column, x) => {
    for (let m = 0; m < MELS; m++) {
      const [r, gr, b] = colour((column[m] - floor) / (top - floor)), p = ((MELS - 1 - m) * columns.length + x) * 4;
      image.data[p] = r; image.data[p + 1] = gr; image.data[p + 2] = b; image.data[p + 3] = 255;
    }
  });
  g.putImageData(image, 0, 0);
}

// ---- tags, timeline, events ---------------------------------------------------------------------
function lane(name, title) {
  const row = document.createElement("div"), label = document.createElement("span"), track = document.createElement("div");
  row.className = "lane"; label.textContent = name; label.title = title || name; track.className = "track";
  row.append(label, track);
  return [row, track];
}

function bar(track, className, from, to, duration, title, opacity) {
  const el = document.createElement("div");
  el.className = className;
  el.style.left = (100 * from / duration) + "%";
  el.style.width = Math.max(0.3, 100 * (to - from) / duration) + "%";
  if (opacity !== undefined) el.style.opacity = opacity.toFixed(3);
  el.title = title;
  track.append(el);
  return el;
}

function render(result) {
  const duration = Math.max(result.duration_s, 1e-3);
  $("tags").replaceChildren(...result.tags.map((tag) => {
    const li = document.createElement("li");
    li.className = "tag"; li.dataset.name = tag.name;
    li.innerHTML = '<span class="name"></span><span class="meter"><span class="fill"></span></span><span class="score"></span>';
    li.querySelector(".name").textContent = tag.name;
    li.querySelector(".fill").style.width = (100 * tag.score).toFixed(1) + "%";
    li.querySelector(".fill").style.display = "block";
    li.querySelector(".score").textContent = tag.score.toFixed(3);
    return li;
  }));
  const windows = result.timeline || [];
  $("timeline").replaceChildren(...result.tags.map((tag) => {
    const [row, track] = lane(tag.name);
    const step = windows.length > 1 ? windows[1].start_s - windows[0].start_s : duration;
    windows.forEach((w) => {  // one cell per window, a hop wide, centred on the window's middle
      const found = w.tags.find((t) => t.name === tag.name), score = found ? found.score : 0;
      const middle = windows.length > 1 ? (w.start_s + w.end_s) / 2 : duration / 2;
      const from = Math.max(0, middle - step / 2), to = Math.min(duration, middle + step / 2);
      bar(track, "cell", from, to, duration, `${tag.name} ${w.start_s}-${w.end_s} s: ${score.toFixed(3)}`, score);
    });
    return row;
  }));
  const byName = new Map();
  for (const e of result.events || []) (byName.get(e.name) || byName.set(e.name, []).get(e.name)).push(e);
  const lanes = [...byName].map(([name, events]) => {
    const [row, track] = lane(name);
    row.dataset.name = name;
    for (const e of events) {
      const el = bar(track, "event", e.onset_s, e.offset_s, duration,
        `${name}: ${e.onset_s.toFixed(2)}-${e.offset_s.toFixed(2)} s, peak ${e.peak_score.toFixed(3)}`);
      el.dataset.onset = e.onset_s; el.dataset.offset = e.offset_s;
    }
    return row;
  });
  const axis = document.createElement("p");
  axis.className = "axis";
  axis.textContent = lanes.length ? `0 s to ${result.duration_s.toFixed(2)} s` : "no events above the thresholds";
  $("events").replaceChildren(...lanes, axis);
}

async function analyse(blob, name) {
  showError("");
  setStatus(`analysing ${name}…`);
  if (!modelInfo) await loadModel();
  const window = modelInfo ? modelInfo.window_s : Infinity;
  const hop = Math.min(Math.max(Number($("hop").value) || 1, 0.05), window);
  const topK = Math.min(Math.max(Math.round(Number($("topk").value) || 5), 1), 50);
  const form = new FormData();
  form.append("file", blob, name);
  const drawing = drawSpectrogram(blob).catch((err) => `the browser cannot draw this format (${err.message})`);
  try {
    const answer = await api(`predict?top_k=${topK}&timeline=true&events=true&hop=${hop}`, { method: "POST", body: form });
    const result = answer.results[0];
    render(result);
    const drawn = await drawing;
    setStatus(`${name}: ${result.duration_s.toFixed(2)} s, ${result.num_windows} windows` + (drawn ? `; ${drawn}` : ""));
  } catch (err) {
    showError(err.message);
    setStatus("");
  }
}

let recorder = null;
async function toggleRecording() {
  if (recorder) { recorder.stop(); return; }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const chunks = [];
    recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (e) => {
      chunks.push(e.data);
      $("record").dataset.chunks = chunks.length;  // lets a test see that audio is arriving
    };
    recorder.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      $("record").textContent = "Record"; $("record").classList.remove("recording");
      const blob = new Blob(chunks, { type: recorder.mimeType || "audio/webm" });
      recorder = null;
      analyse(blob, "recording.webm");
    };
    recorder.start(250);  // a chunk every 250 ms
    $("record").textContent = "Stop"; $("record").classList.add("recording");
  } catch (err) {
    showError(`cannot record: ${err.message}`);
  }
}

$("key").value = sessionStorage.getItem("eat-key") || "";
$("key").addEventListener("change", loadModel);
$("file").addEventListener("change", () => {
  const f = $("file").files[0];
  $("file").value = "";  // so that choosing the same file again analyses it again
  if (f) analyse(f, f.name);
});
$("record").addEventListener("click", toggleRecording);
$("hop").addEventListener("input", () => { $("hop").dataset.touched = "yes"; });
loadModel();
