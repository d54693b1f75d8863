// Playback in the page: a small Web Audio synthesizer (a patch per instrument family, synthesized drums)
// that schedules a piece's notes as it plays.
import { clamp } from "./dom.js";

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

// -- the synth --------------------------------------------------------------------------------------------
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

export const audio = { ctx: null, out: null, noise: null, playing: null };

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
export function play(notes, seconds, { from = 0, onTime, onEnd, owner = null }) {
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

export function stopPlayback() {
  if (audio.playing) audio.playing.stop();
}
