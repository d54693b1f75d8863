// MuseNet co-composer: the page over musenet-serve's JSON API (/v1). Plain JavaScript, no build step.
//
// Simple mode: one request of four candidates, each drawn as a piano roll, playable, downloadable.
// Step-by-step mode: a tree of takes kept in the page; extending a take sends its tokens back as
// `continue_from`, and the chosen candidate becomes a child of that take.
"use strict";

(() => {
  // -- small helpers --------------------------------------------------------------------------------
  const $ = (sel, root = document) => root.querySelector(sel);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  const clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));

  function fmtSeconds(s) {
    return `${(Math.round(s * 10) / 10).toFixed(1)} s`;
  }

  function fmtClock(s) {
    const m = Math.floor(s / 60);
    const sec = s - 60 * m;
    return `${m}:${sec < 10 ? "0" : ""}${sec.toFixed(1)}`;
  }

  function prettyLabel(label) {
    const text = String(label).replace(/[_-]+/g, " ");
    return text.charAt(0).toUpperCase() + text.slice(1);
  }

  // Bundled openings are named FOLDER/FILE (composer or game / piece).
  function openingTitle(name) {
    return String(name).split("/").map(prettyLabel).join(" – ");
  }

  function slug(text) {
    return String(text || "").toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "") || "piece";
  }

  // -- the error line ---------------------------------------------------------------------------------
  // Every failure ends here as one line: the page never goes blank or fails silently.
  function showError(message) {
    const text = String(message || "Something went wrong.").split("\n")[0];
    $("#error-text").textContent = text;
    $("#error").hidden = false;
  }

  function clearError() {
    $("#error").hidden = true;
    $("#error-text").textContent = "";
  }

  window.addEventListener("error", (event) => showError(event.message || "Unexpected error in the page."));
  window.addEventListener("unhandledrejection", (event) => {
    const reason = event.reason;
    showError(reason && reason.message ? reason.message : String(reason));
  });

  // -- the API ----------------------------------------------------------------------------------------
  // The access token comes in the page's address (?token=… or #token=… or #…); it is moved to the
  // session's storage and out of the address bar, so that it is not shared with a copied link.
  const token = (() => {
    const KEY = "musenet-serve-token";
    const params = new URLSearchParams(location.search);
    const hash = location.hash.replace(/^#/, "");
    let found = params.get("token");
    if (!found && hash) found = hash.includes("=") ? new URLSearchParams(hash).get("token") : decodeURIComponent(hash);
    if (found) {
      try { sessionStorage.setItem(KEY, found); } catch (e) { /* storage off: the token lives in memory */ }
      params.delete("token");
      const query = params.toString();
      history.replaceState(null, "", location.pathname + (query ? `?${query}` : ""));
      return found;
    }
    try { return sessionStorage.getItem(KEY); } catch (e) { return null; }
  })();

  function authHeaders(extra = {}) {
    return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
  }

  class ApiError extends Error {}

  async function errorOf(response) {
    let message = "";
    try {
      const body = await response.clone().json();
      message = body && body.error ? String(body.error) : "";
    } catch (e) {
      message = "";
    }
    if (response.status === 401 || response.status === 403) {
      return new ApiError(message && response.status === 403 ? message
        : "This server needs an access token: open the page as /?token=YOUR_TOKEN.");
    }
    if (response.status === 429) {
      const retry = response.headers.get("Retry-After");
      const base = message || "The server is busy";
      return new ApiError(retry && !/retry/i.test(base) ? `${base}; try again in ${retry} s.` : base);
    }
    return new ApiError(message || `The server answered ${response.status} ${response.statusText}.`.trim());
  }

  async function api(path, { method = "GET", body, signal } = {}) {
    let response;
    try {
      response = await fetch(path, {
        method,
        signal,
        headers: authHeaders(body === undefined ? {} : { "Content-Type": "application/json" }),
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
      });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError("Cannot reach the server: is musenet-serve still running?");
    }
    if (!response.ok) throw await errorOf(response);
    try {
      return await response.json();
    } catch (e) {
      throw new ApiError(`The server sent an unreadable answer to ${method} ${path}.`);
    }
  }

  // Saves a file from the API under a chosen name; fetched (not a plain link) so that the token header
  // goes with it and a failure is shown as the error line instead of a downloaded error page.
  async function download(url, filename) {
    let response;
    try {
      response = await fetch(url, { headers: authHeaders(), cache: "no-store" });
    } catch (e) {
      throw new ApiError("Cannot reach the server to download the file.");
    }
    if (!response.ok) {
      const error = await errorOf(response);
      if (response.status === 404) throw new ApiError(`${error.message} (the server keeps only recent pieces).`);
      throw error;
    }
    const blob = await response.blob();
    const href = URL.createObjectURL(blob);
    const a = el("a", { href, download: filename, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(href), 60000);
  }

  function downloadLink(text, url, filename, title) {
    const link = el("a", { class: "button secondary", href: url, download: filename, title, text });
    link.addEventListener("click", (event) => {
      event.preventDefault();
      if (link.getAttribute("aria-busy") === "true") return;
      clearError();
      link.setAttribute("aria-busy", "true");  // a WAV is rendered on first request: that can take a while
      download(url, filename).catch((e) => showError(e.message))
        .finally(() => link.removeAttribute("aria-busy"));
    });
    return link;
  }

  // -- jobs: submit, follow the event stream, fall back to polling --------------------------------------
  const FINAL = new Set(["done", "failed", "cancelled"]);

  // Reads `text/event-stream` by hand: EventSource cannot send the Authorization header.
  async function followEvents(url, onProgress, signal) {
    const response = await fetch(url, { headers: authHeaders({ Accept: "text/event-stream" }), signal,
      cache: "no-store" });
    if (!response.ok) throw await errorOf(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return null;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event = val;
          else if (field === "data") data.push(val);
        }
        if (!data.length) continue;
        let payload;
        try { payload = JSON.parse(data.join("\n")); } catch (e) { continue; }
        if (event === "progress") onProgress(payload);
        else if (FINAL.has(event)) {
          reader.cancel().catch(() => {});
          return { ...payload, status: payload.status || event };
        }
      }
    }
  }

  async function pollJob(url, onProgress, signal) {
    for (;;) {
      const job = await api(url, { signal });
      if (FINAL.has(job.status)) return job;
      onProgress(job);
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  // One generation request. Returns a handle at once ({cancel, done: Promise of the final job}).
  function startJob(body, { onQueued, onProgress }) {
    const controller = new AbortController();
    let jobId = null;
    let cancelled = false;
    const done = (async () => {
      const started = await api("/v1/generate", { method: "POST", body, signal: controller.signal });
      jobId = started.id;
      onQueued(started);
      if (cancelled) api(`/v1/jobs/${jobId}`, { method: "DELETE" }).catch(() => {});
      const urls = started.urls || {};
      const events = urls.events || `/v1/jobs/${jobId}/events`;
      const self = urls.self || `/v1/jobs/${jobId}`;
      let final = null;
      try {
        final = await followEvents(events, onProgress, controller.signal);
      } catch (e) {
        if (e.name === "AbortError") throw e;
        final = null;  // a dropped stream: the job goes on, ask for its state instead
      }
      if (!final) final = await pollJob(self, onProgress, controller.signal);
      return { ...final, seed: started.seed };
    })();
    return {
      done,
      cancel() {
        cancelled = true;
        if (jobId) {
          api(`/v1/jobs/${jobId}`, { method: "DELETE" }).catch(() => controller.abort());
        } else {
          controller.abort();
        }
      },
    };
  }

  // -- instruments: colours and synth families ------------------------------------------------------------
  const COLOURS = {
    piano: "#f2c14e", violin: "#ef6f6c", cello: "#c9564f", bass: "#5b8def", guitar: "#57c785",
    flute: "#6fd6e6", clarinet: "#b392f0", trumpet: "#f59b3d", harp: "#f08cc8", drums: "#c7ccd6",
    primer: "#9aa3b5",
  };

  function colourOf(instrument) {
    if (COLOURS[instrument]) return COLOURS[instrument];
    let hash = 0;
    for (const ch of String(instrument)) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
    return `hsl(${hash % 360} 70% 64%)`;
  }

  // Families for the synth, by class name; General MIDI program names (the `gm` table) by keyword.
  const FAMILY_RULES = [
    [/drum|percussion_kit/, "drums"], [/cello/, "cello"], [/violin|viola|fiddle|string|choir|voice|pad/, "violin"],
    [/contrabass|bass|timpani/, "bass"], [/guitar|sitar|banjo|shamisen|koto/, "guitar"], [/harp|kalimba/, "harp"],
    [/flute|piccolo|recorder|pipe|whistle|ocarina|bottle|shakuhachi|lead/, "flute"],
    [/clarinet|sax|oboe|bassoon|horn_english|english_horn|accordion|harmonica|bagpipe|shanai|reed/, "clarinet"],
    [/trumpet|trombone|tuba|horn|brass/, "trumpet"],
  ];

  function familyOf(instrument) {
    const name = String(instrument).toLowerCase();
    if (PATCHES[name]) return name;
    for (const [rule, family] of FAMILY_RULES) if (rule.test(name)) return family;
    return "piano";
  }

  // -- the synth ----------------------------------------------------------------------------------------
  // Each patch: oscillators (type, frequency multiple, level), an amplitude envelope (attack; a decay time
  // constant towards `sustain` for struck and plucked sounds; release), an optional low-pass filter with
  // its own sweep, and vibrato for bowed and blown sounds.
  const PATCHES = {
    piano: { oscs: [["triangle", 1, 1], ["sine", 2, 0.35], ["sine", 3, 0.1]], attack: 0.004, decay: "piano",
      sustain: 0, release: 0.25, level: 0.5 },
    harp: { oscs: [["triangle", 1, 1], ["sine", 2, 0.2]], attack: 0.003, decay: 0.7, sustain: 0, release: 0.7,
      level: 0.5 },
    guitar: { oscs: [["sawtooth", 1, 0.6], ["triangle", 1, 0.6]], attack: 0.003, decay: 0.8, sustain: 0.15,
      release: 0.12, level: 0.42, filter: { from: 4200, to: 1000, time: 0.12 } },
    bass: { oscs: [["triangle", 1, 1], ["square", 1, 0.22]], attack: 0.008, decay: 0.35, sustain: 0.7,
      release: 0.08, level: 0.62, filter: { from: 1100, to: 700, time: 0.1 } },
    violin: { oscs: [["sawtooth", 1, 0.6], ["sawtooth", 1.003, 0.4]], attack: 0.09, sustain: 1, release: 0.18,
      level: 0.42, filter: { from: 3200, to: 3200 }, vibrato: [5.6, 11] },
    cello: { oscs: [["sawtooth", 1, 0.7], ["sawtooth", 0.998, 0.3]], attack: 0.1, sustain: 1, release: 0.2,
      level: 0.36, filter: { from: 1900, to: 1900 }, vibrato: [5, 9] },
    flute: { oscs: [["sine", 1, 1], ["sine", 2, 0.12], ["triangle", 1, 0.1]], attack: 0.07, sustain: 1,
      release: 0.12, level: 0.34, vibrato: [5, 8] },
    clarinet: { oscs: [["square", 1, 0.7], ["sine", 1, 0.3]], attack: 0.04, sustain: 1, release: 0.1, level: 0.3,
      filter: { from: 2300, to: 2300 } },
    trumpet: { oscs: [["sawtooth", 1, 1]], attack: 0.03, sustain: 1, release: 0.1, level: 0.36,
      filter: { from: 700, to: 2800, time: 0.05 } },
  };

  const audio = { ctx: null, out: null, noise: null, playing: null };

  function audioContext() {
    if (!audio.ctx) {
      const Context = window.AudioContext || window.webkitAudioContext;
      if (!Context) throw new Error("This browser cannot play sound; download the MIDI file instead.");
      const ctx = new Context();
      const compressor = ctx.createDynamicsCompressor();
      compressor.threshold.value = -18;
      compressor.ratio.value = 4;
      const master = ctx.createGain();
      master.gain.value = 0.8;
      master.connect(compressor).connect(ctx.destination);
      const noise = ctx.createBuffer(1, ctx.sampleRate, ctx.sampleRate);
      const samples = noise.getChannelData(0);
      for (let i = 0; i < samples.length; i++) samples[i] = Math.random() * 2 - 1;
      Object.assign(audio, { ctx, out: master, noise });
    }
    if (audio.ctx.state === "suspended") audio.ctx.resume();
    return audio.ctx;
  }

  const midiHz = (pitch) => 440 * 2 ** ((pitch - 69) / 12);
  const velocityLevel = (velocity) => 0.15 + 0.85 * (clamp(velocity, 1, 127) / 127) ** 1.5;

  function playTone(ctx, bus, note, when, sources) {
    const patch = PATCHES[familyOf(note.instrument)] || PATCHES.piano;
    const length = Math.max(0.05, note.end - note.start);
    const freq = midiHz(note.pitch);
    const peak = 0.16 * patch.level * velocityLevel(note.velocity);
    const attack = Math.min(patch.attack, length * 0.5);
    const amp = ctx.createGain();
    amp.gain.setValueAtTime(0, when);
    amp.gain.linearRampToValueAtTime(peak, when + attack);
    const decay = patch.decay === "piano" ? clamp(0.9 * 2 ** ((60 - note.pitch) / 24), 0.25, 2.5) : patch.decay;
    if (decay) amp.gain.setTargetAtTime(peak * patch.sustain, when + attack, decay);
    const off = when + length;
    amp.gain.setTargetAtTime(0, off, patch.release / 4);
    const stopAt = off + patch.release * 1.6;
    let input = amp;
    if (patch.filter) {
      const filter = ctx.createBiquadFilter();
      filter.type = "lowpass";
      filter.Q.value = 0.7;
      const scale = clamp(freq / 262, 0.6, 2);  // brighter with pitch, as real instruments are
      filter.frequency.setValueAtTime(Math.min(18000, patch.filter.from * scale), when);
      if (patch.filter.time) {
        filter.frequency.setTargetAtTime(Math.min(18000, patch.filter.to * scale), when, patch.filter.time);
      }
      filter.connect(amp);
      input = filter;
    }
    let lfo = null;
    let lfoDepth = null;
    if (patch.vibrato && length > 0.25) {
      lfo = ctx.createOscillator();
      lfo.frequency.value = patch.vibrato[0];
      lfoDepth = ctx.createGain();
      lfoDepth.gain.setValueAtTime(0, when);
      lfoDepth.gain.linearRampToValueAtTime(patch.vibrato[1], when + 0.3);  // vibrato grows in, as players do
      lfo.connect(lfoDepth);
      lfo.start(when);
      lfo.stop(stopAt);
      sources.add(lfo);
      lfo.onended = () => sources.delete(lfo);
    }
    // Partials above half the sample rate cannot be played (they would alias): left out.
    const partials = patch.oscs.filter(([, multiple], i) => i === 0 || freq * multiple < ctx.sampleRate / 2);
    partials.forEach(([type, multiple, level], i) => {
      const osc = ctx.createOscillator();
      osc.type = type;
      osc.frequency.value = Math.min(freq * multiple, ctx.sampleRate / 2);
      const gain = ctx.createGain();
      gain.gain.value = level;
      osc.connect(gain).connect(input);
      if (lfoDepth) lfoDepth.connect(osc.detune);
      osc.start(when);
      osc.stop(stopAt);
      sources.add(osc);
      osc.onended = () => {
        sources.delete(osc);
        gain.disconnect();
        if (i === 0) amp.disconnect();
      };
    });
    amp.connect(bus);
  }

  function noiseBurst(ctx, bus, when, { level, decay, type = "highpass", freq = 1000, q = 0.7 }, sources) {
    const src = ctx.createBufferSource();
    src.buffer = audio.noise;
    const filter = ctx.createBiquadFilter();
    filter.type = type;
    filter.frequency.value = freq;
    filter.Q.value = q;
    const amp = ctx.createGain();
    amp.gain.setValueAtTime(level, when);
    amp.gain.exponentialRampToValueAtTime(0.0005, when + decay);
    src.connect(filter).connect(amp).connect(bus);
    src.start(when, Math.random() * 0.5);
    src.stop(when + decay + 0.02);
    sources.add(src);
    src.onended = () => { sources.delete(src); amp.disconnect(); };
  }

  function sweep(ctx, bus, when, { level, from, to, decay, type = "sine" }, sources) {
    const osc = ctx.createOscillator();
    osc.type = type;
    osc.frequency.setValueAtTime(from, when);
    osc.frequency.exponentialRampToValueAtTime(to, when + decay * 0.5);
    const amp = ctx.createGain();
    amp.gain.setValueAtTime(level, when);
    amp.gain.exponentialRampToValueAtTime(0.0005, when + decay);
    osc.connect(amp).connect(bus);
    osc.start(when);
    osc.stop(when + decay + 0.02);
    sources.add(osc);
    osc.onended = () => { sources.delete(osc); amp.disconnect(); };
  }

  // General MIDI percussion keys, grouped into a few synthesized sounds.
  function playDrum(ctx, bus, note, when, sources) {
    const v = 0.26 * velocityLevel(note.velocity);
    const p = note.pitch;
    if (p === 35 || p === 36) {
      sweep(ctx, bus, when, { level: 1.6 * v, from: 150, to: 42, decay: 0.35 }, sources);
    } else if (p >= 37 && p <= 40) {
      noiseBurst(ctx, bus, when, { level: 0.9 * v, decay: 0.18, freq: 1400 }, sources);
      sweep(ctx, bus, when, { level: 0.6 * v, from: 220, to: 160, decay: 0.09, type: "triangle" }, sources);
    } else if (p === 42 || p === 44) {
      noiseBurst(ctx, bus, when, { level: 0.45 * v, decay: 0.05, freq: 7500 }, sources);
    } else if (p === 46) {
      noiseBurst(ctx, bus, when, { level: 0.4 * v, decay: 0.32, freq: 7000 }, sources);
    } else if ([49, 52, 55, 57].includes(p)) {
      noiseBurst(ctx, bus, when, { level: 0.4 * v, decay: 1.2, freq: 5000 }, sources);
    } else if ([51, 53, 59].includes(p)) {
      noiseBurst(ctx, bus, when, { level: 0.3 * v, decay: 0.55, type: "bandpass", freq: 6500, q: 1.5 }, sources);
    } else if ([41, 43, 45, 47, 48, 50].includes(p)) {
      const base = 70 + (p - 41) * 16;
      sweep(ctx, bus, when, { level: 1.1 * v, from: base * 1.6, to: base, decay: 0.3 }, sources);
    } else {
      noiseBurst(ctx, bus, when, { level: 0.5 * v, decay: 0.12, type: "bandpass", freq: 300 + (p % 30) * 180, q: 2 },
        sources);
    }
  }

  // Plays notes from `from` seconds; notes are scheduled a little ahead of time as playback goes, so that a
  // long piece never holds thousands of audio nodes at once. Only one piece plays at a time.
  function play(notes, seconds, { from = 0, onTime, onEnd, owner = null }) {
    stopPlayback();
    const ctx = audioContext();
    const bus = ctx.createGain();
    bus.connect(audio.out);
    const sources = new Set();
    const sorted = notes.filter((n) => n.end > from).sort((a, b) => a.start - b.start);
    const t0 = ctx.currentTime + 0.08 - from;
    let next = 0;
    let frame = 0;
    const LOOKAHEAD = 0.4;
    const schedule = () => {
      const horizon = ctx.currentTime - t0 + LOOKAHEAD;
      while (next < sorted.length && sorted[next].start < horizon) {
        const note = sorted[next++];
        const when = Math.max(ctx.currentTime, t0 + Math.max(note.start, from));
        const clipped = note.start < from ? { ...note, start: from } : note;
        if (clipped.drum || familyOf(clipped.instrument) === "drums") playDrum(ctx, bus, clipped, when, sources);
        else playTone(ctx, bus, clipped, when, sources);
      }
    };
    const end = Math.max(seconds, ...sorted.map((n) => n.end), from);
    const handle = {
      owner,
      stop(reason = "stopped") {
        if (audio.playing !== handle) return;
        audio.playing = null;
        clearInterval(timer);
        cancelAnimationFrame(frame);
        const now = ctx.currentTime;
        bus.gain.setTargetAtTime(0, now, 0.02);
        for (const src of sources) {
          try { src.stop(now + 0.1); } catch (e) { /* not started yet */ }
        }
        setTimeout(() => bus.disconnect(), 300);
        if (onEnd) onEnd(reason);
      },
    };
    const tick = () => {
      const t = ctx.currentTime - t0;
      if (onTime) onTime(clamp(t, 0, end));
      if (t >= end + 0.5) handle.stop("ended");  // the last notes' releases ring out first
      else frame = requestAnimationFrame(tick);
    };
    audio.playing = handle;
    schedule();
    const timer = setInterval(schedule, 100);
    frame = requestAnimationFrame(tick);
    return handle;
  }

  function stopPlayback() {
    if (audio.playing) audio.playing.stop();
  }

  // -- piano roll --------------------------------------------------------------------------------------
  const NOTE_NAMES = ["C", "C♯", "D", "D♯", "E", "F", "F♯", "G", "G♯", "A", "A♯", "B"];
  const BLACK = new Set([1, 3, 6, 8, 10]);

  // Rows of the drum lane, low to high sound: kicks, snares and toms, hi-hats, cymbals, the rest.
  function drumRow(pitch) {
    if (pitch === 35 || pitch === 36) return 0;
    if ((pitch >= 37 && pitch <= 41) || [43, 45, 47, 48, 50].includes(pitch)) return 1;
    if ([42, 44, 46].includes(pitch)) return 2;
    if ([49, 51, 52, 53, 55, 57, 59].includes(pitch)) return 3;
    return 4;
  }

  class Roll {
    // notes: the API's note objects; seconds: the piece's length; given: seconds at the start that were
    // given (an opening or an earlier take), shaded so that the new part stands out.
    constructor({ notes, seconds, given = 0, height = 170, label = "Piano roll" }) {
      this.notes = notes || [];
      this.seconds = Math.max(seconds || 0, ...this.notes.map((n) => n.end), 0.5);
      this.given = given;
      this.height = height;
      this.canvas = el("canvas", { class: "roll-canvas", role: "img", "aria-label": label });
      this.cursor = el("div", { class: "roll-cursor", hidden: true });
      this.el = el("div", { class: "roll", style: `height:${height}px` }, this.canvas, this.cursor);
      this.el.rollObject = this;
      this.width = 0;
      this.geometry = { left: 0, plotWidth: 1 };
      if (window.ResizeObserver) {
        new ResizeObserver(() => this.draw()).observe(this.el);
      } else {
        window.addEventListener("resize", () => this.draw());
      }
      requestAnimationFrame(() => this.draw());
    }

    draw() {
      const width = Math.round(this.el.clientWidth);
      if (!width) return;
      this.width = width;
      const height = this.height;
      const dpr = window.devicePixelRatio || 1;
      this.canvas.width = Math.round(width * dpr);
      this.canvas.height = Math.round(height * dpr);
      this.canvas.style.width = `${width}px`;
      this.canvas.style.height = `${height}px`;
      const g = this.canvas.getContext("2d");
      g.setTransform(dpr, 0, 0, dpr, 0, 0);

      const pitched = this.notes.filter((n) => !n.drum);
      const drums = this.notes.filter((n) => n.drum);
      const left = 34;
      const right = 6;
      const axis = 16;
      const laneH = drums.length ? 30 : 0;
      const top = 4;
      const plotW = Math.max(10, width - left - right);
      const plotBottom = height - axis - (laneH ? laneH + 4 : 0);
      const plotH = Math.max(10, plotBottom - top);
      const x = (t) => left + (t / this.seconds) * plotW;
      this.geometry = { left, plotWidth: plotW };

      g.fillStyle = "#11131a";
      g.fillRect(0, 0, width, height);

      let lo = 60;
      let hi = 72;
      if (pitched.length) {
        lo = Math.min(...pitched.map((n) => n.pitch));
        hi = Math.max(...pitched.map((n) => n.pitch));
      }
      const span = Math.max(hi - lo + 1, 18);
      const extra = span - (hi - lo + 1);
      lo = Math.max(0, lo - Math.floor(extra / 2) - 1);
      hi = Math.min(127, lo + span + 1);
      const rowH = plotH / (hi - lo + 1);
      const y = (p) => top + (hi - p) * rowH;

      // Keyboard stripes and octave lines, so that pitches can be read off the roll.
      for (let p = lo; p <= hi; p++) {
        if (BLACK.has(p % 12)) {
          g.fillStyle = "#161922";
          g.fillRect(left, y(p), plotW, rowH);
        }
      }
      g.font = "10px system-ui, sans-serif";
      g.textBaseline = "middle";
      // Octave names need ~14 px each: on a crowded roll, every second (third...) octave is named.
      const labelOctaves = [1, 2, 3, 4, 6, 12].find((k) => rowH * 12 * k >= 14) || 12;
      for (let p = lo; p <= hi; p++) {
        if (p % 12 !== 0) continue;
        g.fillStyle = "#2a2f3c";
        g.fillRect(left, y(p) + rowH - 0.5, plotW, 1);
        if ((p / 12) % labelOctaves === 0) {
          g.fillStyle = "#8a91a0";
          g.fillText(`${NOTE_NAMES[0]}${p / 12 - 1}`, 4, y(p) + rowH / 2);
        }
      }

      // Time grid: a line a second (every 5 s stronger), labels spaced to fit.
      const stepChoices = [1, 2, 5, 10, 15, 30, 60];
      const labelStep = stepChoices.find((s) => (s / this.seconds) * plotW >= 46) || 60;
      g.textBaseline = "alphabetic";
      for (let t = 0; t <= this.seconds + 1e-6; t += 1) {
        const strong = t % 5 === 0;
        if (!strong && plotW / this.seconds < 12) continue;
        g.fillStyle = strong ? "#2c3140" : "#1d212c";
        g.fillRect(Math.round(x(t)), top, 1, plotBottom - top + (laneH ? laneH + 4 : 0));
        if (t % labelStep === 0) {
          g.fillStyle = "#8a91a0";
          g.textAlign = t === 0 ? "left" : x(t) > width - 14 ? "right" : "center";
          const text = t < 60 ? `${t}s` : `${Math.floor(t / 60)}:${String(t % 60).padStart(2, "0")}`;
          g.fillText(text, x(t), height - 4);
        }
      }
      g.textAlign = "left";

      if (this.given > 0) {
        const gx = x(Math.min(this.given, this.seconds));
        g.fillStyle = "rgba(255,255,255,0.045)";
        g.fillRect(left, top, gx - left, height - axis - top);
        g.strokeStyle = "rgba(242,193,78,0.7)";
        g.setLineDash([4, 3]);
        g.beginPath();
        g.moveTo(Math.round(gx) + 0.5, top);
        g.lineTo(Math.round(gx) + 0.5, height - axis);
        g.stroke();
        g.setLineDash([]);
      }

      for (const n of pitched) {
        const nx = x(n.start);
        const nw = Math.max(2, x(n.end) - nx - 0.5);
        // Notes stay at least 3 px thick on a crowded roll, centred on their row, so that they read as notes.
        const h = Math.max(3, rowH - (rowH > 4 ? 1 : 0));
        const ny = y(n.pitch) + (rowH - h) / 2;
        g.globalAlpha = 0.55 + 0.45 * clamp(n.velocity / 127, 0, 1);
        g.fillStyle = colourOf(n.instrument);
        if (g.roundRect && h > 3) {
          g.beginPath();
          g.roundRect(nx, ny, nw, h, Math.min(2, h / 2));
          g.fill();
        } else {
          g.fillRect(nx, ny, nw, h);
        }
      }
      g.globalAlpha = 1;

      if (laneH) {
        const laneTop = plotBottom + 4;
        g.fillStyle = "#171a23";
        g.fillRect(left, laneTop, plotW, laneH);
        g.fillStyle = "#8a91a0";
        g.textBaseline = "middle";
        g.fillText("drums", 2, laneTop + laneH / 2);
        const rowStep = laneH / 5;
        for (const n of drums) {
          const cx = x(n.start);
          const cy = laneTop + laneH - rowStep * (drumRow(n.pitch) + 0.5);
          const r = 1.6 + 1.6 * clamp(n.velocity / 127, 0, 1);
          g.globalAlpha = 0.6 + 0.4 * clamp(n.velocity / 127, 0, 1);
          g.fillStyle = colourOf(n.instrument || "drums");
          g.beginPath();
          g.moveTo(cx, cy - r);
          g.lineTo(cx + r, cy);
          g.lineTo(cx, cy + r);
          g.lineTo(cx - r, cy);
          g.closePath();
          g.fill();
        }
        g.globalAlpha = 1;
      }

      if (!this.notes.length) {
        g.fillStyle = "#8a91a0";
        g.textAlign = "center";
        g.textBaseline = "middle";
        g.fillText("(silence)", left + plotW / 2, top + plotH / 2);
        g.textAlign = "left";
      }
      if (this.cursorTime !== undefined && this.cursorTime !== null) this.setCursor(this.cursorTime);
    }

    setCursor(t) {
      this.cursorTime = t;
      if (t === null || t === undefined) {
        this.cursor.hidden = true;
        return;
      }
      const px = this.geometry.left + (clamp(t, 0, this.seconds) / this.seconds) * this.geometry.plotWidth;
      this.cursor.hidden = false;
      this.cursor.style.transform = `translateX(${px.toFixed(1)}px)`;
      this.cursor.dataset.time = t.toFixed(2);
    }

    // The time under a click on the roll, for starting playback there.
    timeAt(clientX) {
      const box = this.el.getBoundingClientRect();
      return clamp((clientX - box.left - this.geometry.left) / this.geometry.plotWidth, 0, 1) * this.seconds;
    }
  }

  // A play / stop button over a roll: the cursor follows the sound; clicking the roll plays from there.
  function playButton(roll, notes, seconds, name) {
    const button = el("button", { type: "button", class: "button play", "aria-pressed": "false",
      "aria-label": `Play ${name}` }, el("span", { class: "play-icon", "aria-hidden": "true" }),
    el("span", { class: "play-text", text: "Play" }));
    const setPlaying = (on) => {
      button.setAttribute("aria-pressed", String(on));
      button.setAttribute("aria-label", `${on ? "Stop" : "Play"} ${name}`);
      button.classList.toggle("playing", on);
      button.querySelector(".play-text").textContent = on ? "Stop" : "Play";
      roll.el.classList.toggle("is-playing", on);
    };
    let handle = null;
    const start = (from) => {
      clearError();
      try {
        handle = play(notes, seconds, {
          from,
          owner: roll.el,
          onTime: (t) => roll.setCursor(t),
          onEnd: () => { handle = null; setPlaying(false); roll.setCursor(null); },
        });
        setPlaying(true);
      } catch (e) {
        showError(e.message);
      }
    };
    button.addEventListener("click", () => {
      if (handle) handle.stop();
      else start(0);
    });
    roll.el.addEventListener("click", (event) => start(roll.timeAt(event.clientX)));
    roll.el.title = "Click to play from here";
    return button;
  }

  function renderLegend(container, instruments) {
    container.replaceChildren();
    const order = state.model ? state.model.instruments : [];
    const rank = (name) => (order.includes(name) ? order.indexOf(name) : order.length);
    const names = [...new Set(instruments)].sort((a, b) => rank(a) - rank(b));
    if (!names.length) return;
    container.append(el("span", { class: "legend-title", text: "Colours:" }));
    for (const name of names) {
      container.append(el("span", { class: "legend-item" },
        el("span", { class: "swatch", style: `background:${colourOf(name)}` }), prettyLabel(name)));
    }
  }

  // -- the model and the settings form --------------------------------------------------------------------
  const state = { model: null, upload: null };

  const NUM_CANDIDATES = 4;

  function numSamples() {
    const most = state.model && state.model.limits ? state.model.limits.max_num_samples : NUM_CANDIDATES;
    return Math.max(1, Math.min(NUM_CANDIDATES, most || NUM_CANDIDATES));
  }

  function maxSeconds() {
    return state.model && state.model.limits ? state.model.limits.max_seconds : 600;
  }

  async function loadModel() {
    const model = await api("/v1/model");
    state.model = model;
    const info = model.model || {};
    const parameters = info.parameters >= 1e6 ? `${(info.parameters / 1e6).toFixed(1)}M`
      : info.parameters >= 1e3 ? `${Math.round(info.parameters / 1e3)}k` : `${info.parameters}`;
    $("#model-info").textContent = `Model at step ${model.step} · ${parameters} parameters · `
      + `${info.layers} layers · ${info.context_tokens}-token context${model.audio ? " · WAV rendering on" : ""}`;

    const style = $("#style");
    style.replaceChildren(el("option", { value: "none", text: "Any (no style)" }),
      ...model.labels.map((label) => el("option", { value: label, text: prettyLabel(label) })));

    const list = $("#instrument-list");
    list.replaceChildren();
    const preferred = model.instruments.includes("piano") ? ["piano"] : model.instruments.slice(0, 1);
    for (const name of model.instruments) {
      const id = `inst-${slug(name)}`;
      list.append(el("label", { class: "chip", for: id },
        el("input", { type: "checkbox", id, name: "instruments", value: name, checked: preferred.includes(name) }),
        el("span", { class: "swatch", style: `background:${colourOf(name)}`, "aria-hidden": "true" }),
        el("span", { text: prettyLabel(name) })));
    }

    const opening = $("#opening");
    opening.replaceChildren(el("option", { value: "none", text: "None: start from silence" }));
    if (model.openings && model.openings.length) {
      opening.append(el("optgroup", { label: "Bundled openings" }, ...model.openings.map((o) =>
        el("option", { value: `opening:${o.name}`,
          text: `${openingTitle(o.name)} · ${(o.instruments || []).join(", ")} · ${fmtSeconds(o.seconds)}`,
        }))));
    }
    opening.append(el("option", { value: "upload", text: "My MIDI file…" }));

    const most = maxSeconds();
    for (const input of [$("#length"), $("#primer-seconds")]) input.max = String(most);
    $("#length").value = String(Math.min(20, most));
    $("#extend-by").max = String(most);
    $("#extend-by").value = String(Math.min(5, most));
    onOpeningChange();
    resetTree();
    document.body.dataset.ready = "true";
  }

  function selectedInstruments() {
    return [...document.querySelectorAll('#instrument-list input[type="checkbox"]:checked')].map((i) => i.value);
  }

  function checkInstruments(names) {
    for (const input of document.querySelectorAll('#instrument-list input[type="checkbox"]')) {
      if (names.includes(input.value)) input.checked = true;
    }
  }

  function readNumber(input, { name, min = -Infinity, max = Infinity, integer = false, optional = false }) {
    const raw = input.value.trim();
    if (raw === "" && optional) return null;
    const value = Number(raw);
    if (raw === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      throw new Error(`${name} must be a${integer ? " whole" : ""} number.`);
    }
    if (value < min || value > max) {
      throw new Error(`${name} must be between ${min} and ${max}.`);
    }
    return value;
  }

  // The settings every request shares.
  function samplingSettings() {
    const instruments = selectedInstruments();
    if (!instruments.length) throw new Error("Choose at least one instrument.");
    const style = $("#style").value;
    return {
      label: style === "none" ? null : style,
      instruments,
      temperature: Number($("#temperature").value),
      top_p: readNumber($("#top-p"), { name: "Top-p", min: 0.01, max: 1 }),
      top_k: readNumber($("#top-k"), { name: "Top-k", min: 0, integer: true }),
      seed: readNumber($("#seed"), { name: "Seed", min: 0, integer: true, optional: true }),
      num_samples: numSamples(),
    };
  }

  // The chosen start: kind none / opening / upload, the request fields for it, and its length in seconds.
  function startSettings() {
    const choice = $("#opening").value;
    const keep = readNumber($("#primer-seconds"), { name: "Keep the first", min: 0.1, max: maxSeconds(),
      optional: true });
    if (choice.startsWith("opening:")) {
      const name = choice.slice("opening:".length);
      const opening = state.model.openings.find((o) => o.name === name);
      const seconds = keep === null ? opening.seconds : Math.min(keep, opening.seconds);
      return { kind: "opening", name, fields: { opening: name, primer_seconds: keep }, seconds,
        title: `Opening: ${openingTitle(name)}`, notes: null };
    }
    if (choice === "upload") {
      const upload = state.upload;
      if (!upload) throw new Error("Choose a MIDI file to start from, or pick another opening.");
      const full = upload.seconds;
      if (full === null && keep === null) {
        throw new Error("This MIDI file's length is unknown: say how many seconds of it to keep.");
      }
      const seconds = keep === null ? full : full === null ? keep : Math.min(keep, full);
      const notes = upload.notes ? upload.notes.filter((n) => n.start < seconds)
        .map((n) => ({ ...n, end: Math.min(n.end, seconds) })) : null;
      return { kind: "upload", name: upload.name, fields: { primer_midi: upload.base64, primer_seconds: keep },
        seconds, title: `My file: ${upload.name}`, notes };
    }
    return { kind: "none", fields: {}, seconds: 0, title: "Start", notes: [] };
  }

  function onOpeningChange() {
    const choice = $("#opening").value;
    $("#upload-field").hidden = choice !== "upload";
    $("#primer-field").hidden = choice === "none";
    if (choice.startsWith("opening:") && state.model) {
      const opening = state.model.openings.find((o) => `opening:${o.name}` === choice);
      if (opening) {
        if (opening.label && state.model.labels.includes(opening.label)) $("#style").value = opening.label;
        checkInstruments(opening.instruments || []);
      }
    }
    if (choice === "upload" && state.upload) checkInstruments(state.upload.instruments);
    refreshRoot();
  }

  async function onUpload() {
    const file = $("#upload").files[0];
    state.upload = null;
    $("#upload-info").textContent = "";
    if (!file) return refreshRoot();
    const most = state.model.limits.max_upload_bytes;
    if (most && file.size > most) {
      showError(`${file.name} is ${Math.ceil(file.size / 1024)} KiB; this server takes MIDI files up to `
        + `${Math.floor(most / 1024)} KiB.`);
      $("#upload").value = "";
      return refreshRoot();
    }
    const bytes = new Uint8Array(await file.arrayBuffer());
    let parsed = null;
    try {
      parsed = parseMidi(bytes, state.model.instruments);
    } catch (e) {
      parsed = null;
    }
    let base64 = "";
    for (let i = 0; i < bytes.length; i += 0x8000) base64 += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    state.upload = { name: file.name, base64: btoa(base64), seconds: parsed ? parsed.seconds : null,
      notes: parsed ? parsed.notes : null, instruments: parsed ? parsed.instruments : [] };
    $("#upload-info").textContent = parsed
      ? `${fmtSeconds(parsed.seconds)} · ${parsed.notes.length} notes${parsed.instruments.length
        ? ` · ${parsed.instruments.map(prettyLabel).join(", ")}` : ""}`
      : "Could not read this file here; the server will say whether it can.";
    checkInstruments(state.upload.instruments);
    refreshRoot();
  }

  // -- MIDI files: enough of a reader to show an uploaded opening and know its length ------------------------
  // General MIDI program -> MuseNet instrument class, as data_pipeline/instruments.py maps them.
  const GM_CLASS = [[7, "piano"], [15, "piano"], [20, "piano"], [23, "clarinet"], [31, "guitar"], [39, "bass"],
    [41, "violin"], [42, "cello"], [43, "bass"], [45, "violin"], [46, "harp"], [47, "bass"], [54, "violin"],
    [55, "piano"], [63, "trumpet"], [71, "clarinet"], [87, "flute"], [95, "violin"], [103, "piano"],
    [107, "guitar"], [108, "harp"], [109, "clarinet"], [110, "violin"], [111, "clarinet"], [127, "piano"]];

  function parseMidi(bytes, known) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const text = (at) => String.fromCharCode(...bytes.subarray(at, at + 4));
    if (text(0) !== "MThd") throw new Error("not a MIDI file");
    const headerLength = view.getUint32(4);
    const tracks = view.getUint16(10);
    const division = view.getUint16(12);
    if (division & 0x8000) throw new Error("SMPTE time is not read here");
    const tempos = [];
    const events = [];
    let at = 8 + headerLength;
    for (let track = 0; track < tracks && at + 8 <= bytes.length; track++) {
      const length = view.getUint32(at + 4);
      if (text(at) !== "MTrk") { at += 8 + length; continue; }
      let i = at + 8;
      const end = Math.min(bytes.length, i + length);
      let tick = 0;
      let status = 0;
      const varint = () => {
        let value = 0;
        for (let k = 0; k < 4; k++) {
          const b = bytes[i++];
          value = (value << 7) | (b & 0x7f);
          if (!(b & 0x80)) break;
        }
        return value;
      };
      while (i < end) {
        tick += varint();
        let byte = bytes[i];
        if (byte & 0x80) { status = byte; i++; } else if (!status) throw new Error("bad running status");
        byte = status;
        if (byte === 0xff) {
          const type = bytes[i++];
          const size = varint();
          if (type === 0x51 && size === 3) tempos.push([tick, (bytes[i] << 16) | (bytes[i + 1] << 8) | bytes[i + 2]]);
          i += size;
          status = 0;
        } else if (byte === 0xf0 || byte === 0xf7) {
          i += varint();
          status = 0;
        } else {
          const kind = byte & 0xf0;
          const channel = byte & 0x0f;
          const a = bytes[i++];
          const b = kind === 0xc0 || kind === 0xd0 ? 0 : bytes[i++];
          events.push({ tick, kind, channel, a, b, track });
        }
      }
      at = end;
    }
    tempos.sort((x, y) => x[0] - y[0]);
    const segments = [[0, 0, 500000]];  // [tick, seconds at tick, microseconds per quarter]
    for (const [tick, tempo] of tempos) {
      const [t0, s0, q0] = segments[segments.length - 1];
      segments.push([tick, s0 + ((tick - t0) * q0) / division / 1e6, tempo]);
    }
    const seconds = (tick) => {
      let k = segments.length - 1;
      while (k > 0 && segments[k][0] > tick) k--;
      const [t0, s0, q0] = segments[k];
      return s0 + ((tick - t0) * q0) / division / 1e6;
    };
    events.sort((x, y) => x.tick - y.tick);
    const program = new Array(16).fill(0);
    const open = new Map();
    const notes = [];
    let last = 0;
    const classOf = (channel) => {
      if (channel === 9) return "drums";
      const name = GM_CLASS.find(([top]) => program[channel] <= top)[1];
      return known.includes(name) ? name : "primer";
    };
    for (const e of events) {
      const time = seconds(e.tick);
      last = Math.max(last, time);
      if (e.kind === 0xc0) program[e.channel] = e.a;
      const key = `${e.track}:${e.channel}:${e.a}`;
      if (e.kind === 0x90 && e.b > 0) {
        if (e.channel === 9) {
          notes.push({ instrument: "drums", pitch: e.a, velocity: e.b, start: time, end: time + 0.1, drum: true });
        } else {
          if (!open.has(key)) open.set(key, []);
          open.get(key).push({ instrument: classOf(e.channel), pitch: e.a, velocity: e.b, start: time, drum: false });
        }
      } else if (e.kind === 0x80 || (e.kind === 0x90 && e.b === 0)) {
        const stack = open.get(key);
        if (stack && stack.length) notes.push({ ...stack.shift(), end: time });
      }
    }
    for (const stack of open.values()) for (const n of stack) notes.push({ ...n, end: last });
    const instruments = [...new Set(notes.map((n) => n.instrument))].filter((n) => known.includes(n));
    return { seconds: Math.max(last, ...notes.map((n) => n.end), 0), notes, instruments };
  }

  // -- candidate cards -----------------------------------------------------------------------------------
  function candidateCard(index, target) {
    const title = `Candidate ${index + 1}`;
    const progress = el("progress", { max: "1", value: "0", "aria-label": `${title} progress` });
    const progressText = el("span", { class: "progress-text", text: `0.0 / ${fmtSeconds(target)}` });
    const card = el("article", { class: "candidate", "aria-label": title, dataset: { index: String(index),
      state: "waiting" } },
    el("header", { class: "card-head" }, el("h3", { text: title }), el("span", { class: "card-meta" })),
    el("div", { class: "progress-row" }, progress, progressText),
    el("div", { class: "card-body" }),
    el("div", { class: "card-actions" }));
    card.setProgress = (done, total) => {
      progress.value = total > 0 ? clamp(done / total, 0, 1) : 0;
      progressText.textContent = `${done.toFixed(1)} / ${fmtSeconds(total)}`;
      card.dataset.state = "running";
    };
    return card;
  }

  // Fills a card with its finished piece. `extra` adds buttons (keep this take, develop it).
  function fillCard(card, result, { given, filename, extra = [] }) {
    const index = Number(card.dataset.index);
    const name = `candidate ${index + 1}`;
    card.dataset.state = "done";
    card.querySelector(".progress-row").hidden = true;
    const meta = card.querySelector(".card-meta");
    const instruments = [...new Set(result.notes.map((n) => n.instrument))];
    // A piece that did not end by itself was stopped at the server's token cap: say so, as it may stop abruptly.
    meta.textContent = `${fmtSeconds(result.seconds)} · ${result.notes.length} notes${result.ended ? "" : " · cut"}`;
    meta.title = result.ended ? "" : "Stopped at the most tokens a piece may have; it may end abruptly";
    const roll = new Roll({ notes: result.notes, seconds: result.seconds, given,
      label: `Piano roll of ${name}: ${instruments.map(prettyLabel).join(", ") || "no notes"}` });
    card.querySelector(".card-body").replaceChildren(roll.el);
    const actions = card.querySelector(".card-actions");
    actions.replaceChildren(playButton(roll, result.notes, result.seconds, name),
      downloadLink("MIDI", result.midi_url, filename, `Download ${name} as MIDI`));
    if (result.wav_url) {
      actions.append(downloadLink("WAV", result.wav_url, filename.replace(/\.mid$/, ".wav"),
        `Download ${name} as audio rendered by the server`));
    }
    actions.append(...extra);
    return instruments;
  }

  function failCard(card, message) {
    card.dataset.state = "failed";
    card.querySelector(".progress-row").hidden = true;
    card.querySelector(".card-body").replaceChildren(el("p", { class: "card-note", text: message }));
  }

  // Runs one request into a set of cards; resolves to the results (or null if it failed or was cancelled).
  async function generateInto({ body, container, legend, status, button, cancelButton, given, filenameOf,
    extrasOf, heading }) {
    clearError();
    stopPlayback();
    const count = body.num_samples;
    const cards = Array.from({ length: count }, (_, i) => candidateCard(i, body.seconds));
    container.replaceChildren(...(heading ? [heading] : []), ...cards);
    container.dataset.state = "running";
    legend.replaceChildren();
    button.disabled = true;
    status.textContent = "Sending…";
    const job = startJob(body, {
      onQueued: (started) => { status.textContent = `Queued · seed ${started.seed}`; },
      onProgress: (update) => {
        const total = update.target_seconds || body.seconds;
        (update.progress || []).forEach((done, i) => cards[i] && cards[i].setProgress(done, total));
        status.textContent = "Writing music…";
      },
    });
    cancelButton.hidden = false;
    cancelButton.disabled = false;
    const onCancel = () => { cancelButton.disabled = true; status.textContent = "Cancelling…"; job.cancel(); };
    cancelButton.addEventListener("click", onCancel);
    try {
      const final = await job.done;
      if (final.status === "cancelled") {
        status.textContent = "Cancelled.";
        cards.forEach((card) => failCard(card, "Cancelled."));
        container.dataset.state = "cancelled";
        return null;
      }
      if (final.status === "failed") throw new ApiError(`Generation failed: ${final.error || "no reason given"}`);
      const results = final.results || [];
      const instruments = [];
      results.forEach((result) => {
        const card = cards[result.index] || cards[0];
        instruments.push(...fillCard(card, result, { given, filename: filenameOf(result, final),
          extra: extrasOf(result, final) }));
      });
      renderLegend(legend, instruments);
      status.textContent = `Done · seed ${final.seed}`;
      container.dataset.state = "done";
      return { results, seed: final.seed };
    } catch (e) {
      if (e.name === "AbortError") {
        status.textContent = "Cancelled.";
        cards.forEach((card) => failCard(card, "Cancelled."));
        container.dataset.state = "cancelled";
        return null;
      }
      status.textContent = "";
      cards.forEach((card) => failCard(card, "No piece: see the message above."));
      container.dataset.state = "failed";
      showError(e.message);
      return null;
    } finally {
      cancelButton.removeEventListener("click", onCancel);
      cancelButton.hidden = true;
      button.disabled = false;
    }
  }

  // -- simple mode -----------------------------------------------------------------------------------------
  async function onGenerate(event) {
    event.preventDefault();
    clearError();
    let body;
    let start;
    try {
      start = startSettings();
      const seconds = readNumber($("#length"), { name: "Length", min: 1, max: maxSeconds() });
      if (start.seconds >= seconds) {
        throw new Error(`Length must be longer than the opening (${fmtSeconds(start.seconds)}).`);
      }
      body = { ...samplingSettings(), ...start.fields, seconds };
    } catch (e) {
      showError(e.message);
      return;
    }
    await generateInto({
      body, container: $("#simple-results"), legend: $("#simple-legend"), status: $("#simple-status"),
      button: $("#generate"), cancelButton: $("#simple-cancel"), given: start.seconds,
      filenameOf: (result, job) => `musenet-${slug(body.label || "any")}-seed${job.seed}-${result.index + 1}.mid`,
      extrasOf: (result, job) => [el("button", { type: "button", class: "button secondary develop",
        title: "Continue this candidate step by step", text: "Build on this →",
        onclick: () => developCandidate(start, body, result, job) })],
    });
  }

  // -- step-by-step mode: the tree of takes ----------------------------------------------------------------
  const tree = { nodes: new Map(), root: null, current: null, taken: 0, busy: false };

  function resetTree() {
    tree.nodes.clear();
    tree.taken = 0;
    const root = { id: 0, parent: null, children: [], name: "Start", seconds: 0, notes: [], tokens: null };
    tree.nodes.set(0, root);
    tree.root = root;
    tree.current = root;
    refreshRoot();
    $("#advanced-results").replaceChildren();
    $("#advanced-legend").replaceChildren();
  }

  // While nothing has grown from it, the root follows the opening chosen in the settings.
  function refreshRoot() {
    const root = tree.root;
    if (!root || root.children.length || !state.model) {
      renderTree();
      return;
    }
    let start;
    try {
      start = startSettings();
    } catch (e) {
      start = { kind: "pending", fields: {}, seconds: 0, title: "Start", notes: [] };
    }
    Object.assign(root, { start, name: start.kind === "none" ? "Start" : start.title, seconds: start.seconds,
      notes: start.notes });
    renderTree();
  }

  function nodePath(node) {
    const path = [];
    for (let n = node; n; n = n.parent === null ? null : tree.nodes.get(n.parent)) path.unshift(n);
    return path;
  }

  function renderTree() {
    const list = $("#tree");
    if (!tree.root) return;
    const item = (node) => {
      const isCurrent = node === tree.current;
      const onPath = nodePath(tree.current).includes(node);
      const delta = node.parent === null ? "" : `+${fmtSeconds(node.seconds - tree.nodes.get(node.parent).seconds)}`;
      const button = el("button", { type: "button", class: `node${isCurrent ? " current" : ""}${onPath ? " on-path"
        : ""}`, "aria-current": isCurrent ? "true" : null, dataset: { node: String(node.id) },
      title: node.parent === null ? node.name : `${node.name}: ${fmtSeconds(node.seconds)} (seed ${node.seed}, `
        + `candidate ${node.sample + 1})`,
      onclick: () => selectNode(node) },
      el("span", { class: "node-dot", "aria-hidden": "true" }),
      el("span", { class: "node-name", text: node.name }),
      el("span", { class: "node-len", text: fmtSeconds(node.seconds) }),
      delta ? el("span", { class: "node-delta", text: delta }) : null);
      const li = el("li", { class: "tree-item" }, button);
      if (node.children.length) li.append(el("ul", { class: "tree-children" }, node.children.map(item)));
      return li;
    };
    list.replaceChildren(item(tree.root));
    const grown = tree.root.children.length > 0;
    $("#new-piece").hidden = !grown;
    $("#opening-fields").disabled = grown && modeIs("advanced");
    $("#opening-fields").title = grown && modeIs("advanced")
      ? "The piece has started; choose New piece to start from another opening" : "";
    renderCurrent();
  }

  let shownCurrent = [];

  function renderCurrent() {
    const node = tree.current;
    if (!node) return;
    const room = maxSeconds() - node.seconds;
    $("#extend").disabled = tree.busy || room < 0.5;
    if (room < 0.5 && !tree.busy) {
      $("#extend-status").textContent = `This take is as long as the model allows (${fmtSeconds(maxSeconds())}).`;
    }
    // Redrawn only when the take or its music changed, so that a take playing here keeps its Stop button.
    const shown = [node, node.name, node.seconds, node.notes, node.midiUrl];
    if (shown.every((value, i) => value === shownCurrent[i])) return;
    shownCurrent = shown;
    const view = $("#current-view");
    if (audio.playing && view.contains(audio.playing.owner)) stopPlayback();
    $("#current-name").textContent = node.name;
    $("#current-length").textContent = fmtSeconds(node.seconds);
    const actions = $("#current-actions");
    actions.replaceChildren();
    $("#current-legend").replaceChildren();
    if (node.notes && (node.notes.length || node.parent !== null)) {
      const parent = node.parent === null ? null : tree.nodes.get(node.parent);
      const roll = new Roll({ notes: node.notes, seconds: node.seconds, given: parent ? parent.seconds : 0,
        height: 200, label: `Piano roll of ${node.name}` });
      view.replaceChildren(roll.el);
      renderLegend($("#current-legend"), node.notes.map((n) => n.instrument));
      actions.append(playButton(roll, node.notes, node.seconds, node.name));
    } else if (node.start && node.start.kind === "opening") {
      view.replaceChildren(el("p", { class: "placeholder", text: `${node.start.title} (${fmtSeconds(node.seconds)}): `
        + "extend it to hear how it goes on." }));
    } else {
      view.replaceChildren(el("p", { class: "placeholder",
        text: "Nothing yet: extend to write the first seconds, then pick the take you like." }));
    }
    if (node.midiUrl) {
      actions.append(downloadLink("Download MIDI", node.midiUrl, node.filename,
        `Download ${node.name} (the whole branch up to it) as MIDI`));
      if (node.wavUrl) {
        actions.append(downloadLink("WAV", node.wavUrl, node.filename.replace(/\.mid$/, ".wav"),
          `Download ${node.name} as audio rendered by the server`));
      }
    }
  }

  function selectNode(node) {
    if (tree.current === node) return;
    stopPlayback();
    tree.current = node;
    renderTree();
    const button = document.querySelector(`#tree button[data-node="${node.id}"]`);
    if (button) button.focus();
  }

  function addTake(parent, result, { seed, label }) {
    const id = tree.nodes.size;
    tree.taken += 1;
    const node = { id, parent: parent.id, children: [], name: `Take ${tree.taken}`, seconds: result.seconds,
      notes: result.notes, tokens: result.tokens, midiUrl: result.midi_url, wavUrl: result.wav_url,
      seed, sample: result.index, ended: result.ended };
    node.filename = `musenet-${slug(label || "any")}-take${tree.taken}-${Math.round(result.seconds)}s.mid`;
    tree.nodes.set(id, node);
    parent.children.push(node);
    tree.current = node;
    return node;
  }

  async function onExtend(event) {
    event.preventDefault();
    clearError();
    const parent = tree.current;
    let body;
    try {
      const by = readNumber($("#extend-by"), { name: "Extend by", min: 0.5, max: maxSeconds() });
      const seconds = Math.min(maxSeconds(), parent.seconds + by);
      if (seconds - parent.seconds < 0.5) throw new Error(`This take is as long as the model allows.`);
      let from;
      if (parent.parent === null) {
        refreshRoot();
        from = parent.children.length ? parent.start.fields : startSettings().fields;
      } else {
        from = { continue_from: parent.tokens };
      }
      body = { ...samplingSettings(), ...from, seconds };
    } catch (e) {
      showError(e.message);
      return;
    }
    tree.busy = true;
    const heading = el("h2", { class: "candidates-title",
      text: `Continuations of ${parent.name} (${fmtSeconds(parent.seconds)} → ${fmtSeconds(body.seconds)})` });
    try {
      await generateInto({
        body, container: $("#advanced-results"), legend: $("#advanced-legend"), status: $("#extend-status"),
        button: $("#extend"), cancelButton: $("#extend-cancel"), given: parent.seconds, heading,
        filenameOf: (result, job) => `musenet-${slug(body.label || "any")}-seed${job.seed}-${result.index + 1}.mid`,
        extrasOf: (result, job) => [el("button", { type: "button", class: "button keep",
          text: "Keep this take", "aria-label": `Keep candidate ${result.index + 1}`,
          onclick: () => keepTake(parent, result, { seed: job.seed, label: body.label }) })],
      });
    } finally {
      tree.busy = false;
      renderCurrent();
    }
  }

  function keepTake(parent, result, info) {
    stopPlayback();
    const node = addTake(parent, result, info);
    $("#advanced-results").replaceChildren(el("p", { class: "kept-note", text: `Kept ${node.name}. Extend it again,`
      + " or click an earlier take in the tree to branch from there." }));
    $("#advanced-legend").replaceChildren();
    $("#extend-status").textContent = "";
    renderTree();
    const button = document.querySelector(`#tree button[data-node="${node.id}"]`);
    if (button) button.focus();
  }

  // A simple-mode candidate becomes the first take of a new step-by-step piece.
  function developCandidate(start, body, result, job) {
    stopPlayback();
    resetTree();
    Object.assign(tree.root, { start, name: start.kind === "none" ? "Start" : start.title, seconds: start.seconds,
      notes: start.notes });
    if (start.kind !== "none" && start.kind !== "upload") {
      const select = $("#opening");
      select.value = start.kind === "opening" ? `opening:${start.name}` : select.value;
    }
    addTake(tree.root, result, { seed: job.seed, label: body.label });
    selectMode("advanced");
    renderTree();
  }

  function onNewPiece() {
    stopPlayback();
    resetTree();
    $("#extend-status").textContent = "";
    renderTree();
  }

  // -- tabs ---------------------------------------------------------------------------------------------
  const MODES = ["simple", "advanced"];
  let mode = "simple";
  const modeIs = (name) => mode === name;

  function selectMode(name, focus = false) {
    mode = name;
    for (const m of MODES) {
      const tab = $(`#tab-${m}`);
      const on = m === name;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
      $(`#panel-${m}`).hidden = !on;
      if (on && focus) tab.focus();
    }
    document.body.dataset.mode = name;
    stopPlayback();
    renderTree();
  }

  function setUpTabs() {
    for (const m of MODES) {
      const tab = $(`#tab-${m}`);
      tab.addEventListener("click", () => selectMode(m));
      tab.addEventListener("keydown", (event) => {
        const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
        if (step) {
          event.preventDefault();
          selectMode(MODES[(MODES.indexOf(m) + step + MODES.length) % MODES.length], true);
        } else if (event.key === "Home" || event.key === "End") {
          event.preventDefault();
          selectMode(event.key === "Home" ? MODES[0] : MODES[MODES.length - 1], true);
        }
      });
    }
  }

  // -- start ---------------------------------------------------------------------------------------------
  function init() {
    setUpTabs();
    $("#error-close").addEventListener("click", clearError);
    $("#temperature").addEventListener("input", () => {
      $("#temperature-out").textContent = Number($("#temperature").value).toFixed(2);
    });
    $("#opening").addEventListener("change", onOpeningChange);
    $("#primer-seconds").addEventListener("input", refreshRoot);
    $("#upload").addEventListener("change", () => onUpload().catch((e) => showError(e.message)));
    $("#settings").addEventListener("submit", (event) => event.preventDefault());
    $("#simple-form").addEventListener("submit", onGenerate);
    $("#extend-form").addEventListener("submit", onExtend);
    $("#new-piece").addEventListener("click", onNewPiece);
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && audio.playing) stopPlayback();
    });
    const start = () => loadModel().catch((e) => {
      $("#model-info").textContent = "Model unavailable";
      showError(`Cannot load the model's description: ${e.message}`);
      const retry = el("button", { type: "button", class: "button secondary small", text: "Retry",
        onclick: () => { retry.remove(); clearError(); start(); } });
      $("#model-info").append(" ", retry);
    });
    start();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
